"""LayerDrop's claim (Fan et al. 2019 §5): a model trained with LayerDrop loses less when layers are
pruned at inference. Eval loss of trained workdirs under static pruning plans.

    python -m skipjax.train --config=configs/lm.py:tiny --workdir=/tmp/ld/base --config.model.num_layers=6 \
        --config.train.num_steps=300
    python -m skipjax.train --config=configs/lm.py:layerdrop --workdir=/tmp/ld/ld --config.model.num_layers=6 \
        --config.train.num_steps=300
    python -m experiments.layerdrop_pruning --workdirs=/tmp/ld/base,/tmp/ld/ld --plans='0:6;0,2,4;0,1,4,5;0:5'

Each workdir's latest checkpoint is evaluated on its own eval split (`config.train.eval_batches`
batches, `skipjax.eval.perplexity`) under each plan (`--plans`, separated by ';'); the first plan's column (the full model) equals the `eval_loss` the run logged at that step.
"""
import argparse
import json

from skipjax import data as data_lib
from skipjax import models
from skipjax.decode import workdir as workdir_lib
from skipjax.eval.perplexity import perplexity


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", required=True, help="comma-separated training workdirs")
  parser.add_argument("--plans", default="0:6;0,2,4;0,1,4,5;0:5", help="';'-separated plans ('' = full)")
  args = parser.parse_args(argv)
  plans = args.plans.split(";")
  print("| workdir | logged eval_loss | " + " | ".join(f"plan `{p}`" for p in plans) + " |")
  print("|---|---|" + "---|" * len(plans))
  rows = {}
  for workdir in args.workdirs.split(","):
    restored = workdir_lib.restore(workdir)
    config = restored.config
    eval_ds = data_lib.get_dataset(config.data, split="eval", seed=config.seed, workdir=workdir)
    logged = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl", encoding="utf-8")]
    logged = [r["eval_loss"] for r in logged if r.get("step") == restored.step and "eval_loss" in r]
    losses = []
    for plan in plans:
      model_config = config.model.copy_and_resolve_references()
      model_config.plan = plan
      model = models.build(model_config)
      losses.append(perplexity(model, restored.params, eval_ds, config.train.eval_batches)["loss"])
    rows[workdir] = {"logged_eval_loss": logged[-1] if logged else None, "plans": dict(zip(plans, losses))}
    full = losses[0]
    cells = [f"{loss:.3f}" + ("" if i == 0 else f" ({loss - full:+.3f})") for i, loss in enumerate(losses)]
    print(f"| {workdir} | {logged[-1] if logged else float('nan'):.3f} | " + " | ".join(cells) + " |", flush=True)
  return rows


if __name__ == "__main__":
  main()
