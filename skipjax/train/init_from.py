"""`config.init_from`: start a new run from the weights of an earlier model.

Sources (the kind is recognised from what is at the path):
  * an export of `python -m skipjax.convert` (`config.json` with the model config + `params/`),
  * a training workdir (`config.json` + `checkpoints/`: its latest checkpoint's params),
  * an HF checkpoint folder or a `.gguf` file (converted on the fly by `skipjax.convert.hf.load`).

The model's architecture comes from the source; what the run may choose itself is listed in
`RUN_FIELDS` (routing, activation dtype, dropout, remat, execution plan, LayerDrop); of those,
`plan` is the source's when the run leaves it empty (a branch-pruned export keeps its plan).
Parameters the source has are copied (same shapes, else a one-line error naming the parameter);
parameters only the new model has, e.g. SkipLayer routers added to a dense model, keep their fresh
initialisation; source blocks (or branches) that the new model's execution plan never runs have
no place in it and are reported as not copied.
"""
import functools
import json
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from skipjax.depth import plan as plan_lib
from skipjax.models import layout

# config.model fields the new run sets itself; every other field is the source's.
RUN_FIELDS = ("skip", "dtype", "dropout_rate", "remat", "oracle_threshold", "plan", "layerdrop")
# Run fields taken from the source when the run leaves them empty.
INHERITED_WHEN_UNSET = ("plan",)


def _error(path: str, message: str) -> ValueError:
  return ValueError(f"config.init_from={path!r}: {message}")


def source_kind(path: str) -> str:
  """'export', 'workdir', 'hf' or 'gguf' (ValueError / FileNotFoundError naming the path)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={path!r} does not exist")
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf"
    raise _error(path, "is a file but not a .gguf; give a skipjax.convert export, a training workdir, "
                 "an HF checkpoint folder or a .gguf file")
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise _error(path, "has no config.json (not a skipjax.convert export, training workdir or HF folder)")
  if os.path.isdir(os.path.join(path, "params")):
    return "export"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  return "hf"


@functools.lru_cache(maxsize=2)
def _load(path: str, kind: str) -> Tuple[Dict[str, Any], Any]:
  """(model config dict, params as a nested dict of arrays) of the source."""
  if kind == "export":
    from skipjax.convert import export  # pylint: disable=import-outside-toplevel
    cfg, params = export.restore(path)
    return export.config_to_dict(cfg), params
  if kind == "workdir":
    from skipjax.decode import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    restored = workdir_lib.restore(path)
    return restored.config.model.to_dict(), restored.params
  from skipjax.convert import export, hf  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load(path)
  return export.config_to_dict(cfg), nn.meta.unbox(params)


def source_model_config(path: str) -> Dict[str, Any]:
  """The source's model config as a dict (read from config.json where that is enough)."""
  kind = source_kind(path)
  if kind in ("export", "workdir"):
    try:
      with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
      return dict(stored["model"] if kind == "workdir" else stored)
    except (ValueError, KeyError, TypeError) as e:
      raise _error(path, f"config.json is not a skipjax config ({type(e).__name__}: {e})") from None
  from skipjax.convert import export, hf  # pylint: disable=import-outside-toplevel
  hf_config = hf.read_hf_config(path)  # HF config.json, or the same fields from the GGUF metadata
  where = path if kind == "gguf" else os.path.join(path, "config.json")
  return export.config_to_dict(hf.spec_for(hf_config, where).config(hf_config))


def apply_model_config(config: ml_collections.ConfigDict, source: Optional[Dict[str, Any]] = None) -> None:
  """Set config.model's architecture fields from the source of `config.init_from` (in place);
  `source` (a model config dict) replaces reading it, e.g. a resumed run's stored config."""
  path = config.init_from
  source = dict(source_model_config(path) if source is None else source)
  model_type = source.get("model_type", "decoder")
  if model_type != config.model.get("model_type", "decoder"):
    raise _error(path, f"holds a {model_type!r} model; this run trains "
                 f"config.model.model_type={config.model.get('model_type', 'decoder')!r}")
  changed = []
  with config.unlocked():
    for key, value in source.items():
      if key in RUN_FIELDS and not (key in INHERITED_WHEN_UNSET and not config.model.get(key)):
        continue
      if isinstance(value, tuple):
        value = list(value)
      if key not in config.model or config.model[key] != value:
        changed.append(f"{key}: {config.model.get(key)!r} -> {value!r}")
        config.model[key] = value
  if changed:
    logging.info("config.init_from=%s: model config taken from the source (%s)", path, ", ".join(changed))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _top(name: str, depth: int) -> str:
  return "/".join(name.split("/")[:depth])


def _not_run(names, dst_names, plan) -> Tuple[list, list]:
  """(source parameter names in blocks or branches that `plan` never runs, the other names).

  A block the plan never runs has no parameters in the plan model, nor has a branch (the attention
  or FFN submodules) that no position of its slot runs. The other names are for the caller to refuse."""
  if plan is None:
    return [], list(names)
  branches: Dict[int, Tuple[bool, bool]] = {}
  for e in plan:
    attn, ffn = branches.get(e.slot, (False, False))
    branches[e.slot] = (attn or e.attn, ffn or e.ffn)
  blocks = {_top(n, 1) for n in dst_names}
  submodules = {_top(n, 2) for n in dst_names}
  not_run, other = [], []
  for name in names:
    head = _top(name, 1)
    index = head[len(layout.PREFIX):] if head.startswith(layout.PREFIX) else ""
    slot = int(index) if index.isdigit() else None
    if slot is not None and slot not in branches and head not in blocks:
      not_run.append(name)  # a slot no position runs
    elif slot in branches and not all(branches[slot]) and _top(name, 2) not in submodules:
      not_run.append(name)  # a branch no position of the slot runs
    else:
      other.append(name)
  return not_run, other


def overlay_params(path: str, params: Any, shardings: Any, plan: Optional[Sequence[Any]] = None) -> Any:
  """`params` (the new model's fresh init) with every parameter of the source copied in.

  `plan`: the new model's execution plan (`TransformerConfig.execution_plan`); source parameters of
  blocks or branches it never runs are not copied (one log line lists them). Any other source
  parameter the model lacks is an error (e.g. scan vs loop layout)."""
  _, source = _load(path, source_kind(path))
  src = traverse_util.flatten_dict(nn.meta.unbox(source), sep="/")
  dst = traverse_util.flatten_dict(params, sep="/")
  not_run, extra = _not_run(sorted(set(src) - set(dst)), dst, plan)
  if extra:
    raise _error(path, f"parameter {extra[0]} of the source has no place in the model "
                 f"({len(extra)} in all; is config.model.scan_layers or tie_embeddings different?)")
  if not_run:
    blocks = {_top(n, 1) for n in dst}
    skipped = sorted({_top(n, 2 if _top(n, 1) in blocks else 1) for n in not_run})
    logging.info("config.init_from=%s: %d source parameters not copied, config.model.plan=%r never runs %s",
                 path, len(not_run), plan_lib.to_string(plan), ", ".join(skipped))
  flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
  out = {}
  for name, leaf in dst.items():
    if name not in src:
      out[name] = leaf
      continue
    value = src[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise _error(path, f"parameter {name} has shape {list(value.shape)} in the source, "
                   f"{list(leaf.shape)} in the model")
    array = np.asarray(jax.device_get(value)).astype(leaf.dtype)
    out[name] = jax.device_put(array, flat_shardings[name])
  _load.cache_clear()  # the source's arrays are not needed any more
  fresh = sorted(set(dst) - set(src))
  logging.info("config.init_from=%s: %d parameters copied, %d freshly initialised%s", path,
               len(src) - len(not_run), len(fresh),
               f" ({', '.join(fresh[:8])}{', ...' if len(fresh) > 8 else ''})" if fresh else "")
  return traverse_util.unflatten_dict(out, sep="/")


def trainable_labels(regex: str, params: Any) -> Any:
  """'train' for parameters whose '/'-joined path fully matches `regex` ('' = all), else 'freeze'."""
  if not regex:
    return jax.tree.map(lambda _: "train", params)
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if pattern.fullmatch(_path_name(path)) else "freeze", params)


def parameter_counts(regex: str, params: Any) -> Tuple[int, int]:
  """(total, trainable) number of parameter entries."""
  labels = jax.tree.leaves(trainable_labels(regex, params))
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
  return sum(sizes), sum(s for s, label in zip(sizes, labels) if label == "train")


def example_paths(params: Any, limit: int = 4) -> str:
  names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")

