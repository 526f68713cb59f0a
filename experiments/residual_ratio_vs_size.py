"""RR Fig. 4: residual-ratio distribution and median against model size, for a list of models.

    python -m experiments.residual_ratio_vs_size --workdir=/tmp/rr_size \
        --models=facebook/opt-125m,facebook/opt-350m,facebook/opt-1.3b [--data=text:GLOB]

Without `--models` it profiles random OPTs of growing depth/width written offline (a smoke run of
the pipeline, not a finding about trained models). Writes `<workdir>/ratio_vs_size.png` (median
vs parameters), `<workdir>/ratio_distributions.png` (violins), `<workdir>/ratio_vs_size.md`
(table) and the per-model `summary.json`/`ratios.npz` of the profiler (oracles off).
"""
import argparse
import os

import numpy as np

from configs import profile as profile_config
from skipjax import plots
from skipjax.profile import ratios, run, tiny

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
RANDOM_SIZES = ((2, 32), (4, 64), (6, 128))  # (layers, d_model) of the offline stand-ins


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--models", default="", help="comma-separated HF folders / hub ids")
  parser.add_argument("--data", default="", help="profiler config.data (default: WikiText-2 valid or random)")
  parser.add_argument("--num_sequences", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=256)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  specs = [m for m in args.models.split(",") if m]
  if not specs:
    specs = [tiny.random_opt(os.path.join(args.workdir, f"random_opt_{l}x{d}"), l, d, 4, 4 * d, 256,
                             max_positions=args.seq_len) for l, d in RANDOM_SIZES]
  config = profile_config.get_config()
  config.update(model=",".join(specs), num_sequences=args.num_sequences, seq_len=args.seq_len,
                applied=False, sensitivity=False, imitation=False,
                data=args.data or (f"text:{WIKITEXT}" if os.path.exists(WIKITEXT) else "random"))
  if not args.models:
    config.tokenizer = "bytes"  # the random OPTs have no tokenizer: UTF-8 bytes, explicitly
  summary = run.run(config, args.workdir)
  rows = sorted(summary["models"].items(), key=lambda kv: kv[1]["num_params"])
  all_r = np.load(os.path.join(args.workdir, "ratios.npz"))
  dist = {n: all_r[n][..., ratios.token_mask(all_r[n], None, True)].reshape(-1) for n, _ in rows}
  plots.ratio_distributions(dist, os.path.join(args.workdir, "ratio_distributions.png"))
  plots.median_ratio_by_size([r["num_params"] for _, r in rows], [r["ratios"]["all"]["median"] for _, r in rows],
                             [n for n, _ in rows], os.path.join(args.workdir, "ratio_vs_size.png"))
  lines = ["| model | params | layers | median ratio | attn median | ffn median | q05 | q95 |", "|---|---|---|---|---|---|---|---|"]
  for name, r in rows:
    q = r["ratios"]["all"]["quantiles"]
    lines.append(f"| {name} | {r['num_params']:,} | {r['num_layers']} | {r['ratios']['all']['median']:.4f} | "
                 f"{r['ratios']['attn']['median']:.4f} | {r['ratios']['ffn']['median']:.4f} | {q['0.05']:.4f} | {q['0.95']:.4f} |")
  table = "\n".join(lines)
  with open(os.path.join(args.workdir, "ratio_vs_size.md"), "w") as f:
    f.write(table + "\n")
  print(f"data: {config.data}\n{table}")


if __name__ == "__main__":
  main()
