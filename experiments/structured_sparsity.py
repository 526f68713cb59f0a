"""SS ablations (Dong et al. 2023, "Towards Structured Sparsity in Transformers", Tables 1–3) at a
CPU-feasible scale: val PPL, parameters, activation sparsity and block sparsity of each cell.

    python -m experiments.structured_sparsity --workdir=/tmp/ss [--steps 600] [--batch_size 16] \
        [--d_model 96] [--num_layers 6] [--datasets synthetic,wikitext2] [--tables 1,2,3] [--cells ...] \
        [--lambda_scale 1] [--figures relu,tied_f24,...|all]

Model and scaling: `configs/sparsity.py` (a 6-layer GPT-2-like decoder, d = 96, F = 4; B = F·D/48
keeps SS's 48 blocks per layer, E = E_SS/3072·F·D keeps SS's exempt fraction; λ as in SS, times
`--lambda_scale`: Eq. 3 sums block norms over a sequence's S tokens, so 1024/S gives SS's weight per token).
  Table 1  activation ∈ {relu, gelu, fliprelu, splitrelu}                       (SS §2.1)
  Table 2  FF weights tied across layers: untied F = 4 (baseline), tied F = 4, tied F = 24 (SS §3.1)
  Table 3  block-sparsity regulariser (Eq. 3) λ ∈ {0, 5e-4, 1e-3} × E_SS ∈ {0, 128, 256}      (SS §3.2)
The ReLU baseline (untied, F = 4, λ = 0) is one run shared by the three tables, as in SS.
Datasets: the embedded synthetic task and, when `--wikitext` holds valid.txt, WikiText-2 (train:
valid.txt, held out: test.txt, byte tokens).

After each training run the final checkpoint is profiled on the run's held-out batches (the
`train.eval_batches` batches its final eval used) with `skipjax.profile.sparsity.profile_pass`:
sparsity = fraction of non-zero FF activations (SS §1), block sparsity at B (SS §3.2; a Table 3
cell's E exempt neurons count as one always-active block), per-neuron frequencies, Dice/Jaccard
and block maps. Val PPL = exp(the run's final logged `eval_loss`); params = its logged `num_params`
(a tied kernel counted once).

Every run is a training workdir `<workdir>/<dataset>_<cell>`: re-running resumes unfinished runs
and reuses finished ones and their profiles (`ss_profile.json`). Writes
`<workdir>/structured_sparsity.json` (every cell), `.md` (tables shaped like SS Tables 1–3),
`structured_sparsity.png` (block sparsity vs val PPL per cell) and, per dataset and `--figures`
cell, SS Fig. 1–4 plots under `<workdir>/plots/`.
"""
import argparse
import json
import math
import os
import pathlib
import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from configs import sparsity as ss_config  # noqa: E402
from skipjax import data as data_lib  # noqa: E402
from skipjax.decode import workdir as workdir_lib  # noqa: E402
from skipjax.profile import sparsity as sparsity_lib  # noqa: E402
from skipjax.train import checkpoint as checkpoint_lib  # noqa: E402
from skipjax.train import loop  # noqa: E402
from skipjax.train import workdir as train_workdir  # noqa: E402
from skipjax.train.metrics import read_metrics  # noqa: E402

WIKITEXT = pathlib.Path(ss_config.WIKITEXT)
PROFILE = "ss_profile.json"
FIGURE_CELLS = ("relu", "tied_f4", "tied_f24", "lam0.0005_ex0", "lam0.0005_ex128", "lam0.0005_ex256")
# SS's numbers (WikiText-103, d = 768), printed beside ours.
SS_TABLE = {"gelu": (22.60, 1.000, None), "relu": (23.14, 0.109, 0.971), "splitrelu": (23.11, 0.112, None),
            "fliprelu": (23.03, 0.112, None), "tied_f4": (27.19, 0.106, None), "tied_f24": (22.23, 0.043, None),
            "lam0.0005_ex0": (23.20, 0.012, 0.362), "lam0.0005_ex128": (23.33, 0.016, 0.352),
            "lam0.0005_ex256": (23.34, 0.020, 0.362), "lam0.001_ex0": (24.48, 0.005, 0.204),
            "lam0.001_ex128": (24.50, 0.011, 0.203), "lam0.001_ex256": (24.26, 0.016, 0.219)}
SS_PARAMS = {"relu": 81.9, "tied_f4": 58.3, "tied_f24": 82.0}


def datasets(args):
  """(name, preset) per requested dataset; WikiText-2 only when its folder has valid.txt."""
  for name in args.datasets:
    if name == "synthetic":
      yield name, "tiny"
    elif (pathlib.Path(args.wikitext) / "valid.txt").exists():
      yield name, "wikitext"
    else:
      print(f"--datasets: skipping wikitext2 ({args.wikitext}/valid.txt is absent)")


def cells_for(args) -> list:
  """The cells of the requested tables (each once, table order), restricted by --cells."""
  out = []
  for t in args.tables:
    out += [c for c in ss_config.TABLES[t] if c not in out]
  if args.cells:
    out = [c for c in out if c in args.cells]
  return out


def make_config(preset: str, cell: str, args):
  config = ss_config.get_config(preset)
  config.seed = args.seed
  config.model.num_layers = args.num_layers
  ss_config.set_width(config, args.d_model, args.num_heads, args.block_size)
  if args.wikitext != str(WIKITEXT) and preset == "wikitext":
    config.data.update(source=f"text:{args.wikitext}/valid.txt", eval_source=f"text:{args.wikitext}/test.txt")
  config.data.update(batch_size=args.batch_size, seq_len=args.seq_len)
  config.model.max_len = max(config.model.max_len, args.seq_len)
  config.train.update(num_steps=args.steps, warmup_steps=max(round(0.05 * args.steps), 1),  # SS: 5 % warm-up
                      eval_every_steps=max(args.steps // 4, 2), checkpoint_every_steps=max(args.steps // 2, 2),
                      log_every_steps=max(min(50, args.steps // 4), 1), eval_batches=args.eval_batches,
                      progress_bar=False)
  ss_config.apply_cell(config, cell)
  config.model.ffn.block_sparsity_weight *= args.lambda_scale
  return config


def _finished(workdir: str, config) -> bool:
  """A finished run of this same config (else `train_and_evaluate` resumes it, or refuses a different one)."""
  stored = train_workdir.read_config(workdir)
  num_steps = config.train.num_steps
  if stored is None or num_steps not in checkpoint_lib.Checkpointer.committed_steps_in(workdir):
    return False
  train_workdir.check_resume(workdir, stored, config, ignore=("model.vocab_size", "train.num_steps"))
  return any(r.get("step") == num_steps and "eval_loss" in r for r in read_metrics(workdir))


def eval_batch(config, workdir: str) -> dict:
  """The held-out batches the run's final eval used (`loop.evaluate`), concatenated: inputs, targets [N, T]."""
  ds = data_lib.get_dataset(config.data, split="eval", seed=config.seed, workdir=workdir)
  n = min(config.train.eval_batches, ds.num_batches) if ds.num_batches else config.train.eval_batches
  parts = [ds.batch(i) for i in range(n)]
  return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("inputs", "targets")}


def _profile(workdir: str, step: int):
  """The final checkpoint's SS statistics (`profile_pass`), cached in `<workdir>/ss_profile.json` + `.npz`."""
  ffn = workdir_lib.load_config(workdir).model.ffn
  s = types.SimpleNamespace(block_size=int(ffn.block_size), exempt=int(ffn.exempt), site="hidden", map_tokens=8)
  path = os.path.join(workdir, PROFILE)
  npz = path[:-len(".json")] + ".npz"
  if os.path.exists(path) and os.path.exists(npz):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("step") == step and (cached["block_size"], cached["exempt"]) == (s.block_size, s.exempt):
      with np.load(npz) as z:
        return cached, {k: z[k] for k in z.files}
  restored = workdir_lib.restore(workdir, step)
  config = restored.config
  cfg = restored.model.config
  res = sparsity_lib.profile_pass(cfg, restored.params, eval_batch(config, workdir), s, config.data.batch_size,
                                  np.zeros(cfg.num_layers, np.float32), seed=config.seed)
  numbers = {"step": step, **res["numbers"], "profile_loss": res["loss"], "profile_perplexity": res["perplexity"]}
  arrays = res["arrays"]
  tmp = path[:-len(".json")] + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, npz)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(numbers, f, indent=1)
  os.replace(path + ".tmp", path)
  return numbers, arrays


def heavy_hitters(frequency: np.ndarray, exempt: int) -> dict:
  """Per-neuron frequencies [L, F] → the most frequently active neuron of each layer (SS §3.1, Fig. 2:
  tied layers share it) and, with E exempt neurons, the share of each layer's E most frequent neurons
  that are exempt (SS §3.2, Fig. 5: the exemption concentrates the heavy hitters; chance: E/F)."""
  out = {"most_frequent_neuron": [int(i) for i in frequency.argmax(axis=1)]}
  if exempt:
    top = np.argsort(-frequency, axis=1, kind="stable")[:, :exempt]
    out["heavy_hitters_exempt"] = float((top < exempt).mean())
  return out


def run(dataset: str, preset: str, cell: str, args):
  """Train (or reuse) one cell and profile its final checkpoint → (row, arrays)."""
  workdir = os.path.join(args.workdir, f"{dataset}_{cell}")
  config = make_config(preset, cell, args)
  if not _finished(workdir, config):
    loop.train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  final = [r for r in records if r.get("step") == args.steps and "eval_loss" in r][-1]
  num_params = [r["num_params"] for r in records if "num_params" in r][-1]
  prof, arrays = _profile(workdir, args.steps)
  m = config.model
  row = {"dataset": dataset, "cell": cell, "workdir": workdir, "step": args.steps,
         "tables": [t for t, cells in ss_config.TABLES.items() if cell in cells],
         "activation": m.activation, "tied": m.ffn.tied, "expansion": m.ffn.expansion,
         "d_model": m.d_model, "d_ff": m.ffn.expansion * m.d_model, "num_layers": m.num_layers,
         "block_sparsity_weight": m.ffn.block_sparsity_weight, "block_size": m.ffn.block_size,
         "exempt": m.ffn.exempt, "exempt_ss": ss_config.CELLS[cell].get("ex"),
         "lambda_ss": ss_config.CELLS[cell].get("lam", 0.0),
         "num_params": int(num_params), "eval_loss": float(final["eval_loss"]),
         "val_ppl": float(math.exp(final["eval_loss"])),
         "sparsity": prof["sparsity"], "block_sparsity": prof["block_sparsity"],
         "sparsity_per_layer": prof["sparsity_per_layer"], "block_sparsity_per_layer": prof["block_sparsity_per_layer"],
         "dice_mean_between_layers": prof["dice_mean_between_layers"],
         "jaccard_mean_between_layers": prof["jaccard_mean_between_layers"],
         "profile_tokens": prof["tokens"], "profile_perplexity": prof["profile_perplexity"],
         "neurons": prof["neurons"], **heavy_hitters(arrays["frequency"], int(m.ffn.exempt))}
  print(f"{dataset} {cell}: val PPL {row['val_ppl']:.3f}, params {num_params}, sparsity {row['sparsity']:.4f}, "
        f"block sparsity {row['block_sparsity']:.4f}", flush=True)
  return row, arrays


def _ss(cell: str, i: int) -> str:
  v = SS_TABLE.get(cell, (None,) * 3)[i]
  return "—" if v is None else (f"{v:.2f}" if i == 0 else f"{v:.3f}")


def tables(rows: list, wanted=(1, 2, 3)) -> str:
  """Markdown tables shaped like SS Tables 1–3 (`wanted` of them; ours, with SS's WikiText-103 numbers beside)."""
  out = []
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    by = {r["cell"]: r for r in rows if r["dataset"] == dataset}
    some = next(iter(by.values()))
    out.append(f"### {dataset} (d = {some['d_model']}, {some['num_layers']} layers, F·D = 4·d = "
               f"{4 * some['d_model']}, B = {some['block_size']}, {some['step']} steps, "
               f"{some['profile_tokens']} held-out tokens)\n")
    t1 = [c for c in ss_config.TABLES[1] if c in by and 1 in wanted]
    if t1:
      out += ["Table 1 (SS §2.1): activations\n",
              "| activation | val PPL | sparsity | block sparsity | params | SS: val PPL / sparsity |",
              "|---|---|---|---|---|---|"]
      out += [f"| {c} | {by[c]['val_ppl']:.3f} | {by[c]['sparsity']:.4f} | {by[c]['block_sparsity']:.4f} | "
              f"{by[c]['num_params']:,} | {_ss(c, 0)} / {_ss(c, 1)} |" for c in t1]
      out.append("")
    t2 = [c for c in ss_config.TABLES[2] if c in by and 2 in wanted]
    if t2:
      out += ["Table 2 (SS §3.1): FF weights tied across layers (first row: baseline)\n",
              "| FF WT | F | val PPL | params | sparsity | block sparsity | Dice between layers | "
              "SS: val PPL / params (M) / sparsity |", "|---|---|---|---|---|---|---|---|"]
      for c in t2:
        r = by[c]
        dice = "—" if r["dice_mean_between_layers"] is None else f"{r['dice_mean_between_layers']:.3f}"
        out.append(f"| {'✓' if r['tied'] else '×'} | {r['expansion']} | {r['val_ppl']:.3f} | {r['num_params']:,} | "
                   f"{r['sparsity']:.4f} | {r['block_sparsity']:.4f} | {dice} | "
                   f"{_ss(c, 0)} / {SS_PARAMS[c]} / {_ss(c, 1)} |")
      out += ["", "Most frequently active neuron of layers 1…L (SS Fig. 2: tied layers share it): " + "; ".join(
          f"{c}: {by[c]['most_frequent_neuron']}" for c in t2), ""]
    t3 = [c for c in ss_config.TABLES[3] if c in by and 3 in wanted]
    if t3:
      out += ["Table 3 (SS §3.2): block-sparsity regulariser (Eq. 3); E = exempt neurons (SS's E of 3072 scaled to "
              "F·D, whole blocks; they count as one always-active block)\n",
              "| λ | exempt E (SS E) | val PPL | sparsity | block sparsity | SS: val PPL / sparsity / b. sparsity |",
              "|---|---|---|---|---|---|"]
      for c in t3:
        r = by[c]
        lam = r["lambda_ss"]
        shown = f"{lam:g}" if r["block_sparsity_weight"] == lam else f"{lam:g} (×{r['block_sparsity_weight'] / lam:g})"
        ex = "N/A" if not lam else f"{r['exempt']} ({r['exempt_ss']})"
        out.append(f"| {shown} | {ex} | {r['val_ppl']:.3f} | {r['sparsity']:.4f} | {r['block_sparsity']:.4f} | "
                   f"{_ss(c, 0)} / {_ss(c, 1)} / {_ss(c, 2)} |")
      exempt = [c for c in t3 if "heavy_hitters_exempt" in by[c]]
      if exempt:
        shares = "; ".join(f"{c}: {by[c]['heavy_hitters_exempt']:.2f} (chance {by[c]['exempt'] / by[c]['d_ff']:.2f})"
                           for c in exempt)
        out += ["", f"Share of each layer's E most frequent neurons that are the E exempt ones (SS Fig. 5; "
                f"chance E/F·D): {shares}"]
      out.append("")
  return "\n".join(out) + "\n"


def summary_figure(rows: list, path: str) -> str:
  """Block sparsity (SS §3.2) against val PPL per cell, one panel per dataset."""
  names = list(dict.fromkeys(r["dataset"] for r in rows))
  fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    for r in (r for r in rows if r["dataset"] == name):
      ax.plot(r["block_sparsity"], r["val_ppl"], "o", color="tab:red" if r["block_sparsity_weight"] else "tab:blue")
      ax.annotate(f"{r['cell']} (s={r['sparsity']:.3f})", (r["block_sparsity"], r["val_ppl"]),
                  textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel(f"block sparsity (B = {rows[0]['block_size']}; lower = sparser)")
    ax.set_ylabel("val PPL")
    ax.set_title(f"{name}: SS ablations (red: regularised, Eq. 3)", fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def cell_figures(row: dict, arrays: dict, plot_dir: str) -> list:
  """SS Fig. 1/2 (neuron frequencies), Fig. 3 (Dice/Jaccard), Fig. 4 (block maps) and per-layer
  sparsity of one cell, via `skipjax.profile.sparsity.figures`."""
  s = types.SimpleNamespace(block_size=row["block_size"], exempt=row["exempt"], figure_layers=6)
  res = {"num_layers": row["num_layers"], "cats": [],
         "dense": {"sparsity_per_layer": row["sparsity_per_layer"],
                   "block_sparsity_per_layer": row["block_sparsity_per_layer"]}}
  return sparsity_lib.figures(f"{row['dataset']}_{row['cell']}", res, {f"dense/{k}": v for k, v in arrays.items()},
                              s, row["dataset"], plot_dir)


def _csv(text: str) -> list:
  return [x for x in text.split(",") if x]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--d_model", type=int, default=96, help="width; d_ff = 4·d (F·d when a cell sets F)")
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--block_size", type=int, default=0, help="B; 0: SS's 48 blocks per layer, B = 4·d/48")
  parser.add_argument("--eval_batches", type=int, default=4, help="held-out batches (final eval and profile)")
  parser.add_argument("--lambda_scale", type=float, default=1.0,
                      help="λ = SS's λ × this (Eq. 3 sums over a sequence's S tokens: 1024/seq_len gives SS's "
                           "weight per token)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--datasets", default="synthetic,wikitext2")
  parser.add_argument("--wikitext", default=str(WIKITEXT), help="folder with valid.txt and test.txt")
  parser.add_argument("--tables", default="1,2,3")
  parser.add_argument("--cells", default="",
                      help=f"only these cells of the tables ('' = all): {','.join(ss_config.CELLS)}")
  parser.add_argument("--figures", default=",".join(FIGURE_CELLS),
                      help="cells whose SS Fig. 1–4 plots are drawn ('all', or '' for none)")
  args = parser.parse_args(argv)
  args.datasets = _csv(args.datasets)
  bad = [d for d in args.datasets if d not in ("synthetic", "wikitext2")]
  if bad:
    parser.error(f"--datasets: unknown {bad}; known: synthetic, wikitext2")
  try:
    args.tables = [int(t) for t in _csv(args.tables)]
  except ValueError:
    parser.error(f"--tables={args.tables!r}: comma-separated table numbers 1, 2, 3")
  if any(t not in ss_config.TABLES for t in args.tables):
    parser.error(f"--tables: {args.tables} must be among 1, 2, 3")
  args.cells = _csv(args.cells)
  bad = [c for c in args.cells if c not in ss_config.CELLS]
  if bad:
    parser.error(f"--cells: unknown {bad}; known: {list(ss_config.CELLS)}")
  figure_cells = set(ss_config.CELLS) if args.figures == "all" else set(_csv(args.figures))
  try:
    ss_config.set_width(ss_config.get_config("tiny"), args.d_model, args.num_heads, args.block_size)
  except ValueError as e:
    parser.error(f"--d_model={args.d_model}: {e}")
  if args.block_size and (4 * args.d_model) % args.block_size:
    parser.error(f"--block_size={args.block_size} must divide d_ff = 4·d_model = {4 * args.d_model}")
  os.makedirs(args.workdir, exist_ok=True)

  rows, figures = [], []
  for dataset, preset in datasets(args):
    for cell in cells_for(args):
      row, arrays = run(dataset, preset, cell, args)
      rows.append(row)
      if cell in figure_cells:
        figures += cell_figures(row, arrays, os.path.join(args.workdir, "plots"))
  if not rows:
    raise SystemExit("nothing to run: no dataset / cell selected")
  figures.append(summary_figure(rows, os.path.join(args.workdir, "structured_sparsity.png")))
  md = tables(rows, args.tables)
  result = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "d_model": args.d_model,
            "num_layers": args.num_layers, "block_size": rows[0]["block_size"], "seed": args.seed,
            "lambda_scale": args.lambda_scale,
            "scaling": {"block_size": "B = F·D/48 (SS: 64 of 3072)", "exempt": "E = E_SS/3072·F·D in whole blocks",
                        "lambda": f"SS's λ × {args.lambda_scale:g} (Eq. 3 sums over the S tokens of a sequence)"},
            "cells": rows, "figures": [os.path.relpath(p, args.workdir) for p in figures]}
  for name, text in (("structured_sparsity.json", json.dumps(result, indent=1)), ("structured_sparsity.md", md)):
    path = os.path.join(args.workdir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  print(md)
  return result


if __name__ == "__main__":
  main()
