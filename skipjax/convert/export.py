"""Converted models on disk: `DIR/config.json` (skipjax model config) + `DIR/params` (orbax).

Saving is atomic: everything is written to a temporary sibling folder that is renamed to `DIR`
only when complete, so a failed conversion leaves nothing half-written.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Tuple, Union

import orbax.checkpoint as ocp

from skipjax import models

Config = Union[models.TransformerConfig, models.EncoderConfig]


def config_to_dict(cfg: Config) -> Dict[str, Any]:
  """Flat, JSON-serialisable model config with `model_type` (models.build accepts it)."""
  if isinstance(cfg, models.EncoderConfig):
    return cfg.to_dict()
  return {"model_type": "decoder", **dataclasses.asdict(cfg)}


def config_from_dict(d: Dict[str, Any]) -> Config:
  d = dict(d)
  if d.get("model_type", "decoder") in models.encoder.ENCODER_TYPES:
    return models.EncoderConfig.from_dict(d)
  return models.TransformerConfig.from_dict(d)


def save(out: str, cfg: Config, params: Any, extra: Dict[str, Any] = None) -> str:
  """Write config.json (+ `extra` json files) and an orbax checkpoint of `params` to `out`."""
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out={out} exists and is not empty")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_to_dict(cfg), f, indent=2)
    for name, value in (extra or {}).items():
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(value, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if os.path.exists(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def restore(directory: str) -> Tuple[Config, Any]:
  """(cfg, params) saved by `save` (params restored on the default device)."""
  with open(os.path.join(directory, "config.json")) as f:
    cfg = config_from_dict(json.load(f))
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(os.path.join(os.path.abspath(directory), "params"))
  checkpointer.close()
  return cfg, params
