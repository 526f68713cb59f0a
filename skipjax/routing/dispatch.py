"""Dispatch: turning a routing mask into saved compute, with static shapes (LtS §2.2, Alg. 1).

Layout. `x` is [G, S, ...]: G routing groups (batch rows for attention, or token groups for a
pointwise FFN, see `to_routing_groups`) of S tokens; `mask` is [G, S]. Groups never mix tokens of
different batch rows, so routing needs no cross-device traffic. The branch is called as

    branch_fn(x_sel [G, C, ...], idx_sel [G, C] int32, valid [G, C] bool) -> [G, C, ...out]

where `idx_sel` are the tokens' ORIGINAL positions within their group (attention builds the
causal mask from them against keys it computes from the full sequence, by closure; LtS Alg. 1:
K/V for every token, Q only for routed ones) and `valid` marks real (not padding) slots.
Padding slots get x_sel = 0, idx_sel = 0, and their outputs are discarded.

Methods (identical forward values and gradients when no token is dropped):

  `masked`    the branch runs on all S tokens (C = S, idx = arange, valid = mask); outputs at
              unrouted positions are zeroed. Reference; cost = dense.
  `capacity`  routed tokens get slots by cumsum; the first C = ceil(capacity_factor·P·S) of each
              group are gathered to [G, C, ...], computed and scattered back; later ones overflow:
              they are dropped (effective mask 0) and counted.
  `grouped`   LtS §2.2 "Gsize": routed tokens of each group are compacted into ceil(S/gsize)
              chunks of gsize slots. Chunk 0 runs unconditionally (it is empty only if no token
              at all is routed; running it outside any transform also gives the output shape and
              lets Flax create the branch's params); chunks 1.. run in a `lax.scan` whose body is
              a `lax.cond`: iteration k computes chunk k of EVERY group at once ([G, gsize, ...])
              and is skipped when chunk k is empty in all groups. Nothing is dropped; the cost
              follows max_g ceil(routed_g / gsize); gradients flow through scan + cond.
              Note: vmapping over `grouped` turns the cond into a select (both branches run);
              put all groups on axis 0 instead.

Flax: a branch that calls bound linen submodules works with every method in `apply`; in `init`,
the params are created by the first (unconditional) call, outside scan/cond.

Outputs are zero at unrouted/dropped positions, and because they are selected with `where`,
those positions send no gradient into the branch. `mask` itself carries no gradient: the gate's
gradient enters through `gated_layer_output` / `gated_residual`, which need the *effective* mask
returned here (dropped tokens pass x through unchanged).
"""
import math
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from skipjax.routing.routers import Gate

Array = jnp.ndarray
BranchFn = Callable[[Array, Array, Array], Array]

METHODS = ("masked", "capacity", "grouped")


class Dispatched(NamedTuple):
  """Result of `dispatch`.

  Attributes:
    output: branch output scattered back to [G, S, ...out]; 0 at unrouted/dropped positions.
    mask: effective mask [G, S] (input mask with dropped tokens set to 0), same dtype as input.
    metrics: float32 scalars `routed_fraction` (effective), `dropped_tokens`, `dropped_fraction`
      (of routed tokens), `compute_fraction` (token slots computed / G·S).
  """
  output: Array
  mask: Array
  metrics: Dict[str, Array]


def capacity_slots(group_size: int, target_density: float, capacity_factor: float) -> int:
  """Slots per group for `capacity` dispatch: C = ceil(capacity_factor·P·S), within [1, S]."""
  c = math.ceil(capacity_factor * target_density * group_size - 1e-9)
  return int(min(max(c, 1), group_size))


def default_gsize(group_size: int, target_density: float) -> int:
  """A Gsize ∝ P·S (LtS §2.2): a quarter of the expected routed tokens per group, at least 1."""
  return max(1, math.ceil(target_density * group_size / 4))


def to_routing_groups(x: Array, group_size: int) -> Array:
  """[B, T, ...] -> [B·T/g, g, ...]: smaller routing groups for pointwise branches (FFN).

  Groups stay inside one batch row (T % g == 0), so they never cross the data-parallel axis.
  """
  b, t = x.shape[:2]
  if t % group_size:
    raise ValueError(f"sequence length {t} is not divisible by routing group size {group_size}")
  return x.reshape((b * (t // group_size), group_size) + x.shape[2:])


def from_routing_groups(x: Array, seq_len: int) -> Array:
  """Inverse of `to_routing_groups`: [B·T/g, g, ...] -> [B, T, ...]."""
  n, g = x.shape[:2]
  return x.reshape((n * g // seq_len, seq_len) + x.shape[2:])


def _expand(m: Array, like: Array) -> Array:
  """m [G, C] broadcastable against like [G, C, ...]."""
  return m.reshape(m.shape + (1,) * (like.ndim - m.ndim))


def _compact(mask: Array, num_slots: int):
  """Slot assignment by cumsum (LtS §2.2 step 2).

  Returns:
    kept [G, S] bool (routed and within the first `num_slots`), slot [G, S] int32 (the token's
    slot, `num_slots` if not kept), idx [G, num_slots] int32 (original position of each slot's
    token, 0 for padding slots), valid [G, num_slots] bool.
  """
  g, s = mask.shape
  position = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  kept = mask & (position < num_slots)
  slot = jnp.where(kept, position, num_slots)
  rows = jnp.arange(g)[:, None]
  idx = jnp.zeros((g, num_slots), jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s)), mode="drop")
  valid = jnp.arange(num_slots)[None, :] < jnp.sum(kept, axis=1, dtype=jnp.int32)[:, None]
  return kept, slot, idx, valid


def _run_branch(branch_fn: BranchFn, x: Array, idx: Array, valid: Array) -> Array:
  """Gather x at idx [G, C], run the branch, zero padding slots (inputs and outputs)."""
  rows = jnp.arange(x.shape[0])[:, None]
  x_sel = x[rows, idx]
  x_sel = jnp.where(_expand(valid, x_sel), x_sel, jnp.zeros((), x_sel.dtype))
  out = branch_fn(x_sel, idx, valid)
  return jnp.where(_expand(valid, out), out, jnp.zeros((), out.dtype))


def _metrics(mask: Array, kept: Array, computed_slots) -> Dict[str, Array]:
  total = mask.size
  routed = jnp.sum(mask, dtype=jnp.float32)
  n_kept = jnp.sum(kept, dtype=jnp.float32)
  dropped = routed - n_kept
  return dict(routed_fraction=n_kept / total, dropped_tokens=dropped,
              dropped_fraction=dropped / jnp.maximum(routed, 1.0),
              compute_fraction=jnp.asarray(computed_slots, jnp.float32) / total)


def masked_dispatch(branch_fn: BranchFn, x: Array, mask: Array):
  """Reference (LtS §2.2 'basic implementation'): run on every token, select with m."""
  g, s = mask.shape
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  out = _run_branch(branch_fn, x, idx, mask)
  return out, mask, _metrics(mask, mask, g * s)


def capacity_dispatch(branch_fn: BranchFn, x: Array, mask: Array, num_slots: int):
  """Capacity gather: the first `num_slots` routed tokens per group by cumsum; overflow dropped."""
  kept, slot, idx, valid = _compact(mask, num_slots)
  out_sel = _run_branch(branch_fn, x, idx, valid)
  rows = jnp.arange(x.shape[0])[:, None]
  out = out_sel[rows, jnp.minimum(slot, num_slots - 1)]
  out = jnp.where(_expand(kept, out), out, jnp.zeros((), out.dtype))
  return out, kept, _metrics(mask, kept, mask.shape[0] * num_slots)


def grouped_dispatch(branch_fn: BranchFn, x: Array, mask: Array, gsize: int):
  """LtS §2.2 Gsize: compacted chunks [n_chunks, G, gsize]; scan over chunks, cond skips empty."""
  g, s = mask.shape
  gsize = min(gsize, s)
  n_chunks = -(-s // gsize)
  kept, slot, idx, valid = _compact(mask, n_chunks * gsize)  # nothing is dropped
  idx = idx.reshape(g, n_chunks, gsize).transpose(1, 0, 2)
  valid = valid.reshape(g, n_chunks, gsize).transpose(1, 0, 2)

  first = _run_branch(branch_fn, x, idx[0], valid[0])
  chunks = first[None]
  computed = jnp.asarray(g * gsize, jnp.float32)
  if n_chunks > 1:
    zeros = jnp.zeros(first.shape, first.dtype)

    def body(count, chunk):
      chunk_idx, chunk_valid = chunk
      active = jnp.any(chunk_valid)
      out = jax.lax.cond(active, lambda: _run_branch(branch_fn, x, chunk_idx, chunk_valid),
                         lambda: zeros)
      return count + active.astype(jnp.float32) * (g * gsize), out

    computed, rest = jax.lax.scan(body, computed, (idx[1:], valid[1:]))
    chunks = jnp.concatenate([chunks, rest], axis=0)

  rows = jnp.arange(g)[:, None]
  slot = jnp.minimum(slot, n_chunks * gsize - 1)
  out = chunks[slot // gsize, rows, slot % gsize]
  out = jnp.where(_expand(kept, out), out, jnp.zeros((), out.dtype))
  return out, kept, _metrics(mask, kept, computed)


def dispatch(branch_fn: BranchFn, x: Array, mask: Array, *, method: str = "masked",
             capacity_factor: float = 1.25, target_density: float = 0.5,
             gsize: Optional[int] = None) -> Dispatched:
  """LtS §2.2 / Alg. 1: run `branch_fn` only on the routed tokens of x [G, S, ...].

  Args:
    branch_fn: (x_sel [G, C, ...], idx_sel [G, C], valid [G, C]) -> [G, C, ...out]; see module
      docstring. Must be pure in its array arguments (closing over params / full-sequence K/V is
      fine).
    x: inputs [G, S, ...], G routing groups of S tokens.
    mask: routing decision [G, S] (bool or float {0, 1}); no gradient flows through it.
    method: one of `METHODS` (static).
    capacity_factor: `capacity` only: C = ceil(capacity_factor·P·S) slots per group.
    target_density: P (static); sets C, and the default gsize.
    gsize: `grouped` only: chunk size (default `default_gsize(S, P)`).

  Returns:
    `Dispatched(output, mask, metrics)`: output [G, S, ...out] zero where not computed, the
    effective mask (dropped tokens 0), and float32 scalar metrics.
  """
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask shape {mask.shape} must be x.shape[:2] = {x.shape[:2]}")
  in_dtype = mask.dtype
  m = jax.lax.stop_gradient(mask).astype(bool)
  s = m.shape[1]
  if method == "masked":
    out, kept, metrics = masked_dispatch(branch_fn, x, m)
  elif method == "capacity":
    out, kept, metrics = capacity_dispatch(
        branch_fn, x, m, capacity_slots(s, target_density, capacity_factor))
  elif method == "grouped":
    out, kept, metrics = grouped_dispatch(
        branch_fn, x, m, gsize or default_gsize(s, target_density))
  else:
    raise ValueError(f"unknown dispatch method {method!r}; known: {METHODS}")
  return Dispatched(out, kept.astype(in_dtype), metrics)


def gated_layer_output(x: Array, layer_out: Array, gate: Gate,
                       mask: Optional[Array] = None) -> Array:
  """LtS Eq. 1/4 (whole-layer SkipLayer): y = m·scale_on·F(x) + (1 − m)·scale_off·x.

  Args:
    x: layer input [..., d].
    layer_out: F(x) [..., d] where routed (e.g. `dispatch(...).output`; its value elsewhere is
      irrelevant only if it is finite).
    gate: the router's `Gate` (token shape [...]).
    mask: effective mask from `dispatch` (default `gate.mask`). Tokens the router chose but the
      dispatcher dropped pass x through unchanged (coefficient 1, no gate gradient).
  """
  m_gate = jax.lax.stop_gradient(gate.mask).astype(jnp.float32)
  m = m_gate if mask is None else jax.lax.stop_gradient(mask).astype(jnp.float32)
  on = m * gate.scale_on
  off = (1.0 - m_gate) * gate.scale_off + (m_gate - m)
  dtype = jnp.result_type(x.dtype, layer_out.dtype)
  return (_expand(on, layer_out).astype(dtype) * layer_out
          + _expand(off, x).astype(dtype) * x)


def gated_residual(x: Array, residual_out: Array, gate: Gate,
                   mask: Optional[Array] = None) -> Array:
  """Residual-branch skipping (DESIGN: y = x + m ⊙ R(x)): y = x + m·scale_on·R(x).

  The gate's gradient comes from routed tokens only (through scale_on); skipped and dropped
  tokens are exactly x. `mask` is the effective mask from `dispatch` (default `gate.mask`).
  """
  m = gate.mask if mask is None else mask
  on = jax.lax.stop_gradient(m).astype(jnp.float32) * gate.scale_on
  dtype = jnp.result_type(x.dtype, residual_out.dtype)
  return x + _expand(on, residual_out).astype(dtype) * residual_out
