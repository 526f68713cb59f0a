"""HF checkpoints (config.json + safetensors, or PyTorch .bin) → skipjax config and params.

    cfg, params = skipjax.convert.hf.load(path, dtype=jnp.float32, mesh=None)
    logits = skipjax.models.build(cfg).apply({'params': params}, tokens, positions, mask)

The target parameter tree (shapes, logical axis names) comes from `jax.eval_shape` of the
skipjax model, so nothing is initialised. Tensors are read one at a time, rearranged, cast to
`dtype` and, given a `mesh`, placed with their target sharding (train/sharding.py rules)
straight away: no full host copy of the model is ever held.
"""
import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from skipjax import models
from skipjax.convert import gguf, reader, rules
from skipjax.convert.reader import ConversionError
from skipjax.convert.specs import SPECS, Spec
from skipjax.models.config import DTYPES
from skipjax.train.sharding import logical_shardings

Config = Union[models.TransformerConfig, models.EncoderConfig]
_HF_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
             "pytorch_model.bin.index.json"]
# What the profiler's text pipeline and image preprocessing read next to the weights.
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "preprocessor_config.json"]


def positions_from_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
  """OPT positions from a (left-)padding mask: cumsum(mask)·mask − 1 (HF OPT; offset 2 is added
  by the position table). Padding gets −1, i.e. table row 1, exactly as in HF."""
  mask = jnp.asarray(attention_mask).astype(jnp.int32)
  return (jnp.cumsum(mask, axis=-1) * mask - 1).astype(jnp.int32)


def resolve(path: str) -> str:
  """A local checkpoint folder or `.gguf` file, or a hub id fetched with huggingface_hub when online."""
  if os.path.isdir(path) or gguf.is_gguf(path):
    return path
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    return snapshot_download(path, allow_patterns=_HF_FILES + TOKENIZER_FILES)
  except Exception as e:  # offline, unknown id, no huggingface_hub
    raise ConversionError(f"{path!r} is not a checkpoint folder and could not be fetched from the hub: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def read_hf_config(directory: str) -> Dict[str, Any]:
  if gguf.is_gguf(directory):  # config.json fields from the GGUF metadata
    return gguf.read_config(directory)
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"no config.json in {directory}")
  try:
    with open(path) as f:
      config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
    raise ConversionError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields")
  return config


def model_config(spec: Spec, hf_config: Dict[str, Any], where: str) -> Config:
  """`spec.config(hf_config)`, with a missing or malformed field reported as one line naming
  `where` (the config.json) and the field, and the head layout checked."""
  try:
    cfg = spec.config(hf_config)
  except KeyError as e:
    raise ConversionError(f"{where} has no field {e.args[0]!r} (needed for model_type {spec.model_type!r})") from e
  except (TypeError, ValueError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{where}: invalid value in the {spec.model_type} config: {str(e).splitlines()[0]}") from e
  blocks = cfg.transformer if isinstance(cfg, models.EncoderConfig) else cfg
  if blocks.num_heads <= 0 or (not getattr(blocks, "head_dim", 0) and blocks.d_model % blocks.num_heads):
    raise ConversionError(f"{where}: num_attention_heads={blocks.num_heads} does not divide "
                          f"hidden_size={blocks.d_model}")
  return cfg


def spec_for(hf_config: Dict[str, Any], where: str) -> Spec:
  model_type = hf_config.get("model_type")
  if model_type not in SPECS:
    raise ConversionError(f"unsupported model_type {model_type!r} in {where}; supported: {sorted(SPECS)}")
  return SPECS[model_type]


def with_dtype(cfg: Config, dtype) -> Config:
  """The config computing in `dtype` too (when it is one of models.config.DTYPES)."""
  name = next((k for k, v in DTYPES.items() if jnp.dtype(v) == jnp.dtype(dtype)), None)
  if name is None:
    return cfg
  if isinstance(cfg, models.EncoderConfig):
    return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, dtype=name))
  return dataclasses.replace(cfg, dtype=name)


def abstract_params(cfg: Config, spec: Spec) -> Any:
  """Boxed (logically partitioned) ShapeDtypeStructs of the skipjax model's params."""
  model = models.build(cfg)
  init = lambda: model.init(jax.random.key(0), *spec.dummy_inputs(cfg))["params"]
  return jax.eval_shape(init)


def _strip(name: str, prefixes) -> str:
  for prefix in prefixes:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


def _place(array: np.ndarray, sharding) -> jax.Array:
  return jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)


def load(path: str, dtype=jnp.float32, mesh: Optional[jax.sharding.Mesh] = None) -> Tuple[Config, Dict]:
  """(cfg, params) from an HF checkpoint folder (or hub id); dispatches on config `model_type`.

  Raises ConversionError (one line, naming the tensor and file) for an unsupported
  `model_type`, a missing tensor, an unexpected tensor or a shape mismatch.
  """
  directory = resolve(path)
  hf_config = read_hf_config(directory)
  spec = spec_for(hf_config, os.path.join(directory, "config.json"))
  where = directory if gguf.is_gguf(directory) else os.path.join(directory, "config.json")
  cfg = with_dtype(model_config(spec, hf_config, where), dtype)
  abstract = abstract_params(cfg, spec)
  targets = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  shardings = traverse_util.flatten_dict(logical_shardings(abstract, mesh)) if mesh is not None else {}
  table = [r for r in spec.rules(cfg) if r.target in targets]
  zero = spec.zero_fill(hf_config, cfg) & set(targets)
  uncovered = set(targets) - {r.target for r in table} - zero
  assert not uncovered, f"no conversion rule for params {sorted(uncovered)}"  # a bug in specs.py
  by_name = {name: rule for rule in table for name in rule.names}
  np_dtype = np.dtype(jnp.dtype(dtype))

  flat, source, prefix = {}, {}, ""
  listing = gguf.list_tensors if gguf.is_gguf(directory) else reader.list_tensors
  for stored, info in listing(directory).items():
    name = _strip(stored, spec.prefixes)
    prefix = prefix or stored[: len(stored) - len(name)]
    rule = by_name.get(name) or by_name.get(stored)
    if rule is None:
      if any(re.search(p, name) for p in spec.ignored):
        continue
      raise ConversionError(f"unexpected tensor {stored!r} in {info.file} ({directory}): "
                            f"no {spec.model_type} parameter takes it")
    if rule.target in source:
      raise ConversionError(f"tensor {stored!r} in {info.file} and {source[rule.target]!r} both map "
                            f"to params/{'/'.join(rule.target)}")
    target = targets[rule.target]
    want = rules.hf_shape(rule.kind, target.shape, info.shape)
    if want != info.shape:
      raise ConversionError(f"shape mismatch for tensor {stored!r} in {info.file} ({directory}): stored "
                            f"{list(info.shape)}, expected {list(want or ())} for params/{'/'.join(rule.target)}")
    array = rules.apply(rule.kind, info.read(), target.shape).astype(np_dtype)
    flat[rule.target] = _place(array, shardings.get(rule.target))
    source[rule.target] = stored

  missing = [r for r in table if r.target not in source and r.target not in zero]
  if missing:
    r = missing[0]
    raise ConversionError(f"missing tensor {prefix + r.names[0]!r} in {directory} for params/"
                          f"{'/'.join(r.target)} ({len(missing)} missing in all)")
  for target in zero - set(source):
    flat[target] = _place(np.zeros(targets[target].shape, np_dtype), shardings.get(target))
  return cfg, traverse_util.unflatten_dict(flat)
