"""Executed depth: the one count of the layers a token ran (issue 15 P11), used by the training
metrics (`train.step.executed_depth`, `routing_metrics['effective_depth']`), evaluation and
decoding (`decode.executed_layers`).

A layer — a depth position of the execution plan — counts as the fraction of its two residual
blocks (attention, FFN) that executed for the token, a block without a gate counting as
executed (LtS Table 1 "Eff-L" is the mean of this sum over tokens for whole-layer routing):

    layer gate m_l:        m_l · (a_l + f_l) / 2
    block gates:           (a_l · m_attn,l + f_l · m_ffn,l) / 2,   m = 1 for an un-routed block

where a_l, f_l ∈ {0, 1} say whether the position runs its attention / FFN (both 1 without a
plan). So whole-layer routing counts m_l, block routing (m_attn + m_ffn)/2, FFN-only routing
(WideFFN) (1 + m_ffn)/2, a dense layer 1, and a plan position that runs only its attention 1/2.
"""
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp

from skipjax.models import layout

BLOCKS = ("attn", "ffn")


def _flags(plan: Optional[Sequence[Any]], name: str, like: jnp.ndarray) -> jnp.ndarray:
  """[P, 1, …] float32: 1 where the plan position runs branch `name` ('attn' | 'ffn' | 'layer')."""
  if plan is None:
    on = jnp.ones((like.shape[0],), jnp.float32)
  elif name == "layer":
    on = jnp.asarray([(e.attn + e.ffn) / 2 for e in plan], jnp.float32)
  else:
    on = jnp.asarray([float(getattr(e, name)) for e in plan], jnp.float32)
  return on.reshape((-1,) + (1,) * (like.ndim - 1))


def layer_fractions(gates: Mapping[str, Any], plan: Optional[Sequence[Any]] = None) -> Optional[jnp.ndarray]:
  """[L or P, …token shape] float32: the executed fraction of every layer / plan position for every
  token (module docstring), from the masks the blocks sowed in `gates`; None when no block sowed
  a gate (a dense model: every layer executes). `plan`: the model's execution plan (None: the
  identity plan)."""
  names = set(layout.sown_names(gates))
  rows = lambda n: layout.per_layer(gates, n, plan, None if plan is None else 0.0).astype(jnp.float32)
  if "layer_mask" in names:
    m = rows("layer_mask")
    return m * _flags(plan, "layer", m)
  masks = {b: rows(f"{b}_mask") for b in BLOCKS if f"{b}_mask" in names}
  if not masks:
    return None
  like = next(iter(masks.values()))
  total = jnp.zeros_like(like)
  for b in BLOCKS:  # a sown mask is 0 at positions whose branch is off (fill); an un-routed block runs
    total = total + (masks[b] if b in masks else jnp.broadcast_to(_flags(plan, b, like), like.shape))
  return total / len(BLOCKS)


def executed_depth(gates: Mapping[str, Any], plan: Optional[Sequence[Any]] = None) -> Optional[jnp.ndarray]:
  """[…token shape]: layers each token executed, Σ_l of `layer_fractions` (None: dense)."""
  fractions = layer_fractions(gates, plan)
  return None if fractions is None else jnp.sum(fractions, axis=0)
