"""Dispatch: turning a routing mask into saved compute, with static shapes (LtS §2.2, Alg. 1).

Layout. `dispatch` takes x [B, T, ...] and mask [B, T] and routes within routing groups
(skipjax/routing/groups.py): `group_size` = 0 makes every batch row a group (S = T), a divisor of
T cuts rows into pieces, a multiple of T pools whole rows (LtS pools the batch, Gsize ∝ P·B·T).
Internally x is viewed as [G, S, ...], G groups of S tokens. The branch is called as

    branch_fn(x_sel [G, C, ...], idx_sel [G, C] int32, valid [G, C] bool) -> [G, C, ...out]

where `idx_sel` are the tokens' ORIGINAL positions within their group (attention builds the
causal mask from them against keys it computes from the full sequence, by closure; LtS Alg. 1:
K/V for every token, Q only for routed ones; such row branches need `group_size` 0) and
`valid` marks real (not padding) slots. Padding slots get x_sel = 0, idx_sel = 0, and their
outputs are discarded. `dispatch_layer` routes a whole layer: its attention per row, its FFN
over the groups (see there).

Methods (identical forward values and gradients when no token is dropped):

  `masked`    the branch runs on all S tokens (C = S, idx = arange, valid = mask); outputs at
              unrouted positions are zeroed. Reference; cost = dense.
  `capacity`  routed tokens get slots by cumsum; the first C = ceil(capacity_factor·P·S) of each
              group are gathered to [G, C, ...], computed and scattered back; later ones overflow:
              they are dropped (effective mask 0) and counted. With token validity (`valid`,
              padding), C stays static but a group keeps at most ⌈capacity_factor·P·n_valid⌉,
              so a sequence's drops do not depend on how far the batch is padded.
  `grouped`   LtS §2.2 "Gsize": routed tokens of each group are compacted into ceil(S/gsize)
              chunks of gsize slots. Chunk 0 runs unconditionally (it is empty only if no token
              at all is routed; running it outside any transform also gives the output shape and
              lets Flax create the branch's params); chunks 1.. run in a `lax.scan` whose body is
              a `lax.cond`: iteration k computes chunk k of EVERY group at once ([G, gsize, ...])
              and is skipped when chunk k is empty in all groups. Nothing is dropped; the cost
              follows max_g ceil(routed_g / gsize); gradients flow through scan + cond.
              Note: vmapping over `grouped` turns the cond into a select (both branches run);
              put all groups on axis 0 instead.

Padding (`valid` = 0) is never routed, by any method.

Flax: a branch that calls bound linen submodules works with every method in `apply`; in `init`,
the params are created by the first (unconditional) call, outside scan/cond. A branch must not
write variables (sow) inside `grouped`'s scan/cond, where the written tracer would leak: pass
`traced_branch_fn`, the same branch built so that it writes nothing (the Block runs it on a
functional copy of itself), for chunks 1..; only chunk 0 then sows.

Outputs are zero at unrouted/dropped positions, and because they are selected with `where`,
those positions send no gradient into the branch. `mask` itself carries no gradient: the gate's
gradient enters through `gated_layer_output` / `gated_residual`, which need the *effective* mask
returned here (dropped tokens pass x through unchanged).
"""
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from skipjax.routing.groups import (capacity_slots, default_gsize, fit_group_size, from_routing_groups,
                                    row_gsize, to_routing_groups)
from skipjax.routing.routers import Gate

Array = jnp.ndarray
BranchFn = Callable[[Array, Array, Array], Array]

METHODS = ("masked", "capacity", "grouped")


class Dispatched(NamedTuple):
  """Result of `dispatch`.

  Attributes:
    output: branch output scattered back to the input's [B, T, ...out] ([G, S, ...] for the
      per-group functions); 0 at unrouted/dropped positions.
    mask: effective mask, the input mask's shape and dtype, with dropped tokens (and padding) 0.
    metrics: float32 scalars `routed_fraction` (effective), `dropped_tokens`, `dropped_fraction`
      (of routed tokens), `compute_fraction` (token slots computed / G·S); `dispatch_layer` adds
      `row_compute_fraction` (its per-row attention part; `compute_fraction` is the FFN's).
  """
  output: Array
  mask: Array
  metrics: Dict[str, Array]


def _expand(m: Array, like: Array) -> Array:
  """m [G, C] broadcastable against like [G, C, ...]."""
  return m.reshape(m.shape + (1,) * (like.ndim - m.ndim))


def _compact(mask: Array, num_slots: int, limit: Optional[Array] = None):
  """Slot assignment by cumsum (LtS §2.2 step 2).

  `limit` [G] int32 (optional, ≤ num_slots): group g keeps only its first limit[g] routed tokens.

  Returns:
    kept [G, S] bool (routed and within the first `num_slots`), slot [G, S] int32 (the token's
    slot, `num_slots` if not kept), idx [G, num_slots] int32 (original position of each slot's
    token, 0 for padding slots), valid [G, num_slots] bool.
  """
  g, s = mask.shape
  position = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  kept = mask & (position < num_slots)
  if limit is not None:
    kept &= position < limit[:, None]
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


def capacity_limit(valid: Array, target_density: float, capacity_factor: float) -> Array:
  """Per-group capacity over the real tokens: ⌈capacity_factor·P·n_valid⌉ [G] int32, n_valid = Σ valid.

  A full group gets exactly `capacity_slots(S)`; otherwise the float32 product (rounded down
  to an integer within 1e-6 relative, as `capacity_slots` forgives 1e-9), clipped to [0, C].
  """
  s = valid.shape[1]
  c = capacity_slots(s, target_density, capacity_factor)
  n = jnp.sum(valid, axis=1, dtype=jnp.int32)
  ideal = jnp.float32(capacity_factor * target_density) * n.astype(jnp.float32) * jnp.float32(1 - 1e-6)
  return jnp.where(n == s, c, jnp.clip(jnp.ceil(ideal).astype(jnp.int32), 0, c))


def capacity_dispatch(branch_fn: BranchFn, x: Array, mask: Array, num_slots: int,
                      limit: Optional[Array] = None):
  """Capacity gather: the first `num_slots` routed tokens per group by cumsum (at most limit[g]
  in group g, see `capacity_limit`); overflow dropped."""
  kept, slot, idx, valid = _compact(mask, num_slots, limit)
  out_sel = _run_branch(branch_fn, x, idx, valid)
  rows = jnp.arange(x.shape[0])[:, None]
  out = out_sel[rows, jnp.minimum(slot, num_slots - 1)]
  out = jnp.where(_expand(kept, out), out, jnp.zeros((), out.dtype))
  return out, kept, _metrics(mask, kept, mask.shape[0] * num_slots)


def grouped_dispatch(branch_fn: BranchFn, x: Array, mask: Array, gsize: int,
                     traced_branch_fn: Optional[BranchFn] = None):
  """LtS §2.2 Gsize: compacted chunks [n_chunks, G, gsize]; scan over chunks, cond skips empty.

  Chunks 1.. run `traced_branch_fn` (default `branch_fn`): inside the scan/cond it must write no
  Flax variables (see the module docstring).
  """
  traced_branch_fn = traced_branch_fn or branch_fn
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
      out = jax.lax.cond(active, lambda: _run_branch(traced_branch_fn, x, chunk_idx, chunk_valid),
                         lambda: zeros)
      return count + active.astype(jnp.float32) * (g * gsize), out

    computed, rest = jax.lax.scan(body, computed, (idx[1:], valid[1:]))
    chunks = jnp.concatenate([chunks, rest], axis=0)

  rows = jnp.arange(g)[:, None]
  slot = jnp.minimum(slot, n_chunks * gsize - 1)
  out = chunks[slot // gsize, rows, slot % gsize]
  out = jnp.where(_expand(kept, out), out, jnp.zeros((), out.dtype))
  return out, kept, _metrics(mask, kept, computed)


def topk_indices(scores: Array, num_slots: int, valid: Optional[Array] = None,
                 row_slots: Optional[Array] = None):
  """Expert-choice selection (Mixture-of-Depths, Raposo et al. 2024): the `num_slots` highest
  scores of each group, in causal (original position) order.

  Args:
    scores: [G, S] router weights (no gradient flows through the selection).
    num_slots: static C.
    valid: optional [G, S]; tokens with 0 (padding) are never selected.
    row_slots: optional [G] int, C_g ≤ C: only the top C_g of group g count as selected.

  Returns:
    idx [G, C] int32 sorted ascending (original positions), ok [G, C] bool (selected: among the
    top C_g and valid; False slots hold a padding or below-capacity token and are discarded).
  """
  s = jax.lax.stop_gradient(scores).astype(jnp.float32)
  if valid is not None:
    s = jnp.where(valid.astype(bool), s, -jnp.inf)
  top, idx = jax.lax.top_k(s, num_slots)  # [G, C] by descending score
  ok = top > -jnp.inf
  if row_slots is not None:
    ok &= jnp.arange(num_slots)[None, :] < row_slots[:, None]
  order = jnp.argsort(idx, axis=1)  # causal order of the selected tokens
  idx = jnp.take_along_axis(idx, order, axis=1).astype(jnp.int32)
  return idx, jnp.take_along_axis(ok, order, axis=1)


def topk_dispatch(branch_fn: BranchFn, x: Array, scores: Array, num_slots: int,
                  valid: Optional[Array] = None, row_slots: Optional[Array] = None) -> "Dispatched":
  """Mixture-of-Depths expert-choice dispatch: per group, gather the top-`num_slots` tokens by
  score (sorted by position), run the branch on [G, C, ...] and scatter back.

  Unlike the mask-driven methods, the scores decide the mask: exactly C (C_g with `row_slots`)
  tokens per group run, none overflow. The branch sees the tokens' original positions (`idx`)
  as with every method, so attention masks and RoPE use them. See `topk_indices` for the args.

  Returns:
    `Dispatched(output [G, S, ...] zero at unselected positions, mask [G, S] float32 top-k
    membership, metrics)` with `compute_fraction` = C/S.
  """
  if scores.shape != x.shape[:2]:
    raise ValueError(f"scores shape {scores.shape} must be x.shape[:2] = {x.shape[:2]}")
  idx, ok = topk_indices(scores, num_slots, valid, row_slots)
  out_sel = _run_branch(branch_fn, x, idx, ok)  # [G, C, ...]
  g = x.shape[0]
  rows = jnp.arange(g)[:, None]
  out = jnp.zeros((g, x.shape[1]) + out_sel.shape[2:], out_sel.dtype).at[rows, idx].add(out_sel)
  kept = jnp.zeros(x.shape[:2], bool).at[rows, idx].max(ok)
  return Dispatched(out, kept.astype(jnp.float32), _metrics(kept, kept, g * num_slots))


def _routing_mask(x: Array, mask: Array, valid: Optional[Array]):
  """(bool mask without gradient, bool validity or None); padding (valid = 0) is never routed."""
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask shape {mask.shape} must be x.shape[:2] = {x.shape[:2]}")
  m = jax.lax.stop_gradient(mask).astype(bool)
  if valid is None:
    return m, None
  if valid.shape != mask.shape:
    raise ValueError(f"valid shape {valid.shape} must be the mask's {mask.shape}")
  valid = jax.lax.stop_gradient(valid).astype(bool)
  return m & valid, valid


def _run_method(branch_fn: BranchFn, x: Array, m: Array, method: str, *, num_slots: int = 0,
                limit: Optional[Array] = None, gsize: int = 1,
                traced_branch_fn: Optional[BranchFn] = None):
  """One method on groups x [G, S, ...], m [G, S] bool -> (out, kept, metrics)."""
  if method == "masked":
    return masked_dispatch(branch_fn, x, m)
  if method == "capacity":
    return capacity_dispatch(branch_fn, x, m, num_slots, limit)
  if method == "grouped":
    return grouped_dispatch(branch_fn, x, m, gsize, traced_branch_fn)
  raise ValueError(f"unknown dispatch method {method!r}; known: {METHODS}")


def dispatch(branch_fn: BranchFn, x: Array, mask: Array, *, method: str = "masked",
             capacity_factor: float = 1.25, target_density: float = 0.5,
             gsize: Optional[int] = None, group_size: int = 0, valid: Optional[Array] = None,
             traced_branch_fn: Optional[BranchFn] = None) -> Dispatched:
  """LtS §2.2 / Alg. 1: run `branch_fn` only on the routed tokens of x [B, T, ...].

  Args:
    branch_fn: (x_sel [G, C, ...], idx_sel [G, C], valid [G, C]) -> [G, C, ...out]; see module
      docstring. Must be pure in its array arguments (closing over params / full-sequence K/V is
      fine).
    x: inputs [B, T, ...].
    mask: routing decision [B, T] (bool or float {0, 1}); no gradient flows through it.
    method: one of `METHODS` (static).
    capacity_factor: `capacity` only: C = ceil(capacity_factor·P·S) slots per group.
    target_density: P (static); sets C, and the default gsize.
    gsize: `grouped` only: chunk size within a group (default `default_gsize(S, P)`).
    group_size: tokens per routing group (`groups.fit_group_size`; 0: one row). A branch that
      reads `idx_sel` as a position in its row (attention) needs 0.
    valid: optional [B, T] token validity (0: padding): padding is never routed, and `capacity`
      keeps at most ⌈capacity_factor·P·n_valid⌉ tokens of a group (`capacity_limit`).
    traced_branch_fn: `grouped` only: the branch for the chunks inside scan/cond (writes nothing).

  Returns:
    `Dispatched(output, mask, metrics)`: output [B, T, ...out] zero where not computed, the
    effective mask (dropped tokens 0), and float32 scalar metrics.
  """
  in_dtype = mask.dtype
  m, valid = _routing_mask(x, mask, valid)
  b, t = m.shape
  s = fit_group_size(b, t, group_size)
  xg, mg = to_routing_groups(x, s), to_routing_groups(m, s)
  limit = None
  if method == "capacity" and valid is not None:
    limit = capacity_limit(to_routing_groups(valid, s), target_density, capacity_factor)
  out, kept, metrics = _run_method(
      branch_fn, xg, mg, method, num_slots=capacity_slots(s, target_density, capacity_factor), limit=limit,
      gsize=gsize or default_gsize(s, target_density), traced_branch_fn=traced_branch_fn)
  return Dispatched(from_routing_groups(out, t), from_routing_groups(kept, t).astype(in_dtype), metrics)


def dispatch_layer(row_fn: Optional[BranchFn], point_fn: Optional[BranchFn], x: Array, mask: Array, *,
                   method: str = "masked", capacity_factor: float = 1.25, target_density: float = 0.5,
                   gsize: Optional[int] = None, group_size: int = 0, valid: Optional[Array] = None,
                   traced_row_fn: Optional[BranchFn] = None,
                   traced_point_fn: Optional[BranchFn] = None) -> Dispatched:
  """LtS §2.3 / Alg. 1: a routed layer F(x) = point_fn(row_fn(x)) on the routed tokens of x [B, T, ...].

  The attention part `row_fn` (x ↦ h = x + Attn(x)) needs the K/V of its token's row, so it is
  dispatched per batch row; the pointwise part `point_fn` (h ↦ h + FFN(h)), most of the layer's
  FLOPs, is dispatched over the routing groups of `group_size` tokens (LtS §2.2 pools the batch).
  The FFN runs on exactly the tokens whose attention ran: its mask is the row dispatch's
  effective mask, and h is zero elsewhere. Exact: every output is a `where`-selection of the
  branch applied to its own token, as in `masked`, so values and gradients equal the masked
  reference when nothing is dropped. Either part may be None (a branch the plan leaves off).

  Slots and chunks, with S_group tokens per group (`fit_group_size`) and u = min(S_group, T):
    `capacity`: drops are decided first, per unit of u tokens (C_u = ⌈capacity_factor·P·u⌉,
      ⌈capacity_factor·P·n_valid⌉ with `valid`); the attention gets (T/u)·C_u slots per row and
      the FFN (S_group/u)·C_u per group, so neither drops anything beyond that decision. (A
      query's row must be its group's for the static shapes, so whole-row groups pool the FFN's
      compute but not the drop decision; pieces of a row pool neither more nor less.)
    `grouped`: the FFN's chunks are `gsize` slots of a group; the attention's are a row's share
      of them, `row_gsize` = ⌈gsize·T/S_group⌉. Nothing is dropped.
    `masked`: both parts on every token.

  Args: as `dispatch`; `row_fn` / `point_fn` are branches (x_sel, idx_sel, valid) -> out (idx_sel:
  positions in the row for `row_fn`, in the group for `point_fn`); `traced_*` their write-nothing
  versions for `grouped`'s scan/cond.

  Returns:
    `Dispatched(F(x) [B, T, ...] zero where not computed, effective mask, metrics)`; metrics add
    `row_compute_fraction` (attention query slots / tokens; 0 without `row_fn`) and report the
    FFN's `compute_fraction` (the attention's without `point_fn`).
  """
  if row_fn is None and point_fn is None:
    raise ValueError("dispatch_layer needs a row_fn or a point_fn")
  in_dtype = mask.dtype
  m, valid = _routing_mask(x, mask, valid)
  b, t = m.shape
  s = fit_group_size(b, t, group_size)
  gsize = min(gsize or default_gsize(s, target_density), s)
  row_slots = point_slots = 0
  routed = m
  if method == "capacity":
    u = min(s, t)
    c_u = capacity_slots(u, target_density, capacity_factor)
    limit = None if valid is None else capacity_limit(to_routing_groups(valid, u), target_density, capacity_factor)
    kept_u = _compact(to_routing_groups(m, u), c_u, limit)[0]
    m = from_routing_groups(kept_u, t)
    row_slots, point_slots = (t // u) * c_u, (s // u) * c_u
  h, kept, row_fraction = x, m, jnp.zeros((), jnp.float32)
  if row_fn is not None:
    h, kept, row_metrics = _run_method(row_fn, x, m, method, num_slots=row_slots, gsize=row_gsize(gsize, t, s),
                                       traced_branch_fn=traced_row_fn)
    row_fraction = row_metrics["compute_fraction"]
    metrics = row_metrics
  if point_fn is not None:
    out, kept, metrics = _run_method(
        point_fn, to_routing_groups(h, s), to_routing_groups(kept, s), method, num_slots=point_slots,
        gsize=gsize, traced_branch_fn=traced_point_fn)
    out, kept = from_routing_groups(out, t), from_routing_groups(kept, t)
  else:
    out = h
  metrics = dict(_metrics(routed, kept, 0), compute_fraction=metrics["compute_fraction"],
                 row_compute_fraction=row_fraction)
  return Dispatched(out, kept.astype(in_dtype), metrics)


GATE_FORMS = ("paper", "residual")


def gated_layer_output(x: Array, layer_out: Array, gate: Gate,
                       mask: Optional[Array] = None, form: str = "paper") -> Array:
  """Whole-layer SkipLayer output from the layer's F(x) and the router's gate.

  `form='paper'`, LtS Eq. 1/4: y = m·scale_on·F(x) + (1 − m)·scale_off·x. The router's gradient
  is s₀s₁⟨dy, F(x)⟩ for routed and −s₀s₁⟨dy, x⟩ for skipped tokens (ST-Gumbel, τ = 1), which
  carries no "does this layer help" signal: F(x) = x + R(x) is dominated by x.

  `form='residual'`: y = x + m·scale_on·(F(x) − x), i.e. the layer's residual
  R_layer(x) = F(x) − x scaled by g₁ (the soft relaxation y = x + s₁·R(x) of LtS §2.1). For
  `gumbel` the forward value is exactly the paper's (g₁ = m bit-exactly); the router gradient of
  a routed token is s₀s₁⟨dy, R(x)⟩, the relaxation's, and a skipped token sends none (its R is
  not computed). For `top1` / `sigmoid` the forward differs from Eq. 4: a skipped token is x
  (not g₀·x) and a routed one x + g₁·R(x).

  Args:
    x: layer input [..., d].
    layer_out: F(x) [..., d] where routed (e.g. `dispatch(...).output`; its value elsewhere is
      irrelevant only if it is finite).
    gate: the router's `Gate` (token shape [...]).
    mask: effective mask from `dispatch` (default `gate.mask`). Tokens the router chose but the
      dispatcher dropped pass x through unchanged (coefficient 1, no gate gradient).
    form: one of `GATE_FORMS` (static).
  """
  m_gate = jax.lax.stop_gradient(gate.mask).astype(jnp.float32)
  m = m_gate if mask is None else jax.lax.stop_gradient(mask).astype(jnp.float32)
  dtype = jnp.result_type(x.dtype, layer_out.dtype)
  if form == "residual":
    # m·F + (1 − m)·x + m·(g₁ − 1)·(F − x) = x + m·g₁·(F − x); written so that g₁ = 1 (a hard
    # ST-Gumbel sample) gives F bit-exactly.
    hard = _expand(m, x).astype(dtype)
    extra = _expand(m * (gate.scale_on - 1.0), x).astype(dtype)
    return hard * layer_out + (1 - hard) * x + extra * (layer_out - x)
  if form != "paper":
    raise ValueError(f"unknown gate form {form!r}; known: {GATE_FORMS}")
  on = m * gate.scale_on
  off = (1.0 - m_gate) * gate.scale_off + (m_gate - m)
  return (_expand(on, layer_out).astype(dtype) * layer_out
          + _expand(off, x).astype(dtype) * x)


def gated_residual(x: Array, residual_out: Array, gate: Gate,
                   mask: Optional[Array] = None) -> Array:
  """Residual-branch skipping (DESIGN: y = x + m ⊙ R(x)): y = x + m·scale_on·R(x).

  This is already the residual form of a gate: the gradient reaches the router from routed
  tokens only, as s₀s₁⟨dy, R(x)⟩ (ST-Gumbel); skipped and dropped tokens are exactly x.
  `mask` is the effective mask from `dispatch` (default `gate.mask`).
  """
  m = gate.mask if mask is None else mask
  on = jax.lax.stop_gradient(m).astype(jnp.float32) * gate.scale_on
  dtype = jnp.result_type(x.dtype, residual_out.dtype)
  return x + _expand(on, residual_out).astype(dtype) * residual_out


def gated_highway(x: Array, h: Array, gate: Gate, mask: Optional[Array] = None) -> Array:
  """Highway layer (Srivastava et al. 2015): y = T·H(x) + (1 − T)·x.

  T = `gate.scale_on` (σ of the router logits, `highway_gate`). H is the transform: the branch
  output R(x) for a residual block (attention / FFN), the whole layer's output F(x) at layer
  granularity. Every token computes H (the gate's mask is 1); a token a dispatcher dropped
  (effective `mask` 0) passes x through. Computed as x + m·T·(H − x), the same value.
  """
  m = gate.mask if mask is None else mask
  t = jax.lax.stop_gradient(m).astype(jnp.float32) * gate.scale_on
  dtype = jnp.result_type(x.dtype, h.dtype)
  return x + _expand(t, h).astype(dtype) * (h - x)
