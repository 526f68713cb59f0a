"""LtS Fig. 6: learned (ST-Gumbel) routing vs random gating at equal density P.

    python -m experiments.learned_vs_random --workdir=/tmp/lvr [--steps 600] [--density 0.5]

Trains `configs/skiplayer.py:tiny` twice per dataset — `router=gumbel` and `router=random`, same
P, same seed, same data — on the embedded synthetic task and, when `../shared/data/wikitext-2`
exists, on WikiText-2 (train: valid.txt, held out: test.txt, byte tokens). Writes
`<workdir>/learned_vs_random.json` and `<workdir>/learned_vs_random.png` (eval loss vs step).
"""
import argparse
import json
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import skiplayer  # noqa: E402
from skipjax.train import loop  # noqa: E402
from skipjax.train.metrics import read_metrics  # noqa: E402

WIKITEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def datasets(wikitext: pathlib.Path):
  yield "synthetic", {}
  if (wikitext / "valid.txt").exists():
    yield "wikitext2", {"source": f"text:{wikitext / 'valid.txt'}", "eval_source": f"text:{wikitext / 'test.txt'}"}


def run(name: str, data_overrides: dict, router: str, args) -> list:
  config = skiplayer.get_config("tiny")
  config.data.update(data_overrides)
  config.model.skip.update(router=router, target_density=args.density)
  config.train.update(num_steps=args.steps, eval_every_steps=max(args.steps // 6, 1), progress_bar=False)
  workdir = os.path.join(args.workdir, f"{name}_{router}")
  loop.train_and_evaluate(config, workdir)
  return [r for r in read_metrics(workdir) if "eval_loss" in r]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--density", type=float, default=0.5)
  parser.add_argument("--wikitext", default=str(WIKITEXT), help="folder with valid.txt and test.txt")
  args = parser.parse_args()
  results = {}
  for name, overrides in datasets(pathlib.Path(args.wikitext)):
    results[name] = {router: run(name, overrides, router, args) for router in ("gumbel", "random")}
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
  summary = {}
  for ax, (name, by_router) in zip(axes[0], results.items()):
    for router, records in by_router.items():
      ax.plot([r["step"] for r in records], [r["eval_loss"] for r in records], "o-",
              label={"gumbel": "learned (ST-Gumbel)", "random": "random gating"}[router])
    ax.set_title(f"{name}, P = {args.density}")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.legend()
    summary[name] = {router: records[-1]["eval_loss"] for router, records in by_router.items()}
  fig.tight_layout()
  fig.savefig(os.path.join(args.workdir, "learned_vs_random.png"), dpi=120)
  with open(os.path.join(args.workdir, "learned_vs_random.json"), "w", encoding="utf-8") as f:
    json.dump({"density": args.density, "steps": args.steps, "final_eval_loss": summary}, f, indent=2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
