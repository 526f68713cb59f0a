"""Every depth method of the bench as a family of curves: `FAMILIES[name](ctx)` → {method: [point]}
or raises `NotApplicable` (the bench lists the family with the reason).

A point: the method, its knob, quality (`nll`, `ppl` on the eval text; `agreement`: top-1 agreement
with the full model's greedy continuation of the prompts, teacher-forced), `depth` (executed layers
per token, a residual block counting ½), analytic `flops` per token, and measured `prefill_ms`
([1, prefill_len] forward) and `decode_ms` (batch-1 greedy decoding, ms per generated token).
"""
import copy
import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from skipjax import models
from skipjax import routing
from skipjax.decode import early_exit as ee
from skipjax.decode import generation
from skipjax.decode import speculative
from skipjax.depth import exit_heads as heads_lib
from skipjax.depth import exits
from skipjax.depth import importance
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune as prune_lib
from skipjax.depth import runner as runner_lib
from skipjax.depthbench import measure
from skipjax.depthbench import setup as setup_lib
from skipjax.profile import applied
from skipjax.profile import oracle as oracle_lib
from skipjax.profile import ratios as ratios_lib
from skipjax.routing import exit as exit_lib

Point = Dict[str, Any]


class NotApplicable(Exception):
  """A method family that does not apply to this model or preset (the message says why)."""


@dataclasses.dataclass
class Context:
  bench: setup_lib.Bench
  timer: measure.Timer
  runner: runner_lib.PlanRunner
  fractions: List[float]
  full: Optional[Point] = None    # the full model's point (`full_point`)

  @property
  def L(self) -> int:  # noqa: N802
    return self.bench.num_layers

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.bench.config

  def targets(self) -> List[Tuple[int, float]]:
    """(layers removed, target fraction) for each target fraction of executed depth, distinct
    removal counts > 0 only (a fraction that rounds to one already listed is left out)."""
    out = {}
    for f in self.fractions:
      n = self.L - max(1, int(np.floor(f * self.L + 0.5)))
      if n > 0:
        out.setdefault(n, f)
    return list(out.items())

  # -- timing ----------------------------------------------------------------------------------

  def prefill_tokens(self) -> np.ndarray:
    n = self.config.timing.prefill_len
    rows = np.concatenate([b["inputs"] for b in self.bench.eval])
    if rows.shape[1] < n:
      raise ValueError(f"config.timing.prefill_len={n} > config.data.seq_len={rows.shape[1]}")
    return rows[:1, :n]

  def decode_prompt(self) -> np.ndarray:
    return self.bench.prompts[:1, :1]

  def decode_model(self, cfg, extra: int = 0):
    return models.build(setup_lib.decode_config(cfg, 1 + self.config.timing.decode_tokens + extra))

  def time_decode(self, key: str, cfg, params) -> float:
    """ms per generated token of `generation.generate`, batch 1, a 1-token prompt."""
    model, n = self.decode_model(cfg), self.config.timing.decode_tokens
    prompt = self.decode_prompt()
    return 1e3 * self.timer(f"decode:{key}", lambda: generation.generate(model, params, prompt, n).generated) / n

  def time_prefill(self, key: str, cfg, params, overrides=None) -> float:
    return 1e3 * self.timer(f"prefill:{key}", measure.prefill(models.build(cfg), params, self.prefill_tokens(),
                                                              overrides))

  # -- points ----------------------------------------------------------------------------------

  def flops(self, attn, ffn, heads: float = 1.0, cfg=None) -> float:
    return measure.flops_per_token(cfg or self.bench.cfg, attn, ffn, self.config.data.seq_len, heads)

  def point(self, method: str, knob: str, target: Optional[float], q: Dict[str, float], **fields) -> Point:
    out = {"method": method, "knob": knob, "target": target, **q}
    out["depth_fraction"] = out["depth"] / self.L
    out.update(fields)
    print(f"  {method} {knob}: ppl {out['ppl']:.4g} agreement {out['agreement']:.3f} depth {out['depth']:.2f} "
          f"prefill {out.get('prefill_ms') or float('nan'):.2f} ms decode {out.get('decode_ms') or float('nan'):.2f} "
          "ms/token", flush=True)
    return out

  def plan_point(self, method: str, plan: plan_lib.Plan, knob: str, target: Optional[float],
                 runner: Optional[runner_lib.PlanRunner] = None, cfg=None, params=None, **fields) -> Point:
    """A static plan of the base model (or of `runner`'s model: cfg, params)."""
    runner = runner or self.runner
    cfg, params = cfg or self.bench.cfg, params if params is not None else self.bench.params
    e, a = runner.score(plan, self.bench.eval), runner.score(plan, self.bench.agreement)
    attn, ffn = plan_lib.branch_flags(plan)
    key = "plan:" + "".join(f"{int(x)}{int(y)}" for x, y in zip(attn, ffn))
    planned = importance.with_plan(cfg, plan)
    q = {"nll": e["nll"], "ppl": float(np.exp(e["nll"])), "agreement": a["agreement"],
         "depth": float(sum(attn) + sum(ffn)) / 2}
    return self.point(method, knob, target, q, plan=plan_lib.to_string(plan), flops=self.flops(attn, ffn),
                      prefill_ms=self.time_prefill(key, planned, params),
                      decode_ms=self.time_decode(key, planned, params),
                      **fields)

  def train_dir(self, name: str) -> str:
    return os.path.join(self.bench.workdir, "models", name)

  def require_trained_here(self, what: str) -> None:
    if not self.bench.trained_here:
      raise NotApplicable(f"{what} are trained with the base model's recipe; config.model={self.config.model!r} "
                          "was not trained here")


def _drop_label(n: int, L: int) -> str:  # noqa: N803
  return f"drop {n}/{L}"


# -- static plans --------------------------------------------------------------------------------

def static(ctx: Context) -> Dict[str, List[Point]]:
  """Static pruning by each importance measure (`skipjax.depth.importance`; SLEB greedy)."""
  out = {}
  counts = [n for n, _ in ctx.targets()]
  progress = os.path.join(ctx.bench.workdir, "sleb_progress.json")
  for m in ctx.config.static.measures.split(","):
    removed = runner_lib.scores_stage(m, ctx.bench.cfg, ctx.bench.params, ctx.runner, ctx.bench.calibration, counts,
                                      progress)["removed"]
    out[f"static_{m}"] = [ctx.plan_point(f"static_{m}", plan_lib.drop(ctx.L, removed[str(n)]), _drop_label(n, ctx.L),
                                         f, removed=removed[str(n)])
                          for n, f in ctx.targets()]
  return out


def _training(ctx: Context, **overrides) -> ml_collections.ConfigDict:
  config = copy.deepcopy(ctx.config.training)
  config.unlock()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def healed(ctx: Context) -> Dict[str, List[Point]]:
  """Static pruning by `static.heal_measure`, then `static.heal_steps` of training on the base
  model's task (`config.init_from` = the pruned export; Kim et al. 2024, Gromov et al. 2024)."""
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  steps, m = ctx.config.static.heal_steps, ctx.config.static.heal_measure
  if steps <= 0:
    raise NotApplicable("config.static.heal_steps=0 (healing a real model: experiments/static_pruning.py)")
  ctx.require_trained_here("healed models")
  counts = [n for n, _ in ctx.targets()]
  removed = runner_lib.scores_stage(m, ctx.bench.cfg, ctx.bench.params, ctx.runner, ctx.bench.calibration, counts,
                                    os.path.join(ctx.bench.workdir, "sleb_progress.json"))["removed"]
  heal = {"train.num_steps": steps, "train.warmup_steps": max(steps // 10, 1), "train.eval_every_steps": steps,
          "train.checkpoint_every_steps": steps}

  def healed_point(method, init_from, name, knob, target, **fields):
    source = prune_lib.load_source(setup_lib.trained(_training(ctx, init_from=init_from, **heal), ctx.train_dir(name)))
    cfg, params = importance.measuring_config(source.cfg), importance.loop_params(source.params)
    return ctx.plan_point(method, plan_lib.identity(cfg.num_layers), knob, target,
                          runner=runner_lib.PlanRunner(cfg, params), cfg=cfg, params=params, heal_steps=steps, **fields)

  points = []
  for n, f in ctx.targets():
    pruned = ctx.train_dir(f"pruned_{m}_{n}")
    if not os.path.exists(os.path.join(pruned, "config.json")):
      cfg, params, _ = prune_lib.pruned_model(ctx.bench.cfg, ctx.bench.params, removed[str(n)])
      export.save(pruned, cfg, jax.device_get(params))
    points.append(healed_point(f"healed_{m}", pruned, f"healed_{m}_{n}", _drop_label(n, ctx.L), f,
                               removed=removed[str(n)]))
  # the control: the full model trained for the same steps (healing is also more training)
  control = healed_point("healed_control", os.path.join(ctx.bench.workdir, "models", "base"), "healed_control",
                         f"full + {steps} steps", 1.0)
  return {f"healed_{m}": points, "healed_control": [control]}


def _spread(L: int, n: int) -> List[int]:  # noqa: N803
  """n layers spread evenly, counted from the last (every other layer at n = L/2, as Fan et al.
  prune LayerDrop models)."""
  return sorted(L - 1 - int(i * L / n) for i in range(n))


SKIP_POLICIES: Dict[str, Callable[[int, int], List[int]]] = {
    "skip_early": lambda L, n: list(range(1, n + 1)),                       # keep the first layer
    "skip_middle": lambda L, n: list(range((L - n) // 2, (L - n) // 2 + n)),
    "skip_late": lambda L, n: list(range(L - 1 - n, L - 1)),                # keep the last layer
    "skip_every": _spread,
}


def skip_policy(ctx: Context) -> Dict[str, List[Point]]:
  """Fixed patterns (surveys' skip policies): a block of early / middle / late layers, or spread."""
  out = {}
  for name, layers in SKIP_POLICIES.items():
    out[name] = []
    for n, f in ctx.targets():
      drop = layers(ctx.L, n)
      out[name].append(ctx.plan_point(name, plan_lib.drop(ctx.L, drop), _drop_label(n, ctx.L), f, removed=drop))
  return out


def random_layers(ctx: Context) -> Dict[str, List[Point]]:
  """Random static layer subsets, averaged over `random_seeds` (each seed's ppl kept)."""
  points = []
  for n, f in ctx.targets():
    rows = []
    for s in range(ctx.config.random_seeds):
      drop = sorted(np.random.default_rng([ctx.config.seed, s, n]).choice(ctx.L, n, replace=False).tolist())
      rows.append(ctx.plan_point("random_layers", plan_lib.drop(ctx.L, drop), f"seed {s}", f, removed=drop))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("nll", "agreement", "depth", "flops", "prefill_ms",
                                                              "decode_ms")}
    mean["ppl"] = float(np.exp(mean["nll"]))
    points.append(ctx.point("random_layers", _drop_label(n, ctx.L) + f", mean of {len(rows)}", f,
                            {k: mean[k] for k in ("nll", "ppl", "agreement", "depth")},
                            flops=mean["flops"], prefill_ms=mean["prefill_ms"], decode_ms=mean["decode_ms"],
                            ppl_seeds=[r["ppl"] for r in rows]))
  return {"random_layers": points}


def layerdrop(ctx: Context) -> Dict[str, List[Point]]:
  """LayerDrop (Fan et al. 2020, p = 0.2 per layer in training), pruned at inference to layers
  spread evenly ("every other layer" at half depth), on a model trained with the base recipe."""
  ctx.require_trained_here("LayerDrop models")
  config = _training(ctx, **{"model.layerdrop.rate": 0.2})
  source = prune_lib.load_source(setup_lib.trained(config, ctx.train_dir("layerdrop")))
  cfg = importance.measuring_config(dataclasses.replace(source.cfg, layerdrop=models.config.LayerDropConfig()))
  params = importance.loop_params(source.params)
  runner = runner_lib.PlanRunner(cfg, params)
  points = [ctx.plan_point("layerdrop", plan_lib.identity(ctx.L), "full", 1.0, runner=runner, cfg=cfg, params=params)]
  for n, f in ctx.targets():
    drop = _spread(ctx.L, n)
    points.append(ctx.plan_point("layerdrop", plan_lib.drop(ctx.L, drop), _drop_label(n, ctx.L), f, runner=runner,
                                 cfg=cfg, params=params, removed=drop))
  return {"layerdrop": points}


# -- per-token gates on the base model ---------------------------------------------------------

def _gated_point(ctx: Context, method: str, knob: str, target: float, keeps: Dict[str, List[np.ndarray]],
                 **fields) -> Point:
  """Quality of the base model with per-token keep masks [L, 2, B, T] forced through `gate_override`;
  its executed depth is counted from the masks, its time is the masked forward's (every block
  computes: a per-token mask on a dense model saves nothing without a dispatch)."""
  model = models.build(ctx.bench.cfg)
  params = ctx.bench.params
  q = {}
  for name, batches in (("eval", ctx.bench.eval), ("agreement", ctx.bench.agreement)):
    q[name] = measure.score(model, params, batches, lambda i, k=keeps[name]: measure.keep_overrides(k[i]))
  keep = np.concatenate([k.reshape(ctx.L, 2, -1) for k in keeps["eval"]], axis=-1)       # [L, 2, N]
  depth = float(keep.mean(axis=(1, 2)).sum())
  frac = keep.mean(axis=2)                                                                  # [L, 2]
  example = measure.keep_overrides(np.ones((ctx.L, 2, 1, ctx.config.timing.prefill_len), np.float32))
  return ctx.point(method, knob, target, {"nll": q["eval"]["nll"], "ppl": float(np.exp(q["eval"]["nll"])),
                                          "agreement": q["agreement"]["agreement"], "depth": depth},
                   flops=ctx.flops(frac[:, 0], frac[:, 1]),
                   prefill_ms=ctx.time_prefill("masked", ctx.bench.cfg, params, example), decode_ms=None,
                   note="masks forced on the dense model (masked: every block computes); decode not measured",
                   **fields)


def random_tokens(ctx: Context) -> Dict[str, List[Point]]:
  """LtS "Rand" at inference: each token runs each layer with probability P, on the base model."""
  points = []
  for f in ctx.fractions:
    rng = np.random.default_rng([ctx.config.seed, int(f * 1000)])
    keeps = {}
    for name, batches in (("eval", ctx.bench.eval), ("agreement", ctx.bench.agreement)):
      keeps[name] = []
      for b in batches:
        layer = (rng.random((ctx.L, 1) + b["inputs"].shape) < f).astype(np.float32)         # [L, 1, B, T]
        keeps[name].append(np.repeat(layer, 2, axis=1))
    points.append(_gated_point(ctx, "random_tokens", f"P = {f:g}", f, keeps))
  return {"random_tokens": points}


def oracle(ctx: Context) -> Dict[str, List[Point]]:
  """Residual-ratio oracles (RR §4.3–4.4): a block is skipped where ‖R(x)‖/‖x‖ < t; t per target
  fraction from the calibration ratios. Simulated: the decisions of the dense forward forced on
  the model; applied: the model decides on its actual inputs (`oracle_threshold`)."""
  model = models.build(ctx.bench.cfg)
  params = ctx.bench.params
  ratio = lambda b: ratios_lib.residual_ratios(model, params, b["inputs"], jit=True)          # [L, 2, B, T]
  calib = np.concatenate([ratio(b).reshape(ctx.L, 2, -1) for b in ctx.bench.calibration], axis=-1)
  dense = {name: [ratio(b) for b in batches] for name, batches in (("eval", ctx.bench.eval),
                                                                   ("agreement", ctx.bench.agreement))}
  sim, app = [], []
  for f in ctx.fractions:
    t = float(np.quantile(calib, 1.0 - f))
    keeps = {name: [oracle_lib.oracle_keep(r, t).astype(np.float32) for r in rs] for name, rs in dense.items()}
    sim.append(_gated_point(ctx, "oracle_simulated", f"t = {t:.3g}", f, keeps, threshold=t))
    cfg = applied.with_threshold(ctx.bench.cfg, t)
    amodel = models.build(cfg)
    e = measure.score(amodel, params, ctx.bench.eval)
    a = measure.score(amodel, params, ctx.bench.agreement)
    app.append(ctx.point("oracle_applied", f"t = {t:.3g}", f, measure.quality(e, a),
                         flops=ctx.flops([e["depth"] / ctx.L] * ctx.L, [e["depth"] / ctx.L] * ctx.L),
                         prefill_ms=ctx.time_prefill(f"oracle:{t}", cfg, params), decode_ms=None, threshold=t,
                         note="R(x) of every block is computed to decide: nothing is saved"))
  return {"oracle_simulated": sim, "oracle_applied": app}


# -- early exit and self-speculative decoding --------------------------------------------------

def _exit_heads(ctx: Context):
  """CALM's learned exit classifier (§3.5) on the frozen base model, trained on the calibration
  tokens (`early_exit.head_steps` steps), cached as `DIR/exit_heads.npz`."""
  path = os.path.join(ctx.bench.workdir, "exit_heads.npz")
  if not os.path.exists(path):
    heads, _ = heads_lib.train_exit_heads(ctx.bench.cfg, ctx.bench.params, ctx.bench.calibration,
                                          steps=ctx.config.early_exit.head_steps)
    heads_lib.save_exit_heads(path, heads, heads_lib.heads_meta(ctx.bench.cfg))
  return heads_lib.load_exit_heads(path, ctx.bench.cfg)[0]


def _confidences(ctx: Context, measure_name: str, heads) -> np.ndarray:
  """[P, N] confidence of `measure_name` after every position, calibration tokens (full cache)."""
  cfg = ctx.bench.cfg
  fn = jax.jit(lambda p, h, x: _conf(cfg, p, h, exits.layer_outputs(cfg, p, x), measure_name))
  out = []
  for b in ctx.bench.calibration:
    for i in range(len(b["inputs"])):
      out.append(np.asarray(fn(ctx.bench.params, heads, b["inputs"][i:i + 1])).reshape(ctx.L, -1))
  return np.concatenate(out, axis=1)


def _conf(cfg, params, heads, out, name: str):
  if name == "learned":
    return heads_lib.head_confidence(heads, heads_lib.normed_states(cfg, params, out.hidden))
  if name == "saturation":
    return exit_lib.saturation(out.hidden)
  if name == "entropy":
    return exit_lib.entropy(out.logits, normalized=True)
  return {"softmax_max": exit_lib.softmax_max, "top2_margin": exit_lib.top2_margin}[name](out.logits)


def _threshold(conf: np.ndarray, rule: ee.ExitRule, target_layers: float) -> float:
  """λ whose full-cache mean exit (layers run) on the calibration tokens is closest to the target:
  the candidates are quantiles of the deciding positions' confidences (and 1.5: never exit); a
  token exits at the first deciding position with c ≥ λ (`routing.exit.exit_layer`), else runs all."""
  P = conf.shape[0]
  deciding = np.asarray([rule.can_exit(p, P) for p in range(P)])
  cands = np.quantile(conf[deciding].ravel(), np.linspace(0, 1, 201))
  cands = np.unique(np.concatenate([cands, [1.5]]).astype(np.float32))
  passes = (conf[None] >= cands[:, None, None]) & deciding[None, :, None]                # [C, P, N]
  passes[:, -1] = True
  means = passes.argmax(axis=1).mean(axis=1) + 1                                            # [C]
  return float(cands[np.argmin(np.abs(means - target_layers))])


def early_exit(ctx: Context) -> Dict[str, List[Point]]:
  """Per-token early exit (CALM) by each confidence measure through the shared head, for each KV
  policy (`skipjax.decode.early_exit`): quality teacher-forced (`exit_forward`; `recompute` has the
  tokens of `full`), time of batch-1 `early_exit.generate`."""
  c = ctx.config.early_exit
  model = models.build(ctx.bench.cfg)
  params = ctx.bench.params
  L, d = ctx.L, ctx.bench.cfg.d_model
  out, teacher = {}, {}
  for m in c.measures.split(","):
    heads = _exit_heads(ctx) if m == "learned" else None
    conf = _confidences(ctx, m, heads)
    base = ee.ExitRule(m, 0.0, min_layer=c.min_layer, every=c.every)
    deciding = [p for p in range(L) if base.can_exit(p, L)]
    for policy in c.policies.split(","):
      fn = jax.jit(lambda p, x, y, lam, policy=policy, h=heads: _exit_outputs(model, p, h, x, y, base, lam, policy))
      points = []
      for f in ctx.fractions:
        lam = _threshold(conf, base, f * L)
        # teacher-forced, `recompute` computes the tokens of `full` (module docstring of early_exit)
        stats = teacher.setdefault((m, "full" if policy == "recompute" else policy, lam), {})
        for name, batches in (("eval", ctx.bench.eval), ("agreement", ctx.bench.agreement)):
          if name in stats:
            continue
          nll = agree = w_sum = 0.0
          layers = []
          for b in batches:
            tok_nll, top, exit_at = map(np.asarray, fn(params, b["inputs"], b["targets"], np.float32(lam)))
            w = b.get("weights", np.ones(b["targets"].shape, np.float32))
            nll += float((tok_nll * w).sum())
            agree += float(((top == b["targets"]) * w).sum())
            w_sum += float(w.sum())
            layers.append(exit_at[w > 0])
          stats[name] = {"nll": nll / w_sum, "agreement": agree / w_sum, "exit": np.concatenate(layers)}
        exit_at = stats["eval"]["exit"]                                                # positions, [N]
        ran = np.asarray([(exit_at >= p).mean() for p in range(L)])                     # [P] token fraction
        # LM-head evaluations per token: the final one, plus one at each deciding position it reached
        # (softmax measures; `saturation` compares states, `learned` runs a d-wide classifier)
        lm_heads = 1.0 + sum(float((exit_at >= p).mean()) for p in deciding if m not in ("saturation", "learned"))
        rule = dataclasses.replace(base, threshold=lam)
        dmodel = ctx.decode_model(ctx.bench.cfg)
        n = ctx.config.timing.decode_tokens
        prompt = ctx.decode_prompt()
        gen = lambda: ee.generate(dmodel, params, prompt, n, rule=rule, policy=policy, max_pending=c.max_pending,
                                  exit_heads=heads)
        decode_ms = 1e3 * ctx.timer(f"early_exit:{m}:{policy}:{lam}", lambda: gen().generated) / n
        r = gen()
        recomputed = float(np.asarray(r.recomputed).mean())
        if policy == "full":
          depth, attn, ffn = float(L), np.ones(L), np.ones(L)
        else:
          depth = float(exit_at.mean() + 1) + (recomputed / 2 if policy == "recompute" else 0.0)
          attn = ffn = ran + (recomputed / 2 / L if policy == "recompute" else 0.0)
        flops = ctx.flops(attn, ffn, lm_heads)
        if policy == "propagate":  # exited tokens still project K/V at every later layer
          a = ctx.bench.cfg.num_heads * (ctx.bench.cfg.head_dim or d // ctx.bench.cfg.num_heads)
          flops += float((1 - ran).sum()) * 4 * d * a
        tokens = ctx.prefill_tokens()
        prefill = 1e3 * ctx.timer(f"prefill:early_exit:{m}:{policy}:{lam}",
                                  lambda: fn(params, tokens, tokens, np.float32(lam)))
        points.append(ctx.point(f"early_exit_{m}_{policy}", f"λ = {lam:.4g}", f,
                                {"nll": stats["eval"]["nll"], "ppl": float(np.exp(stats["eval"]["nll"])),
                                 "agreement": stats["agreement"]["agreement"], "depth": depth},
                                flops=flops, prefill_ms=prefill, decode_ms=decode_ms, threshold=lam,
                                mean_exit=float(exit_at.mean() + 1), recomputed_per_token=recomputed,
                                decode_mean_exit=float(np.asarray(r.exit_layer).mean() + 1)))
      out[f"early_exit_{m}_{policy}"] = points
  return out


def _exit_outputs(model, params, heads, tokens, targets, rule, lam, policy):
  """NLL of `targets` and argmax at each token's exit, and the exit positions, all [B, T]."""
  r = ee.exit_forward(model, params, tokens, rule=dataclasses.replace(rule, threshold=lam), policy=policy,
                      exit_heads=heads)
  logp = jax.nn.log_softmax(r.logits.astype(jax.numpy.float32), axis=-1)                   # [B, T, V]
  nll = -jax.numpy.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return nll, jax.numpy.argmax(logp, -1), r.exit_layer


def self_speculative(ctx: Context) -> Dict[str, List[Point]]:
  """LayerSkip self-speculative decoding (§5): draft with the first E layers, verify with the
  rest; the output is the full model's greedy tokens, so quality is the full model's."""
  c = ctx.config.speculative
  d, n = c.num_draft, ctx.config.timing.decode_tokens
  model = ctx.decode_model(ctx.bench.cfg, extra=d)
  full = ctx.full
  points = []
  for frac in [float(x) for x in c.exit_fractions.split(",")]:
    E = max(1, min(ctx.L - 1, int(round(frac * ctx.L))))
    r = speculative.measure(model, ctx.bench.params, ctx.decode_prompt(), n, exit_layer=E, num_draft=d,
                            repeats=ctx.config.timing.repeats)
    blocks = r["rounds"] * d * ctx.L / n  # d draft steps × E layers + d verified tokens × (L − E) per round
    heads = r["rounds"] * 2 * d / n
    q = {"nll": full["nll"], "ppl": full["ppl"], "agreement": full["agreement"], "depth": blocks}
    points.append(ctx.point("self_speculative", f"E = {E}, d = {d}", None, q,
                            flops=ctx.flops(np.full(ctx.L, blocks / ctx.L), np.full(ctx.L, blocks / ctx.L), heads),
                            prefill_ms=full["prefill_ms"], decode_ms=1e3 / r["tokens_per_s"],
                            acceptance_rate=r["acceptance_rate"], tokens_per_round=r["tokens_per_round"],
                            identical_to_greedy=r["identical_to_greedy"],
                            speedup_vs_same_loop_greedy=r["speedup"]))
  return {"self_speculative": points}


# -- learned routers ---------------------------------------------------------------------------

ROUTERS = {  # config.model.skip of each trained-router method (learned_vs_random's)
    "skiplayer_paper": dict(router="gumbel", gate_form="paper"),
    "skiplayer_residual": dict(router="gumbel", gate_form="residual"),
}
MOD = {"mod": dict(router="mod", mod_every=1)}


def _router_points(ctx: Context, name: str, config: ml_collections.ConfigDict, workdir: str, target: float,
                   knob: str) -> Point:
  source = prune_lib.load_source(setup_lib.trained(config, workdir))
  cfg = dataclasses.replace(source.cfg, scan_layers=False, remat=False)
  params = importance.loop_params(source.params)
  model = models.build(cfg)
  e, a = measure.score(model, params, ctx.bench.eval), measure.score(model, params, ctx.bench.agreement)
  r = e["depth"] / ctx.L
  flops = float(routing.flops_per_token(
      np.full(ctx.L, r), d_model=cfg.d_model, d_ff=cfg.ffn.hidden(cfg.d_model, cfg.d_ff),
      seq_len=ctx.config.data.seq_len,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim or None, ffn_matrices=3 if cfg.mlp_gated else 2, causal=True,
      router=True, vocab_size=cfg.vocab_size))
  try:
    decode_ms = ctx.time_decode(f"{name}:{workdir}", cfg, params)
    note = None
  except (ValueError, NotImplementedError) as err:  # e.g. a rule that cannot decode causally
    decode_ms, note = None, f"decode: {err}"
  return ctx.point(name, knob, target, measure.quality(e, a), flops=flops,
                   prefill_ms=ctx.time_prefill(f"{name}:{workdir}", cfg, params), decode_ms=decode_ms,
                   dispatch=cfg.skip.dispatch, note=note)


def _densities(ctx: Context) -> List[float]:
  return [float(x) for x in ctx.config.routers.densities.split(",")]


def _trained_routers(ctx: Context, table: Dict[str, Dict[str, Any]]) -> Dict[str, List[Point]]:
  ctx.require_trained_here("routers trained from scratch")
  steps = ctx.config.training.train.num_steps
  out = {}
  for name, skip in table.items():
    out[name] = []
    for p in _densities(ctx):
      overrides = {f"model.skip.{k}": v for k, v in skip.items()}
      overrides["model.skip.target_density"] = p
      if skip["router"] == "gumbel":  # dense-to-sparse warm-up (configs/skiplayer.py:tiny)
        overrides["model.skip.density_warmup_steps"] = steps // 3
      config = _training(ctx, **overrides)
      out[name].append(_router_points(ctx, name, config, ctx.train_dir(f"{name}_P{p:g}"), p, f"P = {p:g}"))
  return out


def routers(ctx: Context) -> Dict[str, List[Point]]:
  """SkipLayer (LtS Eq. 1/4, ST-Gumbel) with the paper's gate form and the residual form, trained
  from scratch with the base recipe at each P; argmax routing at evaluation."""
  return _trained_routers(ctx, ROUTERS)


def mod(ctx: Context) -> Dict[str, List[Point]]:
  """Mixture-of-Depths (Raposo et al. 2024), every layer routed, capacity P·T, causal rule at eval."""
  return _trained_routers(ctx, MOD)


def frozen_routers(ctx: Context) -> Dict[str, List[Point]]:
  """Routers trained on the frozen base model (Router-Tuning setting): `init_from` the base,
  `train.trainable='.*router.*'`, residual gate form, `routers.frozen_steps` steps at each P."""
  steps = ctx.config.routers.frozen_steps
  if steps <= 0:
    raise NotApplicable("config.routers.frozen_steps=0 (routers on a frozen real model: experiments/router_tuning.py)")
  ctx.require_trained_here("frozen-model routers")
  base = os.path.join(ctx.bench.workdir, "models", "base")
  points = []
  for p in _densities(ctx):
    config = _training(ctx, init_from=base, **{
        "model.skip.router": "gumbel", "model.skip.gate_form": "residual", "model.skip.target_density": p,
        "model.skip.router_bias_init": "warmup", "model.skip.density_warmup_steps": steps // 3,
        "train.trainable": ".*router.*", "train.num_steps": steps, "train.warmup_steps": max(steps // 10, 1),
        "train.eval_every_steps": steps, "train.checkpoint_every_steps": steps})
    points.append(_router_points(ctx, "frozen_routers", config, ctx.train_dir(f"frozen_routers_P{p:g}"), p,
                                 f"P = {p:g}"))
  return {"frozen_routers": points}


FAMILIES: Dict[str, Callable[[Context], Dict[str, List[Point]]]] = {
    "static": static, "healed": healed, "skip_policy": skip_policy, "random_layers": random_layers,
    "layerdrop": layerdrop, "random_tokens": random_tokens, "oracle": oracle, "early_exit": early_exit,
    "self_speculative": self_speculative, "routers": routers, "mod": mod, "frozen_routers": frozen_routers,
}


def full_point(ctx: Context) -> Point:
  """The full model: the reference every method is measured against."""
  return ctx.plan_point("full", plan_lib.identity(ctx.L), f"{ctx.L} layers", 1.0)


def check_families(names: Sequence[str]) -> List[str]:
  unknown = [n for n in names if n not in FAMILIES]
  if unknown:
    raise ValueError(f"config.methods: unknown method family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
  return list(names)
