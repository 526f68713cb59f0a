"""How one HF (PyTorch layout) tensor becomes one skipjax parameter.

A `Rule` names the HF tensor(s) (aliases for renamed layouts, first name = canonical), the target
parameter path and a layout `kind`:
  copy     same shape                       (embeddings, LayerNorm, biases)
  linear   torch Linear [out, in] → Dense kernel [in, out]
  qkv      [H·Dh, d] → DenseGeneral kernel [d, H, Dh]
  heads    bias [H·Dh] → [H, Dh]
  out      [d, H·Dh] → DenseGeneral kernel [H, Dh, d]
  conv     Conv2d OIHW → flax HWIO
  squeeze  [1, …, 1, *target] → target      (ViT cls token / position table)
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

Path = Tuple[str, ...]
KINDS = ("copy", "linear", "qkv", "heads", "out", "conv", "squeeze")


@dataclasses.dataclass(frozen=True)
class Rule:
  names: Tuple[str, ...]
  target: Path
  kind: str = "copy"


def hf_shape(kind: str, target: Sequence[int], stored: Sequence[int]) -> Optional[Tuple[int, ...]]:
  """The stored shape that `kind` turns into `target` (None: no such shape)."""
  t = tuple(target)
  if kind == "copy":
    return t
  if kind == "linear":
    return (t[1], t[0])
  if kind == "qkv":
    return (t[1] * t[2], t[0])
  if kind == "heads":
    return (t[0] * t[1],)
  if kind == "out":
    return (t[2], t[0] * t[1])
  if kind == "conv":
    return (t[3], t[2], t[0], t[1])
  if kind == "squeeze":
    lead = len(stored) - len(t)
    return (1,) * lead + t if lead >= 0 else None
  raise ValueError(f"unknown rule kind {kind!r}; known: {KINDS}")


def apply(kind: str, array: np.ndarray, target: Sequence[int]) -> np.ndarray:
  """Rearrange a stored tensor into the target layout (shapes already checked)."""
  if kind in ("linear", "qkv", "out"):
    return np.ascontiguousarray(array.T).reshape(target)
  if kind == "conv":
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return array.reshape(target)


def block_rules(i: int, table: Dict[str, Sequence[str]]) -> list:
  """Rules for `block_{i}` from {'module:kind': HF module name templates with `{i}`}.

  `kind` is a layout above or `norm` (LayerNorm scale/bias); `.weight`/`.bias` are appended,
  e.g. {'attn/query:qkv': ['layers.{i}.self_attn.q_proj']}.
  """
  rules = []
  for key, templates in table.items():
    module, kind = key.split(":")
    rules += dense_rules((f"block_{i}",) + tuple(module.split("/")), [t.format(i=i) for t in templates], kind)
  return rules


def dense_rules(module: Path, bases: Sequence[str], kind: str = "linear") -> list:
  """Rules for a Dense/LayerNorm-like module (`kind='norm'`: scale/bias) with weight and bias."""
  weight = "scale" if kind == "norm" else "kernel"
  bias_kind = "heads" if kind == "qkv" else "copy"
  return [Rule(tuple(b + ".weight" for b in bases), module + (weight,), "copy" if kind == "norm" else kind),
          Rule(tuple(b + ".bias" for b in bases), module + ("bias",), bias_kind)]
