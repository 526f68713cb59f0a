"""The depth bench: every depth method on one model and one evaluation set (README "Depth bench").

    python -m skipjax.depthbench --config=configs/depthbench.py:<preset> --workdir=DIR

For each method family (`methods.FAMILIES`, `--config.methods` selects) and each point on its knob:
perplexity on the eval text, top-1 agreement with the full model's greedy continuation of the
prompts (teacher-forced), executed layers per token, analytic FLOPs per token, and measured prefill
and batch-1 decode time, all in one run on one machine. A family that does not apply to the model
is listed with the reason. Resumable: the full model's point and each finished family are
`DIR/families/<name>.json` and are reused (delete one to measure it again); the trained models are
training workdirs under `DIR/models/` (they resume too).

Writes `DIR/results.json`, `DIR/results.md` and `DIR/plots/pareto_{depth,time}.png`.
"""
import datetime
import json
import os
import platform
import time
from typing import Any, Dict

import jax
import ml_collections

from skipjax.depth import runner as runner_lib
from skipjax.depthbench import measure
from skipjax.depthbench import methods as methods_lib
from skipjax.depthbench import report
from skipjax.depthbench import setup as setup_lib


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  devices = jax.devices()
  kind = devices[0].device_kind if devices[0].platform != "cpu" else f"CPU ({os.cpu_count()} cores, {cpu})"
  return f"{kind}, jax {jax.__version__}"


def _fractions(config: ml_collections.ConfigDict):
  try:
    values = [float(x) for x in str(config.fractions).split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"config.fractions={config.fractions!r} must be comma-separated numbers in (0, 1]") from None
  if not values or not all(0 < v <= 1 for v in values):
    raise ValueError(f"config.fractions={config.fractions!r} must be comma-separated numbers in (0, 1]")
  return values


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  families = methods_lib.check_families([m for m in config.methods.split(",") if m] or list(methods_lib.FAMILIES))
  fractions = _fractions(config)
  os.makedirs(os.path.join(workdir, "families"), exist_ok=True)
  start = time.time()
  bench = setup_lib.load(config, workdir)
  ctx = methods_lib.Context(bench, measure.Timer(config.timing.repeats),
                            runner_lib.PlanRunner(bench.cfg, bench.params), fractions)
  print(f"depth bench: {bench.label} on {bench.data_label}, {bench.num_layers} layers", flush=True)
  full_path = os.path.join(workdir, "families", "full.json")  # reused with the families: one reference
  if os.path.exists(full_path):
    with open(full_path) as f:
      ctx.full = json.load(f)
  else:
    ctx.full = methods_lib.full_point(ctx)
    runner_lib.write_json(full_path, ctx.full)
  results = {"model": {"label": bench.label, "num_layers": bench.num_layers, "config": config.model},
             "data": {"label": bench.data_label, "eval_tokens": int(sum(b["targets"].size for b in bench.eval)),
                      "prompts": int(bench.prompts.shape[0]), "new_tokens": int(bench.continuation.shape[1])},
             "machine": machine(), "date": datetime.date.today().isoformat(), "timing": config.timing.to_dict(),
             "config": json.loads(config.to_json()), "full": ctx.full, "families": {}}
  for family in families:
    path = os.path.join(workdir, "families", f"{family}.json")
    if os.path.exists(path):
      with open(path) as f:
        results["families"][family] = json.load(f)
      print(f"{family}: reused {path}", flush=True)
      continue
    print(f"{family}:", flush=True)
    t0 = time.time()
    try:
      value = {"methods": methods_lib.FAMILIES[family](ctx)}
    except methods_lib.NotApplicable as e:
      value = {"reason": str(e)}
      print(f"  not applicable: {e}", flush=True)
    value["seconds"] = time.time() - t0
    runner_lib.write_json(path, value)
    results["families"][family] = value
  results["winners"] = report.winners(results)
  results["seconds"] = time.time() - start
  runner_lib.write_json(os.path.join(workdir, "results.json"), results)
  md = os.path.join(workdir, "results.md")
  with open(md + ".tmp", "w") as f:
    f.write(report.markdown(results))
  os.replace(md + ".tmp", md)
  results["plots"] = report.figures(results, workdir)
  print(f"wrote {md} and {', '.join(results['plots'])} ({time.time() - start:.0f} s)", flush=True)
  return results
