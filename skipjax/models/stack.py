"""Walking an execution plan (skipjax/depth/plan.py) over the blocks of a stack.

Position p of the plan runs the Block of parameter slot `plan[p].slot` (module `block_{slot}`,
so positions that share a slot share its parameters and their gradients add up) with only the
branches that are on. Per-layer behaviour that belongs to the weights (FlipReLU's layer index)
follows the slot; the decoding KV cache belongs to the position (one per repetition of a slot).

LayerDrop (Fan et al. 2019 §3; per-position rates as LayerSkip, Elhoushi et al. 2024 §4.1) is a
stochastic decision on a whole plan position, like a gate: `layerdrop_keep` draws m_p ∈ {0, 1}
for every position p (per sequence, or once per batch) from the 'layerdrop' rng, sows it as
`gates/layerdrop_keep` [P, B], and `run_or_skip` gives y = m_p·F_p(x) + (1 − m_p)·x (y = the
block with no branch on for post-LN with `post_ln_skip='ln'`, as Block._skipped). With
`unit='batch'` a dropped position runs under `nn.cond` and costs nothing. The decisions are drawn
up front, so the loop and the scanned layout take the same ones for the same rng.

FF weights tied across layers (SS §3.1, `config.ffn.tied`) are one shared slot above the blocks:
`tied_ffn_kernels` creates the `ffn_tied` kernels once (beside `block_*`, outside the per-layer
layout) and every block, at every plan position, computes its FFN with them and its own biases,
so their gradient is the sum over the positions that ran.
"""
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipjax.depth import plan as plan_lib
from skipjax.layers import TiedKernels
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


TIED_FFN = "ffn_tied"


def tied_ffn_kernels(cfg: TransformerConfig) -> Optional[Mapping[str, jnp.ndarray]]:
  """SS §3.1: the FF1 / FF2 (/ gate) kernels every block shares, or None when `ffn.tied` is off.

  Call from the compact method that creates the blocks: the kernels live in its `ffn_tied`.
  """
  if not cfg.ffn.tied:
    return None
  return TiedKernels(cfg.d_model, cfg.d_ff, cfg.mlp_gated, name=TIED_FFN)()


def ffn_params(params: Mapping[str, Any], slot: int) -> Mapping[str, Any]:
  """The FFN params of block `slot` of a loop-layout tree in the untied MLP layout
  ({'wi': {'kernel', 'bias'}, ...}): a tied model's shared kernels (`ffn_tied`) filled in."""
  mlp = params[layout.block_name(slot)]["mlp"]
  tied = params.get(TIED_FFN)
  if tied is None:
    return mlp
  return {name: {**mlp.get(name, {}), "kernel": tied[name]["kernel"]} for name in tied}


LAYERDROP_RNG = "layerdrop"
LAYERDROP_KEEP = "layerdrop_keep"
# Collections that a block sows only when it runs: lax.cond needs the same variables in both branches.
# (routed / oracle blocks, which sow gates and aux losses, are refused by TransformerConfig)
_SOWN_IN_BRANCH = ("stats", "activations", "intermediates")


def layerdrop_keep(parent: nn.Module, cfg: TransformerConfig, deterministic: bool, batch: int,
                   decode: bool = False) -> Optional[jnp.ndarray]:
  """LayerDrop decisions m [P, B] (1: position p runs for sequence b), or None when nothing drops.

  Drops only in training (deterministic=False) or with `layerdrop.at_inference`; never at init
  and never while decoding with the KV cache (`at_inference` is refused there).
  """
  ld = cfg.layerdrop
  rates = ld.position_rates(len(cfg.execution_plan))
  if not any(rates) or (deterministic and not ld.at_inference) or parent.is_initializing():
    return None
  if decode:
    if ld.at_inference:
      raise ValueError("config.model.layerdrop.at_inference=True is not supported with KV-cache decoding "
                       "(decode=True): use at_inference=False, or a static plan (config.model.plan)")
    return None
  if not parent.has_rng(LAYERDROP_RNG):
    raise ValueError(f"config.model.layerdrop is active (rates {[round(r, 4) for r in rates]}) but apply() got no "
                     f"'{LAYERDROP_RNG}' rng: pass rngs={{'{LAYERDROP_RNG}': key, ...}}")
  draws = batch if ld.unit == "example" else 1
  u = jax.random.uniform(parent.make_rng(LAYERDROP_RNG), (len(rates), draws))  # [P, B | 1]
  keep = (u >= jnp.asarray(rates, jnp.float32)[:, None]).astype(jnp.float32)   # P(m_p = 0) = p_p
  keep = jnp.broadcast_to(keep, (len(rates), batch))
  parent.sow("gates", LAYERDROP_KEEP, keep)
  return keep


def sown_keep(gates: Mapping[str, Any]) -> Optional[jnp.ndarray]:
  """The sown LayerDrop decisions [P, B] of an apply's `gates` collection (None: none drawn)."""
  value = gates.get(LAYERDROP_KEEP) if gates else None
  return None if value is None else jnp.asarray(value[0])


def run_or_skip(cfg: TransformerConfig, parent: nn.Module, keep: Optional[jnp.ndarray], block: nn.Module, x,
                run: Callable, skip: Callable):
  """One position under LayerDrop: run(block, x) where keep [B] is 1, skip(block, x) where 0."""
  if keep is None:
    return run(block, x)
  if cfg.layerdrop.unit == "example":
    return jnp.where(keep[:, None, None] > 0, run(block, x), skip(block, x))  # [B, T, d]
  sown = [c for c in _SOWN_IN_BRANCH if parent.is_mutable_collection(c)]
  sown += ["gate_override"] if parent.variables.get("gate_override") else []
  if sown:
    raise ValueError(f"config.model.layerdrop.unit='batch' skips a position under lax.cond, which cannot sow "
                     f"{sown[0]!r}: use unit='example' for this apply")
  return nn.cond(keep[0] > 0, run, skip, block, x)


def skip_runs_norms(cfg: TransformerConfig) -> bool:
  """A dropped position is y = x, except post-LN with post_ln_skip='ln': the block with no branch on."""
  return cfg.norm == "post" and cfg.post_ln_skip == "ln"


class Position(NamedTuple):
  """One plan position as a depth hook sees it (`walk(..., hook=)`; e.g. early-exit decoding).

  position: p, its index in the plan; entry / repeat: its PlanEntry and repetition k of the slot;
  block: the bound Block; run(block, x): the position's ordinary forward or decoding step;
  index: the KV-cache slot of the first token while decoding (None for a full forward).
  """
  position: int
  entry: Any
  repeat: int
  block: nn.Module
  run: Callable
  index: Optional[jnp.ndarray]


def walk(cfg: TransformerConfig, deterministic: bool, x, call: Callable, parent: nn.Module,
         decode: bool = False, hook: Optional[Callable] = None, index=None) -> Any:
  """x through the plan's positions; `call(block, x, entry, repeat)` runs one position.

  Must be called from a compact method (the blocks are created here, named `block_{slot}`);
  `parent` (that module) draws the LayerDrop decisions. `hook(Position, x) -> x`, when given,
  runs each position instead (it decides whether and how to call `Position.run`; LayerDrop
  must then be off).
  """
  block_cls = nn.remat(Block, static_argnums=(_BRANCHES_ARGNUM,)) if cfg.remat else Block
  kernels = tied_ffn_kernels(cfg)
  blocks = {}
  plan = cfg.execution_plan
  keep = layerdrop_keep(parent, cfg, deterministic, x.shape[0], decode)  # [P, B] or None
  if hook is not None and keep is not None:
    raise ValueError("config.model.layerdrop drops positions in this apply, which a depth hook (early exit) "
                     "does not support: run deterministically or with layerdrop.at_inference=False")
  for p, (entry, repeat) in enumerate(zip(plan, plan_lib.occurrences(plan))):
    if entry.slot not in blocks:
      blocks[entry.slot] = block_cls(cfg, deterministic, ffn_kernels=kernels, name=layout.block_name(entry.slot))
    off = dataclasses.replace(entry, attn=False, ffn=False)
    run = lambda blk, h, entry=entry, repeat=repeat: call(blk, h, entry, repeat)
    skip = (lambda blk, h, off=off, repeat=repeat: call(blk, h, off, repeat)) if skip_runs_norms(cfg) else (
        lambda blk, h: h)
    if hook is not None:
      x = hook(Position(p, entry, repeat, blocks[entry.slot], run, index), x)
    else:
      x = run_or_skip(cfg, parent, None if keep is None else keep[p], blocks[entry.slot], x, run, skip)
  return x
