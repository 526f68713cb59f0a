"""Running a dense decoder under many execution plans without recompiling per plan.

`PlanRunner` walks a `Plan` position by position with the model's own embedding, `Block` and head
(one jitted call each), so a new plan costs no compilation; `sleb_greedy` is SLEB (Song et al.
2024, Alg. 1) on it. Used by the static-pruning study and the depth bench.
"""
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import importance
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune as prune_lib
from skipjax.models.block import Block


def write_json(path: str, value) -> None:
  """json.dump to a temporary name, then rename (nothing half-written)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


class PlanRunner:
  """Runs a decoder under any plan of its slots, one jitted block call per position.

  The same walk as `skipjax.models.stack.walk` (the model's own embedding, Block and head modules,
  nothing re-implemented), but each block is compiled once and reused by every plan: through
  `importance.calibration_nll` every new plan compiles the whole 30-layer forward (~6 s here), and
  the curve, SLEB and drop-one evaluate hundreds of plans. Its NLL equals `calibration_nll` under
  the same plan (`check` stage; tests/test_experiments.py)."""

  def __init__(self, cfg, params):
    self.cfg = importance.measuring_config(cfg)
    if (not isinstance(self.cfg, models.TransformerConfig) or self.cfg.skip.router != "none"
        or self.cfg.oracle_threshold or self.cfg.norm != "pre"):
      # A position that runs nothing is y = x here (skipjax.models.stack: post-LN with post_ln_skip='ln'
      # runs its norms); other models go through importance.calibration_nll (one compile per plan).
      raise ValueError("PlanRunner needs a dense pre-LN decoder")
    self.params = importance.loop_params(params)
    self.num_layers = self.cfg.num_layers
    one = models.build(importance.with_plan(self.cfg, "0"))  # embedding and head of the model itself
    block = Block(self.cfg, True)
    by_index = self.cfg.activation == "fliprelu"  # the only per-slot behaviour of a dense block

    def stop_at_block(tokens, params):
      seen = []

      def grab(next_fun, args, kw, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
          seen.append(args[0])
          return args[0]
        return next_fun(*args, **kw)
      with nn.intercept_methods(grab):
        one.apply({"params": params}, tokens)
      return seen[0]

    def head_score(params, x, targets, weights):
      def give(next_fun, args, kw, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
          return x
        return next_fun(*args, **kw)
      with nn.intercept_methods(give):
        logits = one.apply({"params": params}, targets)                      # [B, T, V]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
      agree = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)        # [B, T]
      return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(agree * weights)

    def run_block(p, x, slot, branches):
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
      return block.apply({"params": p}, x, positions, None, layer_index=slot if by_index else 0,
                         branches=branches)

    self._embed = jax.jit(stop_at_block)
    self._score = jax.jit(head_score)
    self._block = jax.jit(run_block, static_argnums=(2, 3))
    self._by_index = by_index
    self._head_params = {k: v for k, v in self.params.items() if not k.startswith("block_")}
    self._head_params["block_0"] = self.params["block_0"]  # the one-position model names it

  def embed(self, batch) -> jnp.ndarray:
    return self._embed(jnp.asarray(batch["inputs"], jnp.int32), self._head_params)

  def position(self, x, entry: plan_lib.PlanEntry) -> jnp.ndarray:
    if not entry.runs:
      return x
    return self._block(self.params[f"block_{entry.slot}"], x, entry.slot if self._by_index else 0, entry.branches)

  def head(self, x, batch):
    s, c, _ = self._score(self._head_params, x, jnp.asarray(batch["targets"], jnp.int32),
                          jnp.asarray(np.ones(batch["targets"].shape), jnp.float32))
    return float(s), float(c)

  def score(self, plan: plan_lib.PlanLike, batches) -> Dict[str, float]:
    """Mean next-token NLL and top-1 agreement (argmax == target) of the model under `plan`, over
    the tokens where each batch's 'weights' [B, T] is 1 (default: all)."""
    plan = plan_lib.resolve(plan, self.num_layers)
    nll = count = agree = 0.0
    for b in batches:
      x = self.embed(b)
      for e in plan:
        x = self.position(x, e)
      w = b.get("weights", np.ones(b["targets"].shape))
      s, c, a = self._score(self._head_params, x, jnp.asarray(b["targets"], jnp.int32), jnp.asarray(w, jnp.float32))
      nll, count, agree = nll + float(s), count + float(c), agree + float(a)
    return {"nll": nll / count, "agreement": agree / count, "tokens": count}

  def states(self, plan: plan_lib.Plan, batch) -> List[jnp.ndarray]:
    """[len(plan) + 1] hidden states: the input of every position, then the last output."""
    out = [self.embed(batch)]
    for e in plan:
      out.append(self.position(out[-1], e))
    return out

  def nll(self, plan: plan_lib.PlanLike, batches) -> float:
    """Mean next-token NLL of the model run under `plan`."""
    plan = plan_lib.resolve(plan, self.num_layers)
    total = count = 0.0
    for b in batches:
      x = self.embed(b)
      for e in plan:
        x = self.position(x, e)
      s, c = self.head(x, b)
      total, count = total + s, count + c
    return total / count

  def drop_one(self, plan: plan_lib.Plan, batches, pool: Sequence[int]) -> Dict[int, float]:
    """{slot: NLL of `plan` without its position running that slot} for slots in `pool`; the
    states before the removed position are those of `plan` (computed once)."""
    states = [self.states(plan, b) for b in batches]
    out = {}
    for k, e in enumerate(plan):
      if e.slot not in pool or len(plan) == 1:
        continue
      total = count = 0.0
      for b, hs in zip(batches, states):
        x = hs[k]
        for e2 in plan[k + 1:]:
          x = self.position(x, e2)
        s, c = self.head(x, b)
        total, count = total + s, count + c
      out[e.slot] = total / count
    return out


def sleb_greedy(runner: PlanRunner, batches, num_remove: int, progress: Optional[str] = None,
                pool: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """SLEB (Song et al. 2024, Alg. 1) at layer granularity: each step removes the layer whose
  removal gives the lowest calibration NLL (ties: the lower str(layer), as importance.sleb).
  `progress`: a json file the order is saved to after every step (resume)."""
  L = runner.num_layers
  pool = list(range(L)) if pool is None else list(pool)
  state = {"order": [], "nll": [], "seconds": []}
  if progress and os.path.exists(progress):
    with open(progress) as f:
      state = json.load(f)
  while len(state["order"]) < num_remove:
    start = time.time()
    trial = runner.drop_one(plan_lib.drop(L, state["order"]), batches, [u for u in pool if u not in state["order"]])
    best = min(trial, key=lambda u: (trial[u], str(u)))
    state["order"].append(int(best))
    state["nll"].append(float(trial[best]))
    state["seconds"].append(time.time() - start)
    if len(state["order"]) == 1:
      state["drop_one"] = {str(u): v for u, v in trial.items()}
    if progress:
      write_json(progress, state)
    print(f"sleb step {len(state['order'])}: remove {best} -> NLL {trial[best]:.4f} ({time.time() - start:.0f} s)",
          flush=True)
  return state


def removal_counts(num_layers: int, fractions: Sequence[float]) -> List[int]:
  return sorted({min(int(round(f * num_layers)), num_layers - 1) for f in fractions})


def scores_stage(measure: str, cfg, params, runner: PlanRunner, calib, counts: Sequence[int], progress: str,
                 sleb_steps: int = 0) -> Dict[str, Any]:
  """One importance computation; `removed[n]` = the layers the measure removes for each n
  (SLEB: only n <= `sleb_steps` when > 0). PPL drop-one reuses SLEB's first step when saved."""
  L = runner.num_layers
  pool = list(range(L))
  removed = {}
  if measure == "angular":
    dist = {n: importance.angular_distances(cfg, params, calib, n) for n in counts if n > 0}
    single = importance.angular_distance(cfg, params, calib, 1)
    out = single.to_json()
    for n, d in dist.items():
      scores = importance.Scores("angular", single.layer, None, {"distances": d})
      removed[n] = prune_lib.choose(scores, n, "layer", pool)
    out["raw"]["distances_by_n"] = {str(n): np.asarray(d).tolist() for n, d in dist.items()}
  elif measure == "sleb":
    steps = min(max(counts), sleb_steps) if sleb_steps else max(counts)
    state = sleb_greedy(runner, calib, steps, progress)
    out = {"measure": "sleb", "order": state["order"], "nll": state["nll"], "step_seconds": state["seconds"]}
    removed = {n: state["order"][:n] for n in counts if 0 < n <= steps}
  else:
    if measure == "ppl":
      saved = json.load(open(progress)).get("drop_one") if os.path.exists(progress) else None
      drop = {int(u): v for u, v in saved.items()} if saved else runner.drop_one(plan_lib.identity(L), calib, pool)
      scores = importance.Scores("ppl", np.asarray([drop[i] for i in range(L)]), None,
                                 {"base_nll": runner.nll("", calib)})
    elif measure == "taylor":
      scores = importance.taylor(cfg, params, calib)
    else:
      scores = importance.measure(measure, cfg, params, calib)
    out = scores.to_json()
    removed = {n: prune_lib.choose(scores, n, "layer", pool) for n in counts if n > 0}
  out["removed"] = {str(n): [int(u) for u in r] for n, r in removed.items()}
  return out
