"""LtS Fig. 6, round two: learned routing (both gate forms) vs Mixture-of-Depths vs random gating vs
the dense model of equal compute, over seeds.

    python -m experiments.learned_vs_random --workdir=/tmp/lvr [--steps 600] [--seeds 0,1,2] \
        [--densities 0.5,0.125] [--wikitext_densities 0.5,0.125] [--methods ...] [--batch_size 32]

Methods (all `configs/skiplayer.py:tiny`, `--num_layers` L (8), same data, schedule and seed per row):
  learned_paper     ST-Gumbel router, LtS Eq. 1/4 as written (`skip.gate_form='paper'`)
  learned_residual  ST-Gumbel router, y = x + m·g₁·(F(x) − x) (`skip.gate_form='residual'`:
                    the router's gradient is ⟨∂L/∂y, R(x)⟩, "does this layer help", issue 15 P1)
  mod               Mixture-of-Depths (Raposo et al. 2024): expert-choice top-k, C = P·T per
                    sequence, router weight r × block output (MoD Eq. 1), every layer routed
  mod_sigmoid       the same with σ(r) × block output (`skip.mod_weight='sigmoid'`, not in the paper)
  random            Bernoulli(P) gating (LtS "Rand")
  dense             round(L·P) dense layers: the compute the routed models spend on average
on the embedded synthetic task and, when `../shared/data/wikitext-2` exists, WikiText-2 (train:
valid.txt, held out: test.txt, byte tokens), at each P, for every seed. Learned routers are
evaluated with argmax routing (LtS's rule, logged during training: its density can drift from P,
so the executed depth is always reported beside the loss) and with gates sampled as in training;
MoD with its causal rule (the one decoding uses, and its logged eval) and with its training rule
(top-k over the whole sequence: not causal). Step time: one forward+backward of each method's model, measured in one
run round robin after training, with masked dispatch (what the runs trained with) and with the
compute-saving dispatch (`capacity` for the routers, top-k gather for MoD), as a ratio to the dense
model of all L layers.

Every run is a training workdir `<workdir>/<dataset>_P<P>_<method>_s<seed>`: re-running resumes
unfinished runs and reuses finished ones. Writes `<workdir>/learned_vs_random.json` (every run's
final eval; mean ± std over seeds), `<workdir>/learned_vs_random.md` (the table) and
`<workdir>/learned_vs_random.png` (eval loss vs executed depth per cell).
"""
import argparse
import dataclasses
import functools
import json
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import routing as routing_bench  # noqa: E402
from benchmarks import timing  # noqa: E402
from configs import skiplayer  # noqa: E402
from skipjax import data as data_lib  # noqa: E402
from skipjax import decode  # noqa: E402
from skipjax import models  # noqa: E402
from skipjax.train import loop  # noqa: E402
from skipjax.train import step as step_lib  # noqa: E402
from skipjax.train.metrics import read_metrics  # noqa: E402

WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"

# config.model.skip overrides per routed method (dense changes the depth instead).
METHODS = {
    "learned_paper": dict(router="gumbel", gate_form="paper"),
    "learned_residual": dict(router="gumbel", gate_form="residual"),
    "mod": dict(router="mod", mod_every=1),
    "mod_sigmoid": dict(router="mod", mod_every=1, mod_weight="sigmoid"),
    "random": dict(router="random"),
    "dense": None,
}
LABELS = {"learned_paper": "learned, paper form", "learned_residual": "learned, residual form",
          "mod": "MoD (top-k), r", "mod_sigmoid": "MoD (top-k), σ(r)", "random": "random gating",
          "dense": "dense, L·P layers"}


def datasets(args):
  """(name, data config overrides, densities P) per dataset."""
  yield "synthetic", {}, _floats(args.densities)
  wikitext = pathlib.Path(args.wikitext)
  if (wikitext / "valid.txt").exists() and _floats(args.wikitext_densities):
    yield ("wikitext2", {"source": f"text:{wikitext / 'valid.txt'}", "eval_source": f"text:{wikitext / 'test.txt'}"},
           _floats(args.wikitext_densities))


def _floats(csv: str) -> list:
  return [float(x) for x in csv.split(",") if x]


def _workdir(args, name: str, density: float, method: str, seed: int) -> str:
  return os.path.join(args.workdir, f"{name}_P{density:g}_{method}_s{seed}")


def make_config(data_overrides: dict, method: str, density: float, seed: int, args):
  config = skiplayer.get_config("tiny")
  config.seed = seed
  config.data.update(data_overrides)
  config.data.update(batch_size=args.batch_size, seq_len=args.seq_len)
  config.model.update(num_layers=args.num_layers, d_model=args.d_model, d_ff=4 * args.d_model)
  warmup = round(args.steps * args.warmup_fraction)
  if METHODS[method] is None:
    config.model.num_layers = max(round(config.model.num_layers * density), 1)
    config.model.skip.update(router="none", target_density=1.0, density_warmup_steps=0)
  else:  # MoD's top-k capacity ⌊P·T⌋ is static: it has no density warm-up
    config.model.skip.update(target_density=density, density_warmup_steps=0 if _is_mod(method) else warmup,
                             **METHODS[method])
  config.train.update(num_steps=args.steps, eval_every_steps=max(args.steps // 4, 1), progress_bar=False,
                      checkpoint_every_steps=max(args.steps // 2, 1), eval_batches=args.eval_batches)
  return config


def _is_mod(method: str) -> bool:
  return (METHODS[method] or {}).get("router") == "mod"


def run(name, data_overrides, method, density, seed, args) -> dict:
  workdir = _workdir(args, name, density, method, seed)
  loop.train_and_evaluate(make_config(data_overrides, method, density, seed, args), workdir)
  records = [r for r in read_metrics(workdir) if "eval_loss" in r]
  return {"final": _eval_fields(records[-1])}


def extra_eval(workdir: str, deterministic: bool = True, **skip_overrides) -> dict:
  """Eval metrics of the workdir's final params, with gates sampled as in training
  (`deterministic=False`) or with other `config.model.skip` fields (e.g. MoD's causal rule)."""
  restored = decode.restore(workdir)
  config = restored.config
  model = restored.model
  if skip_overrides:
    cfg = model.config
    model = models.build(dataclasses.replace(cfg, skip=dataclasses.replace(cfg.skip, **skip_overrides)))
  eval_ds = data_lib.get_dataset(config.data, split="eval", seed=config.seed, workdir=workdir)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model, deterministic=deterministic,
                                      num_classes=len(data_lib.DIFFICULTY_CLASSES)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return _eval_fields(loop.evaluate(eval_fn, restored.params, eval_ds, config.train.eval_batches, device))


def _eval_fields(record: dict) -> dict:
  return {k: round(float(v), 4) for k, v in record.items()
          if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def step_times(densities, args) -> dict:
  """Forward+backward seconds of each method's model (random init) at each P, round robin in one
  run, as a ratio to the dense model of all L layers; masked dispatch and `capacity` for the routers (MoD:
its top-k gather)."""
  tokens = jax.random.randint(jax.random.key(0), (args.batch_size, args.seq_len), 0, 256)
  base = make_config({}, "random", 1.0, 0, args)

  def cfg(method, density, dispatch):
    c = make_config({}, method, density, 0, args)
    if METHODS[method] is not None:
      c.model.skip.update(dispatch=dispatch, density_warmup_steps=0)
    c.model.vocab_size = 256
    return models.TransformerConfig.from_dict(c.model)

  def timed(model_cfg):
    fn, fn_args = routing_bench.step_fn(model_cfg, tokens)  # compiled once, then timed round robin
    return lambda: jax.block_until_ready(fn(*fn_args))

  base.model.skip.update(router="none", target_density=1.0, density_warmup_steps=0)
  base.model.vocab_size = 256
  fns = {"dense_full": timed(models.TransformerConfig.from_dict(base.model))}
  for density in densities:
    for method in args.methods:
      if METHODS[method] is None or _is_mod(method):  # MoD trains with its top-k gather whatever the dispatch
        fns[f"{method}_P{density:g}"] = timed(cfg(method, density, "masked"))
        continue
      fns[f"{method}_P{density:g}_masked"] = timed(cfg(method, density, "masked"))
      fns[f"{method}_P{density:g}_capacity"] = timed(cfg(method, density, "capacity"))
  seconds = timing.round_robin(fns, args.timing_repeats)
  return {k: {"ms": round(v * 1e3, 2), "vs_dense_full": round(v / seconds["dense_full"], 3)} for k, v in seconds.items()}


def record(runs: dict, cell: str, method: str, final: dict, evaluate) -> None:
  """One seed's evaluations appended to `runs[(cell, method, kind)]`: `final` (the run's logged final
  eval: argmax routing for routers, MoD's causal rule, the dense model) and, from `evaluate(**kw)`
  (`extra_eval` of its workdir), learned routers with sampled gates and MoD with its top-k rule."""
  if METHODS[method] is None:
    runs.setdefault((cell, method, "dense"), []).append(final)
  elif _is_mod(method):  # its logged eval uses the causal rule (skip.mod_eval='causal'), as decoding does
    runs.setdefault((cell, method, "causal"), []).append(final)
    runs.setdefault((cell, method, "top-k"), []).append(evaluate(mod_eval="topk"))
  else:
    runs.setdefault((cell, method, "argmax"), []).append(final)
    if method.startswith("learned"):
      runs.setdefault((cell, method, "sampled"), []).append(evaluate(deterministic=False))


def summarize(runs: dict) -> dict:
  """mean ± std over seeds of every eval field, per (cell, method, evaluation)."""
  out = {}
  for (cell, method, kind), per_seed in runs.items():
    keys = set.intersection(*(set(r) for r in per_seed))
    out.setdefault(cell, {}).setdefault(method, {})[kind] = {
        k: {"mean": round(float(np.mean([r[k] for r in per_seed])), 4),
            "std": round(float(np.std([r[k] for r in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0, 4),
            "n": len(per_seed)} for k in sorted(keys)}
  return out


def table(summary: dict, times: dict) -> str:
  lines = ["| data, P | method | eval | eval loss (nats/token) | executed layers/token "
           "| step time vs dense, all L layers (masked / capacity) |",
           "|---|---|---|---|---|---|"]
  for cell, by_method in summary.items():
    density = cell.split("_P")[1]
    for method, by_kind in by_method.items():
      for kind, fields in by_kind.items():
        loss = fields["eval_loss"]
        depth = fields.get("eval_executed_depth", fields.get("eval_depth"))
        depth_s = f"{depth['mean']:.2f} ± {depth['std']:.2f}" if depth else "—"
        t = [times.get(f"{method}_P{density}{suffix}", {}).get("vs_dense_full") for suffix in ("_masked", "_capacity", "")]
        t_s = " / ".join(f"{x:.2f}×" for x in t if x is not None) or "—"
        lines.append(f"| {cell} | {LABELS[method]} | {kind} | {loss['mean']:.3f} ± {loss['std']:.3f} "
                     f"(n={loss['n']}) | {depth_s} | {t_s} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--densities", default="0.5,0.125", help="target densities P on the synthetic task")
  parser.add_argument("--wikitext_densities", default="0.5,0.125", help="target densities P on WikiText-2")
  parser.add_argument("--wikitext", default=str(WIKITEXT), help="folder with valid.txt and test.txt")
  parser.add_argument("--num_layers", type=int, default=8, help="L of the routed models (tiny preset: 8)")
  parser.add_argument("--d_model", type=int, default=128, help="width (tiny preset: 128, d_ff = 4·d)")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--eval_batches", type=int, default=4)
  parser.add_argument("--warmup_fraction", type=float, default=1 / 3,
                      help="dense-to-sparse density warm-up as a fraction of the steps (tiny preset: 200 of 600)")
  parser.add_argument("--timing_repeats", type=int, default=5, help="0: skip the step-time measurement")
  args = parser.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; known: {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  os.makedirs(args.workdir, exist_ok=True)

  runs, all_densities = {}, set()
  for name, overrides, densities in datasets(args):
    for density in densities:
      all_densities.add(density)
      cell = f"{name}_P{density:g}"
      for method in args.methods:
        for seed in seeds:
          final = run(name, overrides, method, density, seed, args)["final"]
          workdir = _workdir(args, name, density, method, seed)
          record(runs, cell, method, final, functools.partial(extra_eval, workdir))
  summary = summarize(runs)
  times = step_times(sorted(all_densities), args) if args.timing_repeats else {}

  cells = list(summary)
  fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells), 3.8), squeeze=False)
  for ax, cell in zip(axes[0], cells):
    for method, by_kind in summary[cell].items():
      kind = next(iter(by_kind))
      fields = by_kind[kind]
      depth = fields.get("eval_executed_depth", fields.get("eval_depth"))
      x = depth["mean"] if depth else max(round(args.num_layers * float(cell.split("_P")[1])), 1)
      ax.errorbar([x], [fields["eval_loss"]["mean"]], yerr=[fields["eval_loss"]["std"]], fmt="o", capsize=3,
                  label=f"{LABELS[method]} ({kind})")
    ax.set_title(cell.replace("_P", ", P = "))
    ax.set_xlabel("executed layers per token (eval)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.workdir, "learned_vs_random.png"), dpi=120)
  result = {"steps": args.steps, "seeds": seeds, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "num_layers": args.num_layers, "d_model": args.d_model, "warmup_fraction": args.warmup_fraction,
            "summary": summary, "step_time": times,
            "runs": {"|".join(k): v for k, v in runs.items()}}
  with open(os.path.join(args.workdir, "learned_vs_random.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  md = table(summary, times)
  with open(os.path.join(args.workdir, "learned_vs_random.md"), "w", encoding="utf-8") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
