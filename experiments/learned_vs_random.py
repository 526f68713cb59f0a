"""LtS Fig. 6: learned (ST-Gumbel) routing vs random gating at equal density P.

    python -m experiments.learned_vs_random --workdir=/tmp/lvr [--steps 600] [--densities 0.5,0.125] \
        [--wikitext_densities 0.5]

Trains `configs/skiplayer.py:tiny` (8 layers) twice per dataset and density P — `router=gumbel`
and `router=random`, same P, same seed, same data — plus the dense model of the same expected
compute (round(8·P) layers, LtS's "Standard" baseline) on the embedded synthetic task and, when
`../shared/data/wikitext-2` exists, on WikiText-2 (train: valid.txt, held out: test.txt, byte
tokens). Writes `<workdir>/learned_vs_random.json` (final eval loss, and on the synthetic task
per-class loss and executed depth) and `<workdir>/learned_vs_random.png` (eval loss vs step).
The learned router is evaluated twice: with argmax routing (LtS's eval/decoding rule, logged
during training), whose executed density can differ from P, and with gates sampled as in
training ("sampled"), whose density matches the trained r_i ≈ P like the random baseline's.
Every run is a training workdir (`<workdir>/<dataset>_P<P>_<router>`): re-running the command
resumes unfinished runs from their checkpoints and reuses finished ones.
"""
import argparse
import functools
import json
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jax  # noqa: E402

from configs import skiplayer  # noqa: E402
from skipjax import data as data_lib  # noqa: E402
from skipjax import decode  # noqa: E402
from skipjax.train import loop  # noqa: E402
from skipjax.train import step as step_lib  # noqa: E402
from skipjax.train.metrics import read_metrics  # noqa: E402

WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def datasets(args):
  """(name, data config overrides, densities P) per dataset."""
  yield "synthetic", {}, _floats(args.densities)
  wikitext = pathlib.Path(args.wikitext)
  if (wikitext / "valid.txt").exists():
    yield ("wikitext2", {"source": f"text:{wikitext / 'valid.txt'}", "eval_source": f"text:{wikitext / 'test.txt'}"},
           _floats(args.wikitext_densities))


def _floats(csv: str) -> list:
  return [float(x) for x in csv.split(",") if x]


ROUTERS = {"gumbel": "learned (ST-Gumbel)", "random": "random gating", "none": "dense, L·P layers"}


def _workdir(args, name: str, density: float, router: str) -> str:
  return os.path.join(args.workdir, f"{name}_P{density:g}_{router}")


def run(name: str, data_overrides: dict, router: str, density: float, args) -> list:
  config = skiplayer.get_config("tiny")
  config.data.update(data_overrides)
  if router == "none":
    config.model.num_layers = max(round(config.model.num_layers * density), 1)
    config.model.skip.update(router="none", target_density=1.0)
  else:
    config.model.skip.update(router=router, target_density=density)
  config.train.update(num_steps=args.steps, eval_every_steps=max(args.steps // 6, 1), progress_bar=False)
  workdir = _workdir(args, name, density, router)
  loop.train_and_evaluate(config, workdir)
  return [r for r in read_metrics(workdir) if "eval_loss" in r]


def sampled_eval(workdir: str) -> dict:
  """Eval metrics of the workdir's final params with routing gates sampled as in training."""
  restored = decode.restore(workdir)
  config = restored.config
  eval_ds = data_lib.get_dataset(config.data, split="eval", seed=config.seed, workdir=workdir)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=restored.model, deterministic=False,
                                      num_classes=len(data_lib.DIFFICULTY_CLASSES)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return loop.evaluate(eval_fn, restored.params, eval_ds, config.train.eval_batches, device)


def _rounded(record: dict) -> dict:
  return {k: round(v, 4) for k, v in record.items() if k.startswith("eval_") and isinstance(v, float)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--densities", default="0.5,0.125", help="target densities P on the synthetic task")
  parser.add_argument("--wikitext_densities", default="0.5", help="target densities P on WikiText-2")
  parser.add_argument("--wikitext", default=str(WIKITEXT), help="folder with valid.txt and test.txt")
  args = parser.parse_args()
  results = {}
  for name, overrides, densities in datasets(args):
    for density in densities:
      results[name, density] = {router: run(name, overrides, router, density, args) for router in ROUTERS}
  fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
  summary = {}
  for ax, ((name, density), by_router) in zip(axes[0], results.items()):
    for router, records in by_router.items():
      ax.plot([r["step"] for r in records], [r["eval_loss"] for r in records], "o-", label=ROUTERS[router])
    ax.set_title(f"{name}, P = {density:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.legend()
    summary[f"{name}_P{density:g}"] = {router: _rounded(records[-1]) for router, records in by_router.items()}
    summary[f"{name}_P{density:g}"]["gumbel_sampled"] = _rounded(sampled_eval(_workdir(args, name, density, "gumbel")))
  fig.tight_layout()
  fig.savefig(os.path.join(args.workdir, "learned_vs_random.png"), dpi=120)
  with open(os.path.join(args.workdir, "learned_vs_random.json"), "w", encoding="utf-8") as f:
    json.dump({"steps": args.steps, "final_eval": summary}, f, indent=2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
