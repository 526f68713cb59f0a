"""Walking an execution plan (skipjax/depth/plan.py) over the blocks of a stack.

Position p of the plan runs the Block of parameter slot `plan[p].slot` (module `block_{slot}`,
so positions that share a slot share its parameters and their gradients add up) with only the
branches that are on. Per-layer behaviour that belongs to the weights (FlipReLU's layer index)
follows the slot; the decoding KV cache belongs to the position (one per repetition of a slot).
"""
from typing import Any, Callable, Mapping

import flax.linen as nn

from skipjax.depth import plan as plan_lib
from skipjax.models import layout
from skipjax.models.block import Block
from skipjax.models.config import TransformerConfig

# Static positional index of `branches` in Block.__call__ (self = 0), for nn.remat.
_BRANCHES_ARGNUM = 6


def check_overrides(overrides: Mapping[str, Any], cfg: TransformerConfig) -> None:
  """A `gate_override` collection must name blocks the plan runs, in the model's layout."""
  if not overrides:
    return
  if cfg.scan_layers:
    if set(overrides) != {layout.SCAN_KEY}:
      raise ValueError(f"gate_override keys {sorted(overrides)} do not match scan_layers=True: give them in the "
                       "scan layout {'layers': {'block': {...: [L, B, T]}}} (skipjax.models.layout.to_scan)")
    return
  plan = cfg.execution_plan
  on = {}
  for e in plan:
    attn, ffn = on.get(e.slot, (False, False))
    on[e.slot] = (attn or e.attn, ffn or e.ffn)
  for key, names in overrides.items():
    slot = key[len(layout.PREFIX):] if key.startswith(layout.PREFIX) else ""
    if not slot.isdigit() or int(slot) not in on:
      raise ValueError(f"gate_override {key!r} matches no block: the plan runs blocks "
                       f"{[layout.block_name(s) for s in sorted(on)]} (config.model.plan={cfg.plan!r})")
    attn, ffn = on[int(slot)]
    off = [n for n in names if (n == "attn" and not attn) or (n == "ffn" and not ffn)]
    if off:
      raise ValueError(f"gate_override {key}/{off[0]} matches no gate: the plan never runs that branch "
                       f"(config.model.plan={cfg.plan!r})")


def walk(cfg: TransformerConfig, deterministic: bool, x, call: Callable) -> Any:
  """x through the plan's positions; `call(block, x, entry, repeat)` runs one position.

  Must be called from a compact method (the blocks are created here, named `block_{slot}`).
  """
  block_cls = nn.remat(Block, static_argnums=(_BRANCHES_ARGNUM,)) if cfg.remat else Block
  blocks = {}
  plan = cfg.execution_plan
  for entry, repeat in zip(plan, plan_lib.occurrences(plan)):
    if entry.slot not in blocks:
      blocks[entry.slot] = block_cls(cfg, deterministic, name=layout.block_name(entry.slot))
    x = call(blocks[entry.slot], x, entry, repeat)
  return x
