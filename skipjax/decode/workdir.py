"""Models to decode: a training workdir, a `skipjax.convert` export or a pruned export.

* Training workdir (`config.json` + orbax `checkpoints/`): `restore(dir, step)`, the run's own
  tokenizer (byte, or its BPE `tokenizer.json`; none for synthetic tasks).
* Export (`config.json` + `params/`, written by `python -m skipjax.convert` or
  `python -m skipjax.depth.prune`): `restore_export(dir)`, with its `tokenizer.json` when present
  (prune copies the source's) and `prune.json` as `info` when it is a pruned export.

`load(path, step)` tells them apart (as `config.init_from` does) and restores either; HF folders
and `.gguf` files are refused with one line (convert them first).
"""
import json
import os
from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from skipjax import models
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.train import checkpoint as checkpoint_lib
from skipjax.train import optim
from skipjax.train import state as state_lib


class Restored(NamedTuple):
  config: ml_collections.ConfigDict  # the training config; exports: {'model': config.json}
  model: nn.Module
  params: Any
  step: int                          # exports: 0
  tokenizer: Optional[Any]           # None for synthetic tasks / exports without tokenizer.json
  kind: str = "workdir"              # workdir | export
  info: Optional[Dict[str, Any]] = None  # prune.json of a pruned export


class FileTokenizer:
  """An export's `tokenizer.json` (`tokenizers`) with the decode interface: `encode_batch`,
  `decode`, `eos_id` (the first of EOS_TOKENS the vocabulary has; None: no early stop)."""
  EOS_TOKENS = ("<|endoftext|>", "</s>", "<|im_end|>", "[SEP]")

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    try:
      self.tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises its own Exception type)
      raise ValueError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.vocab_size = self.tokenizer.get_vocab_size()
    self.eos_id = next((i for i in map(self.tokenizer.token_to_id, self.EOS_TOKENS) if i is not None), None)

  def encode_batch(self, texts):
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json (not a training workdir)")
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Byte tokenizer, the workdir's BPE (`tokenizer.json`), or None for synthetic sources."""
  if config.data.source.startswith("synthetic:"):
    return None
  if config.data.tokenizer == "byte":
    return tokenizer_lib.ByteTokenizer()
  path = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.tokenizer='bpe' but {path} is missing")
  return tokenizer_lib.load_or_train_bpe(config.data.bpe_vocab_size, lambda: [], workdir)


def restore(workdir: str, step: Optional[int] = None) -> Restored:
  """Params of the latest (or `step`) checkpoint, restored onto the first local device."""
  config = load_config(workdir)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  example = jnp.zeros((1, config.data.seq_len), jnp.int32)

  def init_fn(rng):
    params = nn.meta.unbox(model.init(state_lib.init_rngs(rng), example)["params"])
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        jax.eval_shape(init_fn, jax.random.key(0)))
  if not checkpoint_lib.Checkpointer.committed_steps_in(workdir):
    raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1_000_000)
  try:
    steps = ckpt.all_steps()
    step = steps[-1] if step is None else step
    if step not in steps:
      raise checkpoint_lib.CheckpointError(f"--step={step}: no such checkpoint in {ckpt.directory} "
                                           f"(steps: {', '.join(map(str, steps))})")
    state = ckpt.restore(target, step)
  finally:
    ckpt.close()
  return Restored(config, model, state.params, int(step), load_tokenizer(config, workdir))


def restore_export(directory: str) -> Restored:
  """A `skipjax.convert` / `skipjax.depth.prune` export: decoder config, params, tokenizer, prune.json."""
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  try:
    cfg, params = export.restore(directory)
  except ValueError as e:
    raise ValueError(f"--workdir={directory!r}: config.json: {e}") from None
  if not isinstance(cfg, models.TransformerConfig):
    raise ValueError(f"--workdir={directory!r} is a {cfg.model_type!r} encoder export; decoding needs a decoder LM")
  tok_path = os.path.join(directory, tokenizer_lib.TOKENIZER_FILE)
  tokenizer = FileTokenizer(tok_path) if os.path.exists(tok_path) else None
  info = None
  prune_path = os.path.join(directory, "prune.json")
  if os.path.exists(prune_path):
    with open(prune_path, encoding="utf-8") as f:
      info = json.load(f)
  config = ml_collections.ConfigDict({"model": export.config_to_dict(cfg)})
  return Restored(config, models.build(cfg), params, 0, tokenizer, "export", info)


def path_kind(path: str) -> str:
  """'workdir' or 'export' (one-line error naming --workdir for anything else)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--workdir={path!r} is not a folder (a training workdir or a skipjax.convert export)")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"--workdir={path!r} has no config.json (not a training workdir or a skipjax.convert "
                            "export)")
  if os.path.isdir(os.path.join(path, "params")):
    return "export"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  raise FileNotFoundError(f"--workdir={path!r} has neither checkpoints/ (training workdir) nor params/ (export); "
                          "convert an HF folder or .gguf first with python -m skipjax.convert")


def load(path: str, step: Optional[int] = None) -> Restored:
  """`restore` for a training workdir, `restore_export` for an export (`step` must then be None)."""
  if path_kind(path) == "workdir":
    return restore(path, step)
  if step is not None:
    raise ValueError(f"--step={step}: {path} is an export (one set of params), not a training workdir")
  return restore_export(path)


def with_plan(model: nn.Module, params: Any, plan: Optional[str], field: str = "--plan"):
  """(model, params) in the loop layout, under `plan` (None: the model's own plan).

  A scanned model is converted to the loop layout (`scan_layers=False`, params via
  `layout.to_loop`) so that non-identity plans apply; a plan running a parameter the checkpoint
  lacks (a pruned branch) is refused with one line naming `field`.
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  from skipjax.decode import generation  # pylint: disable=import-outside-toplevel
  from skipjax.depth import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from skipjax.models import layout  # pylint: disable=import-outside-toplevel
  cfg = model.config
  if cfg.scan_layers:
    cfg, params = dataclasses.replace(cfg, scan_layers=False), layout.to_loop(params)
  if plan is not None:
    try:
      cfg = dataclasses.replace(cfg, plan=plan_lib.to_string(plan_lib.resolve(plan, cfg.num_layers)))
    except ValueError as e:
      raise ValueError(f"{field}={plan!r}: {str(e).replace(plan_lib.FIELD + ': ', '')}") from None
  model = models.build(cfg)
  if plan is not None:
    generation.check_params(model, params, f"{field}={plan!r}")
  return model, params
