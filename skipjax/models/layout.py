"""The one mapping between the two layouts of per-layer trees (DESIGN.md).

Loop layout: one subtree per parameter slot, `{'block_0': t0, 'block_1': t1, …}`.
Scan layout (`scan_layers=True`): `{'layers': {'block': t}}`, every leaf of t stacked along a
leading layer axis. Keys that are not per-layer (embeddings, final norm, …) pass through.
Works for any variable collection (params, gate_override, sown stats / gates).
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

PREFIX = "block_"
SCAN_KEY, SCAN_BLOCK = "layers", "block"


def block_name(slot: int) -> str:
  return f"{PREFIX}{slot}"


def is_scan(tree: Mapping[str, Any]) -> bool:
  return SCAN_KEY in tree


def slots(tree: Mapping[str, Any]) -> List[int]:
  """Slot indices present in a loop-layout tree, ascending."""
  return sorted(int(k[len(PREFIX):]) for k in tree if k.startswith(PREFIX) and k[len(PREFIX):].isdigit())


def to_scan(tree: Mapping[str, Any], num_layers: Optional[int] = None) -> Dict[str, Any]:
  """Loop → scan layout: `block_0 … block_{L−1}` stacked into `layers/block` ([L, …] leaves)."""
  if is_scan(tree):
    return dict(tree)
  present = slots(tree)
  n = len(present) if num_layers is None else num_layers
  if present != list(range(n)):
    raise ValueError(f"the scan layout needs blocks block_0 … block_{n - 1}, the tree has {present}")
  out = {k: v for k, v in tree.items() if not (k.startswith(PREFIX) and k[len(PREFIX):].isdigit())}
  if n:
    out[SCAN_KEY] = {SCAN_BLOCK: jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[block_name(i)] for i in range(n)])}
  return out


def to_loop(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """Scan → loop layout: `layers/block` ([L, …] leaves) split into `block_0 … block_{L−1}`."""
  if not is_scan(tree):
    return dict(tree)
  stacked = tree[SCAN_KEY][SCAN_BLOCK]
  n = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in tree.items() if k != SCAN_KEY}
  for i in range(n):
    out[block_name(i)] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out


def to_layout(tree: Mapping[str, Any], scan: bool) -> Dict[str, Any]:
  """The tree in the layout a model with `scan_layers=scan` reads."""
  return to_scan(tree) if scan else to_loop(tree)


def blocks(tree: Mapping[str, Any]) -> Dict[int, Any]:
  """{slot: subtree} of the per-layer entries (either layout; scan: only for param-like trees)."""
  loop = to_loop(tree)
  return {i: loop[block_name(i)] for i in slots(loop)}


def sown_names(tree: Mapping[str, Any]) -> List[str]:
  """Names sown by the blocks of a per-layer collection (loop or scan layout), sorted."""
  if is_scan(tree):
    return sorted(tree[SCAN_KEY][SCAN_BLOCK])
  return sorted({name for key, block in tree.items() if key.startswith(PREFIX) for name in block})


def _branch_on(entry, name: str) -> bool:
  """Whether a position with this plan entry sows `name` (attn_* / ffn_* / layer_* values)."""
  if name.startswith("attn_"):
    return entry.attn
  if name.startswith("ffn_"):
    return entry.ffn
  return entry.runs


def per_layer(tree: Mapping[str, Any], name: str, plan: Optional[Sequence[Any]] = None,
              fill: Optional[float] = None) -> jnp.ndarray:
  """Stack sown value `name` of every layer into [num_layers, ...] (loop or scan layout).

  Without a plan: one row per block, in slot order (first sown value of each). With a plan
  (`skipjax.depth.plan`): one row per depth position that sowed it, in execution order (a slot
  run at several positions sows once per position); positions whose branch is off give a row of
  `fill`, or no row when `fill` is None.
  """
  if is_scan(tree):
    return jnp.asarray(tree[SCAN_KEY][SCAN_BLOCK][name][0])
  if plan is None:
    return jnp.stack([tree[block_name(i)][name][0] for i in slots(tree)])
  seen: Dict[int, int] = {}
  rows, missing = [], []
  for p, entry in enumerate(plan):
    if not _branch_on(entry, name):
      missing.append(len(rows))
      rows.append(None)
      continue
    k = seen.get(entry.slot, 0)
    seen[entry.slot] = k + 1
    rows.append(jnp.asarray(tree[block_name(entry.slot)][name][k]))
  present = [r for r in rows if r is not None]
  if fill is None or not missing:
    return jnp.stack(present)
  like = present[0] if present else None
  if like is None:
    raise ValueError(f"no position of the plan sowed {name!r}")
  return jnp.stack([r if r is not None else jnp.full_like(like, fill) for r in rows])
