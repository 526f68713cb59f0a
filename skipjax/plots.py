"""Paper figures as matplotlib PNGs (Agg backend: no display needed)."""
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def loss_curve(records: Sequence[dict], path: str) -> str:
  """Training loss (and eval loss where logged) against step."""
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def depth_by_class(records: Sequence[dict], classes: Sequence[str], path: str) -> str:
  """Mean executed depth per token difficulty class over training (the SkipLayer demo)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in classes:
    pts = [(r["step"], r[f"eval_depth_{name}"]) for r in records if f"eval_depth_{name}" in r]
    if pts:
      ax.plot(*zip(*pts), "o-", label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("mean executed layers per token")
  ax.set_title("executed depth by token difficulty (eval, argmax routing)")
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def skipped_layers_per_token(skipped: Sequence[int], num_layers: int, path: str) -> str:
  """LtS Fig. 7: how many layers each generated token skipped during decoding."""
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.bar(range(len(skipped)), skipped, color="tab:orange")
  ax.set_ylim(0, num_layers)
  ax.set_xlabel("generated token")
  ax.set_ylabel(f"layers skipped (of {num_layers})")
  return _save(fig, path)


# ----------------------------------------------------------- residual ratio profiling (RR §4)


def ratio_distributions(ratios_by_model: dict, path: str) -> str:
  """RR Fig. 4: one violin of per-token residual ratios (all blocks) per model, median marked.

  `ratios_by_model`: {name: 1-D array of ratios (already masked)}.
  """
  names = list(ratios_by_model)
  fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 4))
  data = [ratios_by_model[n] for n in names]
  ax.violinplot(data, showmedians=True, showextrema=False)
  ax.set_xticks(range(1, len(names) + 1), names)
  ax.set_ylabel("residual ratio ‖R(x)‖/‖x‖")
  ax.grid(alpha=0.3, axis="y")
  return _save(fig, path)


def per_block_ratios(mean, std, depth_histogram, threshold: float, path: str) -> str:
  """RR Fig. 5/8: per-block mean ± std ratio (ATT/FFN interleaved) and dynamic-depth histogram.

  `mean`, `std`: [L, 2]; `depth_histogram`: counts of tokens per number of kept blocks.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  mean, std = np.asarray(mean), np.asarray(std)
  fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
  layers = np.arange(mean.shape[0])
  for b, (name, color) in enumerate((("ATT", "tab:blue"), ("FFN", "tab:orange"))):
    ax.plot(layers, mean[:, b], color=color, label=name)
    ax.fill_between(layers, mean[:, b] - std[:, b], mean[:, b] + std[:, b], color=color, alpha=0.25)
  ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
  ax.set_xlabel("layer")
  ax.set_ylabel("residual ratio")
  ax.grid(alpha=0.3)
  ax.legend()
  hx.bar(np.arange(len(depth_histogram)), depth_histogram, color="tab:green")
  hx.set_xlabel(f"blocks kept per token (of {len(depth_histogram) - 1})")
  hx.set_ylabel("tokens")
  hx.grid(alpha=0.3, axis="y")
  return _save(fig, path)


def routing_trace(trace, path: str, threshold: float = None) -> str:
  """RR Fig. 6: kept (dark) / skipped (light) blocks × tokens, ATT and FFN interleaved."""
  fig, ax = plt.subplots(figsize=(min(16, 2 + 0.06 * trace.shape[1]), 4))
  ax.imshow(trace, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
  ax.set_xlabel("token")
  ax.set_ylabel("block (ATT₀, FFN₀, ATT₁, …)")
  if threshold is not None:
    ax.set_title(f"oracle routing, skip when ratio < {threshold:g}")
  return _save(fig, path)


def applied_oracle_curve(curves_by_model: dict, path: str, metric: str = "perplexity") -> str:
  """RR §4.4 applied oracle: cost (`perplexity`, or `drift` for encoders) against the fraction
  of residual blocks skipped, applied mode (solid) vs simulated decisions forced (dashed).

  `curves_by_model`: {name: `profile.applied_oracle(...)['curve']`}.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for k, (name, rows) in enumerate(curves_by_model.items()):
    color = f"C{k}"
    for mode, style in (("applied", "o-"), ("simulated", "x--")):
      pts = sorted((r[mode]["skipped_fraction"], r[mode][metric]) for r in rows if mode in r)
      if pts:
        ax.plot(*zip(*pts), style, color=color, label=f"{name} ({mode})", ms=4)
    for r in rows:
      if "applied" in r and r["threshold"] > 0 and r["threshold"] < 1e3:
        ax.annotate(f"{r['threshold']:g}", (r["applied"]["skipped_fraction"], r["applied"][metric]),
                    fontsize=7, color=color, xytext=(3, 3), textcoords="offset points")
  if metric == "perplexity":
    ax.set_yscale("log")
  ax.set_xlabel("fraction of residual blocks skipped")
  ax.set_ylabel(metric if metric == "perplexity" else "relative drift of last hidden state")
  ax.set_title("oracle: skip block when ratio < threshold (labels)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def median_ratio_by_size(sizes, medians, names, path: str) -> str:
  """RR Fig. 4 (right): median residual ratio against model size (parameters, log scale)."""
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(sizes, medians, "o-")
  for s, m, n in zip(sizes, medians, names):
    ax.annotate(n, (s, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("median residual ratio")
  ax.grid(alpha=0.3)
  return _save(fig, path)
