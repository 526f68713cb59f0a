"""Routers trained on a frozen pretrained LM vs static pruning, the applied oracle and random
skipping at equal executed depth (issue 15, item 3).

    python -m experiments.router_tuning --model=smollm2 --workdir=/tmp/rt/smollm2 \
        --static_dir=/tmp/sp/smollm2 --copy_figure=docs/figures
    python -m experiments.router_tuning --model=tiny --workdir=DIR --data_dir=DIR   # offline, seconds

Facts taken from the two papers (their text only; no code of either project is used):
* Router-Tuning / MindSkip (He et al. 2024, arXiv 2410.13184): only the router parameters of a
  pretrained Transformer are fine-tuned, on a small dataset, the backbone frozen; MindSkip puts
  the dynamic depth on the attention layers ("Attention with Dynamic Depths"), because skipping
  whole layers risks bypassing important computation; reported: 21 % speed-up, 0.2 % drop.
* FlexiDepth (Luo, Wang, Yan 2025, arXiv 2503.23798): a plug-in router per decoder layer reads
  the normalised hidden state, G = σ(Router(Norm(X))), and a threshold τ on G sends a token
  through the full layer or past it; the original parameters stay unchanged; K/V of skipped
  tokens are still computed (context for decoding); loss L = α·L_skip + L_lm. On
  Llama-3-8B-Instruct it skips 8 of 32 layers at full benchmark performance. (Its skip path
  also has a trained adapter; here only routers train, as in Router-Tuning.)

What this script runs (every piece is the project's own code):
* Model: the frozen model with an LtS router per layer (`config.model.skip.router`, default the
  ST-Gumbel gate), trained by `skipjax.train` with `config.init_from=<model>` (routers absent from
  the source get their fresh initialisation) and `config.train.trainable='.*router.*'`; loss = mean
  NLL + λ·Σ_i (r_i − P)² (LtS §2.1 ℓ_aux) on WikiText-2 `valid.txt` with the model's own tokenizer.
  Where the Block offers them: `skip.gate_form='residual'` (y = x + m·g₁·(F(x) − x), issue 15 P1:
  the router gradient is ⟨dy, F(x) − x⟩, "does the layer help this token"), `skip.router_input=
  'norm'` (the router reads the block's pre-norm LN(x), as FlexiDepth's Router(Norm(X)); the raw
  SmolLM2 stream grows from ‖x‖ ≈ 3 at layer 0 to ≈ 770 at layer 29, with ≈ 24,000 on the first
  token) and `skip.router_bias_init='target'` (bias at logit P).
* Granularity (default `layer`): FlexiDepth skips whole layers; MindSkip routes attention only,
  which `skip.granularity` does not offer (layer | block | ffn) and which cannot reach a depth of
  0.8·L in layer units (every FFN still runs). Layer granularity makes "executed depth" the same
  unit as static layer pruning (30 − n layers) and as Bernoulli skipping per token-layer, so the
  comparison at equal depth is like for like. `--granularity=block` routes attention and FFN
  blocks separately (depth = (attention + FFN blocks run)/2, `train.step.executed_depth`).
* Evaluation on the first `test_sequences × test_len` packed tokens of `test.txt` (the tokens of
  experiments/static_pruning.py): argmax routing (the model's own deterministic forward), its
  mean executed depth D, and a threshold τ on the routing probability p (FlexiDepth's τ; τ = 0.5
  is argmax) chosen so that the depth is P·L ("routers @ P·L"), run by `RouterWalk`, a
  layer-by-layer re-walk of the same model (at τ = 0.5 its NLL and depth equal the model's).
* Baselines at the same executed depth D: (a) static pruning by every importance measure of
  experiments/static_pruning.py (its saved scores and plan NLLs with `--static_dir`, or computed
  here): n_lo = ⌊L − D⌋ and n_hi = ⌈L − D⌉ layers removed, log-perplexity interpolated linearly
  in depth between them; (b) the applied residual-ratio oracle (RR §4.4, the Block's
  `oracle_threshold` gate via `skipjax.profile.applied.with_threshold`; per attention/FFN block,
  depth = blocks run / 2) with the threshold bisected to depth D; (c) random skipping with
  Bernoulli(D / L) per token and layer (the `random` gate kind at the routers' granularity),
  several seeds; (d) the full model.

Resumable: each stage writes `DIR/stages/<stage>.json` and is skipped when it exists; router
training resumes from its workdir's checkpoint. Outputs: `DIR/router_tuning.json`,
`DIR/router_tuning.md`, `DIR/router_tuning.png` (copied to `--copy_figure` as
`router_tuning_<model>.png`).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import static_pruning as sp
from skipjax import models
from skipjax.depth import importance
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune as prune_lib
from skipjax.depth import runner as runner_lib
from skipjax.layers import make_norm
from skipjax.models.block import Block
from skipjax.profile import applied
from skipjax.train import step as step_lib

# Router options added by issue 15 (used when this checkout's SkipConfig has them).
ROUTER_OPTIONS = ("gate_form", "router_input", "router_bias_init")


# -- model, data, training ---------------------------------------------------------------------

def load_source(args):
  """(cfg, params, tokenizer.json dict, init_from path) of the frozen model."""
  if args.model == "tiny":
    cfg, params, tok_json, path = sp.tiny_model(args.workdir, os.path.join(args.data_dir, "valid.txt"), args.tiny_layers)
  else:
    cfg, params, tok_json, path = sp.load_model(args.model, args.workdir, args.data_dir)
  return importance.measuring_config(cfg), importance.loop_params(params), tok_json, path


def router_options(args) -> Dict[str, Any]:
  """The issue-15 router options asked for that this checkout's SkipConfig knows."""
  known = {f.name for f in dataclasses.fields(models.SkipConfig)}
  return {k: getattr(args, k) for k in ROUTER_OPTIONS if k in known and getattr(args, k)}


def train_routers(args, density: float, source: str, tok_json) -> Dict[str, Any]:
  """skipjax.train: init_from the frozen model, only '.*router.*' trainable (resumes its workdir)."""
  from configs import lm  # pylint: disable=import-outside-toplevel
  from skipjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from skipjax.train import loop  # pylint: disable=import-outside-toplevel
  from skipjax.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  train_dir = train_dir_of(args, density)
  config = lm.get_config("tiny")
  vocab = tokenizers.Tokenizer.from_str(json.dumps(tok_json)).get_vocab_size()
  with config.unlocked():
    config.init_from = source
    config.model.skip.update(router=args.router, granularity=args.granularity, target_density=density,
                             aux_weight=args.aux_weight, dispatch="masked", temperature=1.0, density_warmup_steps=0)
    for k, v in router_options(args).items():
      config.model.skip[k] = v
    config.data.update(source=f"text:{os.path.join(args.data_dir, 'valid.txt')}", tokenizer="bpe",
                       bpe_vocab_size=max(vocab, 258), seq_len=args.seq_len, batch_size=args.batch,
                       eval_fraction=0.05)
    config.train.update(num_steps=args.steps, learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                        weight_decay=0.0, min_lr_ratio=0.1, log_every_steps=max(1, args.steps // 10),
                        eval_every_steps=args.steps, eval_batches=1, checkpoint_every_steps=args.checkpoint_every,
                        keep_checkpoints=1, progress_bar=False, trainable=".*router.*")
  os.makedirs(train_dir, exist_ok=True)
  # The model's own tokenizer for the text pipeline (README "Data"), with its data settings beside it.
  if not os.path.exists(os.path.join(train_dir, tokenizer_lib.TOKENIZER_FILE)):
    sp._write_json(os.path.join(train_dir, tokenizer_lib.SOURCE_FILE), tokenizer_lib.bpe_settings(config.data))
    sp._write_json(os.path.join(train_dir, tokenizer_lib.TOKENIZER_FILE), tok_json)
  start = time.time()
  loop.train_and_evaluate(config, train_dir)
  records = read_metrics(train_dir)
  last = [r for r in records if "loss" in r][-1]
  return {"train_dir": train_dir, "seconds_this_call": time.time() - start, "steps": args.steps,
          "batch": args.batch, "seq_len": args.seq_len, "train_tokens": args.steps * args.batch * args.seq_len,
          "lr": args.lr, "aux_weight": args.aux_weight, "router": args.router, "granularity": args.granularity,
          "options": router_options(args), "num_params": last.get("num_params"),
          "num_trainable_params": last.get("num_trainable_params"),
          "curve": [{k: r[k] for k in ("step", "loss", "nll", "aux_loss", "effective_depth", "tokens_per_sec")
                     if k in r} for r in records if "loss" in r],
          "final_train_density": last.get("layer_density", last.get("ffn_density"))}


def train_dir_of(args, density: float) -> str:
  return os.path.join(args.workdir, f"train_P{density:g}")


def params_check(source_params, trained_params) -> Dict[str, Any]:
  """Which parameters training changed: every non-router leaf must be bit-identical."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  src = traverse_util.flatten_dict(importance.loop_params(source_params), sep="/")
  dst = traverse_util.flatten_dict(importance.loop_params(trained_params), sep="/")
  router = [k for k in dst if "router" in k]
  other = [k for k in dst if "router" not in k]
  changed = [k for k in other if k not in src or not np.array_equal(np.asarray(src[k]), np.asarray(dst[k]))]
  return {"non_router_leaves": len(other), "non_router_changed": changed, "router_leaves": len(router),
          "router_changed": sum(1 for k in router if k not in src or not np.array_equal(np.asarray(src[k]),
                                                                                         np.asarray(dst[k]))),
          "missing_from_trained": sorted(set(src) - set(dst))}


# -- evaluation --------------------------------------------------------------------------------

class RoutedEval:
  """The routed model's own deterministic forward (one jit per config): NLL, executed depth
  (`train.step.executed_depth`) and per-layer routed fraction. `density` (traced) is the P of
  `random` gates; `key` their rng."""

  def __init__(self, cfg):
    self.model = models.build(cfg)
    self.granularity = cfg.skip.granularity

    def run(p, inputs, targets, key, density):
      logits, v = self.model.apply({"params": p}, inputs, deterministic=True, density=density,
                                   rngs={"gate": key}, mutable=["gates"])
      nll = step_lib.token_nll(logits, targets)                                 # [B, T]
      gates = v["gates"]
      names = models.layout.sown_names(gates)
      if "layer_mask" in names:
        per = models.per_layer(gates, "layer_mask")                             # [L, B, T]
      else:
        per = sum(models.per_layer(gates, n) for n in ("attn_mask", "ffn_mask") if n in names) / 2
      return jnp.sum(nll), jnp.sum(step_lib.executed_depth(gates)), jnp.sum(per, axis=(1, 2))
    self._run = jax.jit(run)

  def __call__(self, params, batches, seed: int = 0, density: float = 1.0) -> Dict[str, Any]:
    total = depth = count = 0.0
    per = 0.0
    for i, b in enumerate(batches):
      s, d, pl = self._run(params, jnp.asarray(b["inputs"], jnp.int32), jnp.asarray(b["targets"], jnp.int32),
                           jax.random.fold_in(jax.random.key(seed), i), jnp.asarray(density, jnp.float32))
      total, depth, per = total + float(s), depth + float(d), per + np.asarray(pl, np.float64)
      count += b["targets"].size
    return {"nll": total / count, "ppl": float(np.exp(total / count)), "depth": depth / count,
            "layer_density": (per / count).tolist()}


class BlockRunner:
  """Embedding and head of `skipjax.depth.runner.PlanRunner`, plus per-layer jitted Block calls for
  (i) the applied oracle at a threshold (the Block's own `oracle_threshold` gate) and (ii) the
  routed layer re-walked with a threshold τ on the router's probability. One compile per block
  function serves all 30 layers, so a threshold search costs no full-model compile."""

  def __init__(self, cfg, params):
    self.dense_cfg = dataclasses.replace(cfg, skip=models.SkipConfig(), oracle_threshold=0.0)
    self.cfg = cfg
    self.L = cfg.num_layers
    self.params = importance.loop_params(params)
    dense_params = {k: ({n: w for n, w in v.items() if "router" not in n} if k.startswith("block_") else v)
                    for k, v in self.params.items()}
    self.plan = runner_lib.PlanRunner(self.dense_cfg, dense_params)
    self._oracle = {}
    self._walk = None

  def _positions(self, x):
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

  def oracle_fn(self, threshold: float):
    if threshold not in self._oracle:
      block = Block(applied.with_threshold(self.dense_cfg, threshold), True)

      def run(p, x):
        y, v = block.apply({"params": p}, x, self._positions(x), None, mutable=["gates"])
        g = v["gates"]
        return y, jnp.sum(g["attn_mask"][0] + g["ffn_mask"][0]) / 2                # layer units
      self._oracle[threshold] = jax.jit(run)
    return self._oracle[threshold]

  def oracle(self, threshold: float, batches) -> Dict[str, float]:
    """Applied oracle (RR §4.4) at `threshold`: NLL and depth (attention + FFN blocks run, / 2)."""
    fn = self.oracle_fn(threshold)
    total = count = depth = 0.0
    for b in batches:
      x = self.plan.embed(b)
      for l in range(self.L):
        x, d = fn(self.plan.params[f"block_{l}"], x)
        depth += float(d)
      s, c = self.plan.head(x, b)
      total, count = total + s, count + c
    return {"threshold": threshold, "nll": total / count, "ppl": float(np.exp(total / count)), "depth": depth / count}

  def walk(self, tau: float, batches) -> Dict[str, float]:
    """The routed model (layer granularity) re-walked: m = [p > τ] with p = softmax(router logits)[1]
    (τ = 0.5: the model's argmax), y = F(x) where m else x."""
    if self.cfg.skip.granularity != "layer":
      raise ValueError("RouterWalk needs config.model.skip.granularity='layer'")
    if self._walk is None:
      cfg = self.dense_cfg
      block = Block(cfg, True)
      norm = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, cfg.compute_dtype)
      reads_norm = getattr(self.cfg.skip, "router_input", "stream") == "norm"

      def run(p, router, x, tau):
        u = norm.apply({"params": p["ln_attn"]}, x) if reads_norm else x           # router input
        logits = jnp.dot(u.astype(jnp.float32), router["kernel"]) + router.get("bias", 0.0)
        m = jax.nn.softmax(logits, axis=-1)[..., 1] > tau                          # [B, T]
        y = block.apply({"params": p}, x, self._positions(x))
        return jnp.where(m[..., None], y, x), jnp.sum(m)
      self._walk = jax.jit(run)
    total = count = 0.0
    per = np.zeros(self.L)
    for b in batches:
      x = self.plan.embed(b)
      for l in range(self.L):
        p = self.params[f"block_{l}"]
        x, d = self._walk(self.plan.params[f"block_{l}"], p["router"], x, jnp.asarray(tau, jnp.float32))
        per[l] += float(d)
      s, c = self.plan.head(x, b)
      total, count = total + s, count + c
    return {"tau": float(tau), "nll": total / count, "ppl": float(np.exp(total / count)),
            "depth": float(per.sum() / count), "layer_density": (per / count).tolist()}


def search(fn, target: float, lo: float, hi: float, decreasing: bool, iters: int, tol: float) -> List[Dict]:
  """Bisection of a monotone depth(x) to `target`; returns every evaluated row (fn(x) → dict with 'depth')."""
  rows = []
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    r = fn(mid)
    rows.append(r)
    if abs(r["depth"] - target) <= tol:
      break
    if (r["depth"] > target) == decreasing:
      lo = mid
    else:
      hi = mid
  return rows


def closest(rows: Sequence[Dict], target: float) -> Dict:
  return min(rows, key=lambda r: abs(r["depth"] - target))


# -- static pruning at a depth -----------------------------------------------------------------

class Static:
  """Importance scores of experiments/static_pruning.py (saved in `--static_dir`, else computed
  here) and the test NLL of their plans (cached; seeded from the saved plan NLLs)."""

  def __init__(self, args, cfg, params, runner: runner_lib.PlanRunner, stages: sp.Stages, test, tag: str, calib):
    self.cfg, self.params, self.runner, self.calib, self.L = cfg, params, runner, calib, cfg.num_layers
    self.scores: Dict[str, Dict[str, Any]] = {}
    saved = os.path.join(args.static_dir, "stages") if args.static_dir else ""
    for m in args.measures:
      path = os.path.join(saved, f"scores_{m}.json")
      if saved and os.path.exists(path):
        with open(path) as f:
          self.scores[m] = json.load(f)
      else:
        counts = runner_lib.removal_counts(self.L, args.fractions)
        self.scores[m] = stages.get(f"scores_{m}", lambda m=m: runner_lib.scores_stage(
            m, cfg, params, runner, calib, counts, stages.path("sleb_progress"), args.sleb_steps))
    self.evals = sp.PlanEvals(runner, test, stages.path(f"evals_{tag}"))
    seed = os.path.join(saved, f"evals_{tag}.json")
    if saved and os.path.exists(seed):
      with open(seed) as f:
        for k, v in json.load(f).items():
          self.evals.cache.setdefault(k, v)

  def removed(self, m: str, n: int) -> Optional[List[int]]:
    s = self.scores[m]
    if n == 0:
      return []
    if str(n) in s.get("removed", {}):
      return [int(u) for u in s["removed"][str(n)]]
    if m == "sleb":
      return [int(u) for u in s["order"][:n]] if n <= len(s["order"]) else None
    if m == "angular":
      dist = s["raw"].get("distances_by_n", {}).get(str(n))
      if dist is None:
        dist = np.asarray(importance.angular_distances(self.cfg, self.params, self.calib, n)).tolist()
        s["raw"].setdefault("distances_by_n", {})[str(n)] = dist
      return prune_lib.choose(importance.Scores("angular", np.asarray(s["layer"]), None, {"distances": dist}), n,
                              "layer", list(range(self.L)))
    scores = importance.Scores(m, np.asarray(s["layer"]), None, {})
    return [int(u) for u in prune_lib.choose(scores, n, "layer", list(range(self.L)))]

  def at_depth(self, m: str, depth: float) -> Optional[Dict[str, Any]]:
    """Static pruning by measure `m` interpolated to `depth` (log-ppl linear in depth)."""
    n_star = self.L - depth
    n_lo, n_hi = int(math.floor(n_star + 1e-9)), int(math.ceil(n_star - 1e-9))
    rows = {}
    for n in sorted({max(n_lo, 0), max(n_hi, 0)}):
      removed = self.removed(m, n)
      if removed is None:
        return None
      rows[n] = {"n": n, "removed": removed, "nll": self.evals(plan_lib.drop(self.L, removed))}
    lo, hi = rows[max(n_lo, 0)], rows[max(n_hi, 0)]
    w = 0.0 if hi["n"] == lo["n"] else (n_star - lo["n"]) / (hi["n"] - lo["n"])
    nll = (1 - w) * lo["nll"] + w * hi["nll"]
    return {"depth": depth, "nll": nll, "ppl": float(np.exp(nll)), "lo": lo, "hi": hi}

  def curve(self, m: str) -> List[List[float]]:
    """(depth, nll) of every plan of measure `m` evaluated so far."""
    out = []
    for n in range(self.L):
      removed = self.removed_cached(m, n)
      if removed is None:
        continue
      key = plan_lib.to_string(plan_lib.drop(self.L, removed))
      if key in self.evals.cache:
        out.append([self.L - n, self.evals.cache[key]])
    return out

  def removed_cached(self, m: str, n: int) -> Optional[List[int]]:
    """`removed` without computing new angular distances."""
    s = self.scores[m]
    if m == "angular" and n and str(n) not in s.get("removed", {}) and str(n) not in s["raw"].get(
        "distances_by_n", {}):
      return None
    return self.removed(m, n)


# -- report ------------------------------------------------------------------------------------

def figure(res: Dict[str, Any], path: str) -> str:
  plt = sp._pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  L = res["model"]["num_layers"]
  for i, (m, pts) in enumerate(res["static_curves"].items()):
    pts = sorted(p for p in pts if p[0] >= res["figure_min_depth"])
    if pts:
      ax.plot([p[0] for p in pts], [np.exp(p[1]) for p in pts], "o-", ms=3, lw=1, color=f"C{i}", alpha=0.7,
              label=f"static: {m}")
  for k, run in enumerate(res["runs"]):
    lab = lambda s: s if k == 0 else None
    r = run["routers"]
    ax.plot([r["depth"]], [r["ppl"]], "*", ms=16, color="k", mfc="gold", label=lab("routers (argmax)"), zorder=5)
    ax.annotate(f"P={run['target_density']:g}", (r["depth"], r["ppl"]), fontsize=7, xytext=(6, 6),
                textcoords="offset points")
    if run.get("routers_tau"):
      t = run["routers_tau"]
      ax.plot([t["depth"]], [t["ppl"]], "P", ms=11, color="k", mfc="orange", label=lab("routers (τ → depth P·L)"),
              zorder=5)
      ax.annotate(f"P={run['target_density']:g}, τ={t['tau']:.2f}", (t["depth"], t["ppl"]), fontsize=7,
                  xytext=(6, 6), textcoords="offset points")
    for j, b in enumerate([run] + ([run["at_tau"]] if run.get("at_tau") else [])):
      lab2 = lambda s: s if k == 0 and j == 0 else None
      o = b["oracle"]
      ax.plot([o["depth"]], [o["ppl"]], "s", ms=9, color="k", mfc="C9", label=lab2("applied oracle (RR)"), zorder=4)
      rnd = b["random"]
      ax.errorbar([np.mean(rnd["depth"])], [rnd["ppl_mean"]], yerr=[[rnd["ppl_mean"] - min(rnd["ppl"])],
                  [max(rnd["ppl"]) - rnd["ppl_mean"]]], fmt="v", ms=9, color="k", mfc="grey", capsize=3,
                  label=lab2(f"random Bernoulli ({len(rnd['ppl'])} seeds, min–max)"), zorder=4)
  ax.plot([L], [res["full"]["ppl"]], "o", ms=10, color="k", label="full model", zorder=5)
  ax.set_yscale("log")
  ax.set_xlabel(f"mean executed depth (layers of {L}; oracle: attention + FFN blocks / 2)")
  ax.set_ylabel(f"WikiText-2 test perplexity ({res['data']['test']['tokens']} tokens)")
  ax.set_title(f"{res['model']['name']}: routers trained on the frozen model vs static pruning,\n"
               f"oracle and random skipping ({res['model']['weights']})", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.invert_xaxis()
  ax.legend(fontsize=7, ncol=2, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _baseline_rows(p: float, b: Dict[str, Any]) -> List[str]:
  lines = []
  for m, st in b["static"].items():
    if st is None:
      lines.append(f"| {p:g} | static: {m} | – | – |")
      continue
    span = (f"n = {st['lo']['n']}: {np.exp(st['lo']['nll']):.2f}" if st["lo"]["n"] == st["hi"]["n"] else
            f"n = {st['lo']['n']}: {np.exp(st['lo']['nll']):.2f}, n = {st['hi']['n']}: {np.exp(st['hi']['nll']):.2f}")
    lines.append(f"| {p:g} | static: {m} (interpolated; {span}) | {st['depth']:.2f} | {st['ppl']:.2f} |")
  o = b["oracle"]
  lines.append(f"| {p:g} | applied oracle (blocks with ratio < {o['threshold']:.4f} skipped) | {o['depth']:.2f} | "
               f"{o['ppl']:.2f} |")
  rnd = b["random"]
  lines.append(f"| {p:g} | random Bernoulli({rnd['density']:.3f}), {len(rnd['ppl'])} seeds | "
               f"{np.mean(rnd['depth']):.2f} | {rnd['ppl_mean']:.2f} ± {rnd['ppl_std']:.2f} |")
  return lines


def markdown(res: Dict[str, Any]) -> str:
  L = res["model"]["num_layers"]
  s = res["setup"]
  lines = [f"## Routers on the frozen {res['model']['name']} ({res['model']['weights']})", "",
           f"Routers: `{s['router']}`, granularity `{s['granularity']}`, options {s['options'] or '{}'}, λ = "
           f"{s['aux_weight']}; test: {res['data']['test']['tokens']} tokens of `test.txt`. Full model: perplexity "
           f"**{res['full']['ppl']:.2f}** at depth {L}.", ""]
  for run in res["runs"]:
    t = run["train"]
    lines.append(f"* P = {run['target_density']:g}: {t['steps']} steps × {t['batch']} × {t['seq_len']} = "
                 f"{t['train_tokens']} tokens of `valid.txt`, AdamW lr {t['lr']}, {t['num_trainable_params']} "
                 f"trainable parameters, {t['wall_seconds']:.0f} s")
  lines += ["", "| P | method | executed depth | test ppl |", "|---|---|---|---|"]
  for run in res["runs"]:
    p = run["target_density"]
    r = run["routers"]
    lines.append(f"| {p:g} | **routers, argmax** | {r['depth']:.2f} | **{r['ppl']:.2f}** |")
    lines += _baseline_rows(p, run)
    if run.get("routers_tau"):
      t = run["routers_tau"]
      lines.append(f"| {p:g} | **routers, p > τ = {t['tau']:.3f}** (depth → P·L = {p * L:g}) | {t['depth']:.2f} | "
                   f"**{t['ppl']:.2f}** |")
    if run.get("at_tau"):
      lines += _baseline_rows(p, run["at_tau"])
  lines += ["", "Router density per layer (argmax, test):", ""]
  for run in res["runs"]:
    lines.append(f"* P = {run['target_density']:g}: " + " ".join(f"{d:.2f}" for d in run["routers"]["layer_density"]))
  lines += ["", "Parameters changed by router training (non-router leaves must be 0): " + "; ".join(
      f"P = {run['target_density']:g}: {len(run['params_check']['non_router_changed'])} of "
      f"{run['params_check']['non_router_leaves']} non-router, {run['params_check']['router_changed']} of "
      f"{run['params_check']['router_leaves']} router" for run in res["runs"]),
            "", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["wall_seconds"].items()), ""]
  return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def baselines_at(args, depth: float, rcfg, rparams) -> Dict[str, Any]:
  """Static pruning (interpolated), the applied oracle (threshold bisected) and random skipping
  (Bernoulli(depth / L), one draw per token and gate) at executed depth `depth`."""
  c = _CONTEXT
  L = rcfg.num_layers
  out = {"depth": depth, "static": {m: c["static"].at_depth(m, depth) for m in args.measures}}
  br = BlockRunner(rcfg, rparams)
  rows = search(lambda t: br.oracle(t, c["probe"]), depth, 0.0, args.oracle_max_threshold, True, args.search_iters,
                args.tol)
  t = closest(rows, depth)["threshold"]
  final = br.oracle(t, c["test"]) if c["probe"] is not c["test"] else closest(rows, depth)
  refine = []
  lo, hi = (0.0, t) if final["depth"] < depth else (t, args.oracle_max_threshold)
  for _ in range(args.refine_iters):  # on the test tokens themselves, to land on the same depth
    if abs(final["depth"] - depth) <= args.tol:
      break
    mid = 0.5 * (lo + hi)
    r = br.oracle(mid, c["test"])
    refine.append(r)
    if abs(r["depth"] - depth) < abs(final["depth"] - depth):
      final = r
    lo, hi = (mid, hi) if r["depth"] > depth else (lo, mid)
  out["oracle"] = dict(final, search=rows, refine=refine, target_depth=depth)
  if c.get("random_eval") is None:
    c["random_eval"] = RoutedEval(dataclasses.replace(
        rcfg, skip=dataclasses.replace(rcfg.skip, router="random", target_density=0.5)))
  rnd = [c["random_eval"](rparams, c["test"], seed=s, density=depth / L) for s in args.random_seeds]
  ppl = [r["ppl"] for r in rnd]
  out["random"] = {"density": depth / L, "seeds": list(args.random_seeds), "nll": [r["nll"] for r in rnd],
                   "ppl": ppl, "depth": [r["depth"] for r in rnd], "ppl_mean": float(np.mean(ppl)),
                   "ppl_std": float(np.std(ppl))}
  return out


# Objects the stages share within one call of `run` (test tokens, static scores, compiled evals).
_CONTEXT: Dict[str, Any] = {}


def run(args) -> Dict[str, Any]:
  t_start = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  stages = sp.Stages(args.workdir)
  load_start = os.getloadavg()
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  cfg, params, tok_json, source = load_source(args)
  L = cfg.num_layers
  tokenizer = inputs.HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(tok_json)), cfg.vocab_size)
  test = sp.text_batches(os.path.join(args.data_dir, "test.txt"), tokenizer, args.test_len, args.test_sequences,
                         args.batch_size)
  calib = sp.text_batches(os.path.join(args.data_dir, "valid.txt"), tokenizer, args.calib_len, args.calib_sequences,
                          args.batch_size)
  probe = test[:1] if args.search_sequences else test
  if args.search_sequences:
    probe = [{k: v[:args.search_sequences] for k, v in test[0].items()}]
  tag = f"{args.test_sequences}x{args.test_len}"
  runner = runner_lib.PlanRunner(cfg, params)
  wall = {"load": time.time() - t_start}

  full = dict(stages.get(f"full_{tag}", lambda: {"nll": runner.nll("", test)}))
  full["ppl"] = float(np.exp(full["nll"]))
  wall["full model"] = full["wall_seconds"]
  if args.static_dir and os.path.exists(os.path.join(args.static_dir, "stages", f"base_{tag}.json")):
    with open(os.path.join(args.static_dir, "stages", f"base_{tag}.json")) as f:
      full["static_pruning_nll"] = json.load(f)["test_nll"]  # the same tokens: must agree

  t0 = time.time()
  static = Static(args, cfg, params, runner, stages, test, tag, calib)
  wall["static scores"] = time.time() - t0
  trainings = {}
  for density in args.densities:  # every training first (the long stages), then the evaluations
    key = f"P{density:g}"
    trainings[density] = stages.get(f"train_{key}", lambda d=density: train_routers(args, d, source, tok_json))
    wall[f"train {key}"] = trainings[density]["wall_seconds"]
  if args.train_only:
    return {}
  _CONTEXT.clear()
  _CONTEXT.update(static=static, test=test, probe=probe)
  runs = []
  for density in args.densities:
    key = f"P{density:g}"
    tr = trainings[density]
    trained = prune_lib.load_source(tr["train_dir"])
    rcfg, rparams = trained.cfg, importance.loop_params(trained.params)

    def evaluate_routers(rcfg=rcfg, rparams=rparams):
      routed = RoutedEval(rcfg)
      out = {"routers": routed(rparams, test), "params_check": params_check(params, rparams)}
      if rcfg.skip.granularity == "layer":
        br = BlockRunner(rcfg, rparams)
        # The re-walk at τ = 0.5 equals the model's own argmax forward (on the search tokens).
        out["walk_check"] = {"walk": br.walk(0.5, probe), "model": routed(rparams, probe)}
        if args.tau_search:
          target = density * L
          rows = search(lambda t: br.walk(t, probe), target, 0.0, 1.0, True, args.search_iters, args.tol)
          tau = closest(rows, target)["tau"]
          out["routers_tau"] = dict(br.walk(tau, test), search=rows, target_depth=target)
      return out
    ev = stages.get(f"eval_{key}_{tag}", evaluate_routers)
    wall[f"eval routers {key}"] = ev["wall_seconds"]
    bl = stages.get(f"baselines_{key}_{tag}", lambda: baselines_at(args, ev["routers"]["depth"], rcfg, rparams))
    wall[f"baselines {key}"] = bl["wall_seconds"]
    extra = {}
    if ev.get("routers_tau"):  # the same baselines at the depth of the threshold-routed routers (≈ P·L)
      extra = stages.get(f"baselines_tau_{key}_{tag}", lambda: baselines_at(args, ev["routers_tau"]["depth"], rcfg,
                                                                            rparams))
      wall[f"baselines at τ depth {key}"] = extra["wall_seconds"]
      extra = {"at_tau": {k: v for k, v in extra.items() if k != "wall_seconds"}}
    runs.append({"target_density": density, "train": tr, **{k: v for k, v in ev.items() if k != "wall_seconds"},
                 **{k: v for k, v in bl.items() if k != "wall_seconds"}, **extra})

  res = {"model": {"key": args.model, "name": sp.MODEL_NAMES[args.model], "source": source, "num_layers": L,
                   "d_model": cfg.d_model, "weights": sp.QUANT_NOTE if args.model != "tiny" else "random init, fp32"},
         "data": {"train": {"file": os.path.join(args.data_dir, "valid.txt")},
                  "test": {"file": os.path.join(args.data_dir, "test.txt"), "sequences": args.test_sequences,
                           "seq_len": args.test_len, "tokens": sp.num_tokens(test)},
                  "calibration": {"sequences": args.calib_sequences, "seq_len": args.calib_len},
                  "search_tokens": sp.num_tokens(probe)},
         "setup": {"router": args.router, "granularity": args.granularity, "options": router_options(args),
                   "aux_weight": args.aux_weight, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                   "lr": args.lr, "densities": list(args.densities), "static_dir": args.static_dir,
                   "measures": list(args.measures)},
         "full": full, "runs": runs,
         "static_curves": {m: static.curve(m) for m in args.measures},
         "figure_min_depth": max(0.0, min([r["routers"]["depth"] for r in runs]
                                          + [r["routers_tau"]["depth"] for r in runs if r.get("routers_tau")]) - 4),
         "machine": args.machine, "load_average": {"start": list(load_start), "end": list(os.getloadavg())}}
  wall["total (this call)"] = time.time() - t_start
  res["wall_seconds"] = wall
  res["figure"] = figure(res, os.path.join(args.workdir, "router_tuning.png"))
  md = markdown(res)
  with open(os.path.join(args.workdir, "router_tuning.md"), "w") as f:
    f.write(md + "\n")
  sp._write_json(os.path.join(args.workdir, "router_tuning.json"), res)
  print(md)
  if args.copy_figure:
    os.makedirs(args.copy_figure, exist_ok=True)
    shutil.copy(res["figure"], os.path.join(args.copy_figure, f"router_tuning_{args.model}.png"))
  return res


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, choices=["smollm2", "tiny"])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tiny_layers", type=int, default=4, help="layers of the --model=tiny decoder")
  parser.add_argument("--data_dir", default=os.path.normpath(sp.WIKITEXT), help="folder with valid.txt and test.txt")
  parser.add_argument("--static_dir", default="", help="an experiments/static_pruning.py workdir of the same model "
                      "and test tokens: its scores and plan NLLs are reused ('' = compute the measures here)")
  parser.add_argument("--measures", default=",".join(sp.MEASURES))
  parser.add_argument("--fractions", default="0,0.1,0.2,0.25,0.3,0.4,0.5", help="removal counts when computing scores")
  parser.add_argument("--sleb_steps", type=int, default=8, help="SLEB greedy steps when computed here")
  parser.add_argument("--densities", default="0.9,0.8", help="target densities P")
  parser.add_argument("--router", default="gumbel")
  parser.add_argument("--granularity", default="layer", choices=["layer", "block", "ffn"])
  parser.add_argument("--gate_form", default="residual", help="skip.gate_form where available ('' = default)")
  parser.add_argument("--router_input", default="norm", help="skip.router_input where available ('' = default)")
  parser.add_argument("--router_bias_init", default="target", help="skip.router_bias_init where available")
  parser.add_argument("--aux_weight", type=float, default=2.0, help="λ of the capacity loss")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--checkpoint_every", type=int, default=20)
  parser.add_argument("--test_sequences", type=int, default=8)
  parser.add_argument("--test_len", type=int, default=256)
  parser.add_argument("--calib_sequences", type=int, default=8)
  parser.add_argument("--calib_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=8, help="eval batch")
  parser.add_argument("--random_seeds", default="0,1,2")
  parser.add_argument("--search_sequences", type=int, default=2,
                      help="test sequences the threshold bisections run on (0 = all); the result is re-run on all")
  parser.add_argument("--search_iters", type=int, default=7)
  parser.add_argument("--refine_iters", type=int, default=2, help="oracle bisection steps on all test tokens")
  parser.add_argument("--tol", type=float, default=0.1, help="depth tolerance (layers) of the searches")
  parser.add_argument("--oracle_max_threshold", type=float, default=0.6)
  parser.add_argument("--no_tau_search", dest="tau_search", action="store_false",
                      help="skip the routers-at-P·L threshold search")
  parser.add_argument("--train_only", action="store_true", help="stop after the router trainings")
  parser.add_argument("--machine", default="2-core CPU shared with other jobs")
  parser.add_argument("--copy_figure", default="", help="copy the figure here as router_tuning_<model>.png")
  args = parser.parse_args(argv)
  args.measures = sp.parse_measures(parser, args.measures)
  args.densities = [float(d) for d in args.densities.split(",") if d]
  if not args.densities or any(not 0 < d <= 1 for d in args.densities):
    parser.error(f"--densities={args.densities!r}: each P must be in (0, 1]")
  args.random_seeds = [int(s) for s in args.random_seeds.split(",") if s]
  args.fractions = [float(f) for f in args.fractions.split(",")]
  return args


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
