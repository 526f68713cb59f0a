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


def exit_layers_per_token(layers_run: Sequence[int], num_positions: int, path: str, labels: Sequence[str] = None,
                          title: str = None) -> str:
  """LtS Fig. 7 for early exit (CALM §3): layers each generated token ran (exit plan position + 1).

  One bar per generated token, x ticks `labels` (the decoded token strings; default the
  token's index), a dashed line at the mean.
  """
  n = len(layers_run)
  fig, ax = plt.subplots(figsize=(min(max(6.0, 1.5 + 0.22 * n), 24.0), 3.6))
  ax.bar(range(n), layers_run, color="tab:blue")
  if n:
    mean = sum(layers_run) / n
    ax.axhline(mean, color="tab:red", ls="--", lw=1, label=f"mean {mean:.2f}")
    ax.legend(fontsize=8, loc="upper right")
  ax.set_ylim(0, num_positions + 0.5)
  _integer_ticks(ax.yaxis)
  ax.set_xticks(range(n))
  ax.set_xticklabels([str(i) for i in range(n)] if labels is None else list(labels), rotation=90,
                     fontsize=7 if labels is not None else 8)
  ax.set_xlim(-0.6, n - 0.4)
  ax.set_xlabel("generated token")
  ax.set_ylabel(f"layers run (of {num_positions})")
  ax.set_title(_wrapped(title or "early exit: layers run per generated token", fig), fontsize=9)
  ax.grid(alpha=0.3, axis="y")
  return _save(fig, path)


# ----------------------------------------------------------- residual ratio profiling (RR §4)


def _wrapped(text: str, fig, fontsize: float = 9) -> str:
  """`text` broken into lines that fit the figure's width (titles name model and data)."""
  import textwrap  # pylint: disable=import-outside-toplevel
  chars = max(20, int(fig.get_figwidth() * 72 / (0.62 * fontsize)))
  return textwrap.fill(text, chars)


def _integer_ticks(axis) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  axis.set_major_locator(MaxNLocator(integer=True))


def ratio_distributions(ratios_by_model: dict, path: str, log: bool = False, title: str = None) -> str:
  """RR Fig. 4: one violin of per-token residual ratios (all blocks) per model, median marked.

  `ratios_by_model`: {name: 1-D array of ratios (already masked)}. `log`: the violins are the
  density of log10 r (ticks in r), which shows small ratios that a linear axis squashes to 0.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  names = list(ratios_by_model)
  fig, ax = plt.subplots(figsize=(2.4 + 1.2 * len(names), 4))
  data = [np.asarray(ratios_by_model[n], np.float64).reshape(-1) for n in names]
  if log:
    data = [np.log10(np.maximum(d, 1e-12)) for d in data]
  parts = ax.violinplot(data, showmedians=True, showextrema=False, quantiles=[[0.25, 0.75]] * len(data))
  parts["cquantiles"].set_linestyle((0, (3, 2)))
  parts["cquantiles"].set_linewidth(1)
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  ax.legend(handles=[Line2D([], [], color="C0", label="median"),
                     Line2D([], [], color="C0", ls=(0, (3, 2)), lw=1, label="quartiles")],
            fontsize=7, loc="upper right")
  medians = [float(np.median(d)) for d in data]
  ax.set_xticks(range(1, len(names) + 1),
                [f"{n}\nmedian {10 ** m if log else m:.3g}" for n, m in zip(names, medians)], fontsize=8)
  if log:
    from matplotlib.ticker import FuncFormatter, MultipleLocator  # pylint: disable=import-outside-toplevel
    ax.yaxis.set_major_locator(MultipleLocator(1.0))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{10 ** v:g}"))
    ax.set_ylabel("residual ratio ‖R(x)‖/‖x‖ (log scale)")
  else:
    ax.set_ylabel("residual ratio ‖R(x)‖/‖x‖")
  ax.set_title(_wrapped(title or "residual ratio distribution (RR Fig. 4)", fig), fontsize=9)
  ax.grid(alpha=0.3, axis="y")
  return _save(fig, path)


def per_block_ratios(blocks: dict, depth_histogram, threshold: float, path: str, title: str = None) -> str:
  """RR Fig. 5/8: per-block median ratio with its interquartile range (ATT and FFN) and the
  dynamic-depth histogram. Median and quartiles, not mean ± std: per-block ratios are skewed,
  and a symmetric band around the mean extends below 0 where no ratio lies.

  `blocks`: `profile.per_block(...)` ('median', 'q25', 'q75' as [L, 2]); `depth_histogram`:
  counts of tokens per number of kept blocks.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  median, lo, hi = (np.asarray(blocks[k]) for k in ("median", "q25", "q75"))
  fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
  layers = np.arange(median.shape[0])
  for b, (name, color) in enumerate((("ATT", "tab:blue"), ("FFN", "tab:orange"))):
    ax.plot(layers, median[:, b], "o-", color=color, ms=3, label=f"{name} median")
    ax.fill_between(layers, lo[:, b], hi[:, b], color=color, alpha=0.25, label=f"{name} 25–75 %")
  ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
  ax.set_xlabel("layer")
  _integer_ticks(ax.xaxis)
  ax.set_ylabel("residual ratio")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  hx.bar(np.arange(len(depth_histogram)), depth_histogram, color="tab:green")
  hx.set_xlabel(f"blocks kept per token (of {len(depth_histogram) - 1}), threshold {threshold:g}")
  _integer_ticks(hx.xaxis)
  hx.set_ylabel("tokens")
  hx.grid(alpha=0.3, axis="y")
  if title:
    fig.suptitle(_wrapped(title, fig), fontsize=9)
  return _save(fig, path)


def block_labels(num_blocks: int):
  """ATT₀, FFN₀, ATT₁, … for 2L interleaved residual blocks."""
  return [f"{'ATT' if k % 2 == 0 else 'FFN'}{k // 2}" for k in range(num_blocks)]


def routing_trace(trace, path: str, threshold: float = None, title: str = None, sequences=None) -> str:
  """RR Fig. 6: kept / skipped blocks × tokens, ATT and FFN interleaved, one panel per sequence.

  `trace`: bool [2L, T] (one sequence) or [S, 2L, T] (several, e.g. `np.stack` of
  `profile.routing_trace(r, t, b)`); `sequences`: their indices, for the panel labels.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
  traces = np.asarray(trace, np.float32)
  traces = traces[None] if traces.ndim == 2 else traces
  count, blocks, tokens = traces.shape
  sequences = list(range(count)) if sequences is None else list(sequences)
  colors = ("#f3d9a4", "#2b4c7e")  # skipped, kept
  height = max(1.6, min(4.0, 0.12 * blocks + 0.6))
  fig, axes = plt.subplots(count, 1, figsize=(min(16, 3 + 0.05 * tokens), 0.8 + height * count), squeeze=False)
  step = max(1, int(np.ceil(blocks / 24)))  # at most ~24 tick labels per panel
  for ax, tr, seq in zip(axes[:, 0], traces, sequences):
    ax.imshow(tr, aspect="auto", cmap=ListedColormap(colors), interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(0, blocks, step), block_labels(blocks)[::step], fontsize=6)
    ax.set_ylabel(f"sequence {seq}", fontsize=8)
    _integer_ticks(ax.xaxis)
  axes[-1, 0].set_xlabel("token position")
  head = f"oracle routing, skip when ratio < {threshold:g}" if threshold is not None else "oracle routing"
  axes[0, 0].set_title(_wrapped(f"{title} — {head}" if title else head, fig), fontsize=9)
  fig.legend(handles=[Patch(color=colors[1], label="kept (r ≥ threshold)"),
                      Patch(color=colors[0], label="skipped (r < threshold)")],
             loc="upper right", fontsize=7, ncol=2, frameon=False)
  return _save(fig, path)


def _place_labels(ax, points, texts, color) -> None:
  """Threshold labels next to their points without overlapping each other, earlier labels, the
  legend or plotted markers: each tries offsets around its point until its box is free
  (display coordinates)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  from matplotlib.transforms import Bbox  # pylint: disable=import-outside-toplevel
  placed = getattr(ax, "_skipjax_label_boxes", None)
  if placed is None:
    legend = ax.get_legend()
    placed = [legend.get_window_extent(renderer)] if legend is not None else []
  avoid = list(placed)  # the legend and every plotted marker, which labels must not cover
  for line in ax.get_lines():  # markers and the segments between them, sampled every ~3 px
    vertices = ax.transData.transform(line.get_xydata())
    samples = [vertices]
    for a, b in zip(vertices, vertices[1:]):
      steps = max(1, int(np.hypot(*(b - a)) / 3))
      samples.append(a + (b - a) * np.linspace(0, 1, steps + 1)[:, None])
    avoid += [Bbox.from_extents(px - 3, py - 3, px + 3, py + 3) for px, py in np.concatenate(samples)]
  # Candidate offsets (points): rings of growing radius, right/up first.
  offsets = [(round(radius * np.cos(a)), round(radius * np.sin(a)) - 3) for radius in (6, 14, 24, 36, 50)
             for a in np.deg2rad((45, -45, 135, -135, 0, 180, 90, -90))]
  for (x, y), text in zip(points, texts):
    for k, offset in enumerate(offsets):
      label = ax.annotate(text, (x, y), fontsize=7, color=color, xytext=offset, textcoords="offset points",
                          ha="left" if offset[0] >= 0 else "right")
      box = label.get_window_extent(renderer).expanded(1.05, 1.1)
      if k == len(offsets) - 1 or not any(box.overlaps(other) for other in placed + avoid):
        placed.append(box)
        break
      label.remove()
  ax._skipjax_label_boxes = placed  # pylint: disable=protected-access


def applied_oracle_curve(curves_by_model: dict, path: str, metric: str = "perplexity", title: str = None) -> str:
  """RR §4.4 applied oracle: cost (`perplexity`, or `drift` for encoders) against the fraction
  of residual blocks skipped, applied mode (solid) vs simulated decisions forced (dashed).
  Thresholds that land on the same point share one label.

  `curves_by_model`: {name: `profile.applied_oracle(...)['curve']`}.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels = []
  for k, (name, rows) in enumerate(curves_by_model.items()):
    color = f"C{k}"
    for mode, style in (("applied", "o-"), ("simulated", "x--")):
      pts = sorted((r[mode]["skipped_fraction"], r[mode][metric]) for r in rows if mode in r)
      if pts:
        ax.plot(*zip(*pts), style, color=color, label=f"{name} ({mode})", ms=4)
    groups = {}
    for r in rows:
      if "applied" in r and 0 < r["threshold"] < 1e3:
        point = (r["applied"]["skipped_fraction"], r["applied"][metric])
        groups.setdefault((round(point[0], 4), float(f"{point[1]:.4g}")), (point, []))[1].append(r["threshold"])
    labels.append((color, [p for p, _ in groups.values()],
                   ["t=" + ",".join(f"{t:g}" for t in ts) for _, ts in groups.values()]))
  if metric == "perplexity":
    ax.set_yscale("log")
  ax.set_xlabel("fraction of residual blocks skipped")
  ax.set_ylabel(metric if metric == "perplexity" else "relative drift of last hidden state")
  ax.set_title(_wrapped(title or "oracle: skip block when ratio < threshold t (labels)", fig), fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left")
  ax.margins(x=0.08, y=0.1)
  for color, points, texts in labels:
    _place_labels(ax, points, texts, color)
  return _save(fig, path)


def median_ratio_by_size(sizes, medians, names, path: str, title: str = None) -> str:
  """RR Fig. 4 (right): median residual ratio against model size (parameters, log scale)."""
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(sizes, medians, "o-")
  for s, m, n in zip(sizes, medians, names):
    ax.annotate(n, (s, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("median residual ratio")
  ax.set_title(_wrapped(title or "median residual ratio by model size (RR Fig. 4)", fig), fontsize=9)
  ax.grid(alpha=0.3)
  return _save(fig, path)


# ------------------------------------------------- FF activation sparsity (SS = Dong et al. 2023)


def neuron_frequencies(frequency, path: str, layers=None, title: str = None) -> str:
  """SS Fig. 1/2: per shown layer (a row), neuron activation frequencies sorted (left, descending)
  and unsorted (right, by neuron index). `frequency`: [L, F] in [0, 1]."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  freq = np.asarray(frequency, np.float64)
  layers = list(range(freq.shape[0])) if layers is None else list(layers)
  fig, axes = plt.subplots(len(layers), 2, figsize=(10, 0.4 + 1.5 * len(layers)), squeeze=False)
  neurons = np.arange(freq.shape[1])
  for row, layer in zip(axes, layers):
    f = freq[layer]
    row[0].fill_between(neurons, np.sort(f)[::-1], color="tab:blue", step="post", lw=0)
    row[1].vlines(neurons, 0, f, color="tab:red", lw=0.6)  # one spike per neuron (fast for large F)
    for ax in row:
      ax.set_xlim(0, len(neurons))
      ax.set_ylim(0, max(1e-3, float(f.max()) * 1.05))
      ax.grid(alpha=0.3, axis="y")
      ax.tick_params(labelsize=7)
    row[0].set_ylabel(f"layer {layer + 1}\nfrequency", fontsize=8)
  axes[0, 0].set_title("sorted", fontsize=8)
  axes[0, 1].set_title("unsorted", fontsize=8)
  axes[-1, 0].set_xlabel("neuron rank")
  axes[-1, 1].set_xlabel("neuron index")
  if title:
    fig.suptitle(_wrapped(title, fig), fontsize=9)
  return _save(fig, path)


def layer_similarity(dice, jaccard, path: str, title: str = None) -> str:
  """SS Fig. 3: Dice coefficient and Jaccard index of active-neuron sets between every pair of
  layers, two heat maps ([L, L] each); values written in the cells when L ≤ 12."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
  for ax, (name, m) in zip(axes, (("Dice coefficient", dice), ("Jaccard index", jaccard))):
    m = np.asarray(m, np.float64)
    n = m.shape[0]
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ticks = range(0, n, max(1, int(np.ceil(n / 12))))
    ax.set_xticks(ticks, [str(i + 1) for i in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(i + 1) for i in ticks], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(name, fontsize=9)
    if n <= 12:
      for i in range(n):
        for j in range(n):
          ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                  color="white" if m[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(_wrapped(title, fig), fontsize=9)
  return _save(fig, path)


def block_activation_maps(maps, path: str, layers=None, title: str = None) -> str:
  """SS Fig. 4: active blocks (dark red) of the same sampled tokens in each shown layer (a panel,
  top to bottom); x = block index, y = sample index. `maps`: bool [L, S, num_blocks]."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel
  maps = np.asarray(maps, np.float32)
  layers = list(range(maps.shape[0])) if layers is None else list(layers)
  samples, blocks = maps.shape[1:]
  fig, axes = plt.subplots(len(layers), 1, figsize=(min(16, 3 + 0.12 * blocks), 0.6 + (0.25 + 0.12 * samples) *
                                                    len(layers)), squeeze=False)
  for ax, layer in zip(axes[:, 0], layers):
    ax.imshow(maps[layer], aspect="auto", cmap=ListedColormap(["#fbeee6", "#8b0000"]), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_ylabel(f"layer {layer + 1}", fontsize=7)
    ax.set_yticks([])
    _integer_ticks(ax.xaxis)
    ax.tick_params(labelsize=6)
  axes[-1, 0].set_xlabel("block index")
  if title:
    axes[0, 0].set_title(_wrapped(title, fig), fontsize=8)
  return _save(fig, path)


def sparsity_per_layer(sparsity, block_sparsity, path: str, title: str = None) -> str:
  """Per-layer activation sparsity (SS §1: fraction non-zero) and block sparsity (SS §3.2)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  s, b = np.asarray(sparsity, np.float64), np.asarray(block_sparsity, np.float64)
  layers = np.arange(1, len(s) + 1)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.25 * len(s)), 3.6))
  ax.bar(layers - 0.2, s, 0.4, color="tab:blue", label=f"sparsity (mean {s.mean():.3f})")
  ax.bar(layers + 0.2, b, 0.4, color="tab:red", label=f"block sparsity (mean {b.mean():.3f})")
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("layer")
  ax.set_ylabel("fraction (lower = sparser)")
  _integer_ticks(ax.xaxis)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(_wrapped(title, fig), fontsize=8)
  return _save(fig, path)


def cats_cost(dense: dict, rows, path: str, title: str = None) -> str:
  """CATS (Lee et al. 2024): perplexity against the measured activation sparsity (fraction
  non-zero) for each target, and the dense model; block sparsity on a second axis."""
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [dense["sparsity"]] + [r["sparsity"] for r in rows]
  ppl = [dense["perplexity"]] + [r["perplexity"] for r in rows]
  ax.plot(xs, ppl, "o-", color="tab:blue", label="perplexity")
  for r in rows:
    ax.annotate(f"zero {r['target_zero_fraction']:g}\n{100 * r['perplexity_increase']:+.1f} %",
                (r["sparsity"], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.annotate("dense", (xs[0], ppl[0]), textcoords="offset points", xytext=(-30, 4), fontsize=7)
  ax.set_xlabel("activation sparsity (fraction non-zero, SS §1)")
  ax.set_ylabel("perplexity")
  ax.invert_xaxis()
  ax.grid(alpha=0.3)
  bx = ax.twinx()
  bx.plot(xs, [dense["block_sparsity"]] + [r["block_sparsity"] for r in rows], "s--", color="tab:red",
          label="block sparsity")
  bx.set_ylabel("block sparsity (SS §3.2)", color="tab:red")
  bx.set_ylim(0, 1.05)
  lines = ax.get_legend_handles_labels(), bx.get_legend_handles_labels()
  ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=7, loc="center left")
  if title:
    ax.set_title(_wrapped(title, fig), fontsize=8)
  return _save(fig, path)


def depth_pareto(curves: dict, families: dict, full: dict, path: str, panels, title: str,
                 xmax: float = None) -> str:
  """The depth bench's Pareto figure: one curve per method ({method: [point]}), coloured by family
  ({method: family}); each panel (x key, x label, y key, y label, log y) plots every point that
  has both values; the full model is a star. `xmax`: the x axis ends there, and the methods with
  points beyond it are named under the figure with their x range."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 2, 6))
  axes = np.atleast_1d(axes)
  maps = ("Blues", "Greens", "Oranges", "Purples", "Reds", "Greys", "YlOrBr", "PuRd", "BuGn", "copper")
  order = sorted(set(families.values()))
  markers = "os^vD<>ph"
  for fam in order:
    members = sorted(m for m in curves if families[m] == fam)
    cmap = plt.get_cmap(maps[order.index(fam) % len(maps)])
    for k, method in enumerate(members):
      color = cmap(0.45 + 0.5 * k / max(len(members) - 1, 1)) if len(members) > 1 else cmap(0.75)
      for ax, (x, _, y, _, _) in zip(axes, panels):
        pts = [p for p in curves[method] if p.get(x) is not None and p.get(y) is not None]  # knob order
        if pts:
          ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=markers[k % len(markers)], ms=4, lw=1.2,
                  color=color, label=method)
  for ax, (x, xlabel, y, ylabel, log) in zip(axes, panels):
    ax.plot([full[x]], [full[y]], "k*", ms=14, label="full model", zorder=5)
    if xmax is not None:
      ax.set_xlim(right=xmax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  handles = {}
  for ax in axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  axes[-1].legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  if xmax is not None:
    x = panels[0][0]
    beyond = {m: [p[x] for p in pts if p.get(x) is not None] for m, pts in curves.items()}
    beyond = {m: v for m, v in beyond.items() if v and max(v) > xmax}
    if beyond:
      fig.text(0.01, 0.005, "off the axis: " + "; ".join(f"{m} at {min(v):.2f}–{max(v):.2f}"
                                                          for m, v in sorted(beyond.items())), fontsize=8)
  fig.suptitle(_wrapped(title, fig, 10), fontsize=10)
  return _save(fig, path)
