"""The profiling pipeline behind `python -m skipjax.profile`: load → inputs → ratios → oracles →
`summary.json`, `ratios.npz` and figures (RR §4 Fig. 4–6/8 and the §5 future-work oracles).

Workdir layout: `config.json`, `summary.json`, `ratios.npz` ({model name: [L, 2, N, T]}),
`plots/*.png`; `tiny_opt/` when the tiny preset writes its random model.
"""
import json
import os
import re
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from skipjax import models, plots
from skipjax.convert import export, hf
from skipjax.profile import applied, imitation, inputs, oracle, ratios, sensitivity, tiny


VISION_TYPES = ("vit", "dinov2")  # encoders that take pixels


def model_name(spec: str) -> str:
  """A short, file-name-safe name for a checkpoint folder or hub id (a folder called `model`
  is named after its parent, as in pip-installed model packages)."""
  path = os.path.normpath(spec)
  name = os.path.basename(path) or spec
  if name.lower().endswith(".gguf"):
    name = name[:-len(".gguf")]
  if name in ("model", "checkpoint", "hf") and os.path.basename(os.path.dirname(path)):
    name = os.path.basename(os.path.dirname(path))
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def load_model(spec: str, config, workdir: str) -> Tuple[str, str, Any, Any]:
  """(name, folder, cfg, params); `tiny`/'' writes a random OPT to `<workdir>/tiny_opt` first."""
  if spec in ("", "tiny"):
    t = config.tiny
    spec = tiny.random_opt(os.path.join(workdir, "tiny_opt"), t.num_layers, t.d_model, t.num_heads, t.ffn_dim,
                           t.vocab_size, max_positions=max(64, config.seq_len), seed=config.seed)
  directory = hf.resolve(spec)
  if os.path.isdir(os.path.join(directory, "params")):  # a skipjax export (convert, depth.prune)
    cfg, params = export.restore(directory)
  else:
    cfg, params = hf.load(directory, dtype=jnp.dtype(config.dtype))
  return model_name(spec), directory, applied.with_post_ln_skip(cfg, config.post_ln_skip), params


def text_tokenizer(config, directory: str, vocab_size: int):
  """The tokenizer for `config.data` (inputs.tokenizer_for); random ids need none, so a model
  folder without tokenizer files still runs the offline smoke preset."""
  if inputs.is_random(config.data) and config.tokenizer == "auto":
    try:
      return inputs.tokenizer_for(directory, vocab_size)
    except ValueError:
      return inputs.ModuloByteTokenizer(vocab_size)  # only its vocabulary size is used
  return inputs.tokenizer_for(directory, vocab_size, config.tokenizer)


def make_batch(config, directory: str, cfg) -> Dict[str, np.ndarray]:
  """Profiling inputs for this model (see inputs.py): packed text or images."""
  if config.data.startswith("images:"):
    if not isinstance(cfg, models.EncoderConfig) or cfg.model_type not in VISION_TYPES:
      raise ValueError(f"config.data={config.data!r} needs a ViT model")
    return inputs.image_batch(config.data, directory, cfg.image_size, config.num_sequences, cfg.num_channels,
                              resizable=cfg.model_type == "dinov2")
  if isinstance(cfg, models.EncoderConfig) and cfg.model_type in VISION_TYPES:
    raise ValueError(f"config.data={config.data!r}: a ViT model needs 'images:<folder>' or 'images:builtin'")
  vocab = cfg.vocab_size if applied.is_decoder(cfg) else cfg.transformer.vocab_size
  max_len = cfg.max_len if applied.is_decoder(cfg) else cfg.transformer.max_len
  if config.seq_len > max_len:
    raise ValueError(f"config.seq_len={config.seq_len} exceeds the model's {max_len} positions")
  return inputs.text_batch(config.data, text_tokenizer(config, directory, vocab), config.seq_len,
                           config.num_sequences, encoder=not applied.is_decoder(cfg),
                           max_records=config.max_records, seed=config.seed)


def profile_ratios(cfg, params, batch: Dict[str, np.ndarray], batch_size: int) -> np.ndarray:
  """RR Eq. 1 for all sequences, `batch_size` at a time (one jitted forward each) → [L, 2, N, T]."""
  model = models.build(cfg)
  n = len(batch["inputs"])
  out = []
  for start in range(0, n, batch_size):
    part = {k: jnp.asarray(v[start:start + batch_size]) for k, v in batch.items()}
    kwargs = {"attention_mask": part["attention_mask"]} if "attention_mask" in part else {}
    out.append(ratios.residual_ratios(model, params, part["inputs"], jit=True, **kwargs))
  return np.concatenate(out, axis=2)


def depth_stats(r: np.ndarray, thresholds, mask, exclude_first: bool) -> Dict[str, Any]:
  """Dynamic depth (RR Fig. 5/8) and early/late breakdown (§4.4) per threshold."""
  out = {}
  select = ratios.token_mask(r, mask, exclude_first)
  for t in thresholds:
    depth = oracle.dynamic_depth(r, t)[select]
    b = oracle.skip_breakdown(r, t, mask, exclude_first)
    out[f"{t:g}"] = {"mean": float(depth.mean()), "median": float(np.median(depth)), "max": 2 * r.shape[0],
                     "relative_mean": float(depth.mean() / (2 * r.shape[0])),
                     "histogram": oracle.dynamic_depth_histogram(r, t, mask, exclude_first).tolist(),
                     "skipped": {"early": b["early"], "late": b["late"], "total": b["total"]}}
  return out


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def profile_one(spec: str, config, workdir: str) -> Tuple[str, Dict[str, Any], np.ndarray]:
  """Everything for one model: (name, its summary, its ratios [L, 2, N, T])."""
  name, directory, cfg, params = load_model(spec, config, workdir)
  batch = make_batch(config, directory, cfg)
  r = profile_ratios(cfg, params, batch, config.batch_size)
  mask = batch.get("attention_mask")
  blocks = cfg if applied.is_decoder(cfg) else cfg.transformer
  out = {"path": directory, "kind": "decoder" if applied.is_decoder(cfg) else cfg.model_type, "norm": blocks.norm,
         "post_ln_skip": blocks.post_ln_skip,
         "num_layers": int(r.shape[0]), "num_params": num_params(params),
         "num_sequences": int(r.shape[2]), "seq_len": int(r.shape[3]),
         "ratios": ratios.summary(r, mask, config.exclude_first),
         "dynamic_depth": depth_stats(r, sorted(set(config.thresholds) | {config.threshold}), mask,
                                      config.exclude_first)}
  logging.info("%s: median residual ratio %.4f over %d block-tokens", name, out["ratios"]["all"]["median"],
               out["ratios"]["all"]["count"])
  sub = {k: jnp.asarray(v[: config.oracle_sequences]) for k, v in batch.items()}
  sub_r = r[:, :, : config.oracle_sequences]
  if config.applied:
    out["applied_oracle"] = applied.applied_oracle(cfg, params, sub, [0.0] + list(config.thresholds), sub_r)
  if config.sensitivity:
    s = sensitivity.layer_sensitivity(cfg, params, sub)
    out["sensitivity"] = {**sensitivity.sensitivity_correlation(s, sub_r, applied.valid_tokens(sub)),
                          "mean_per_block": s.mean(axis=(2, 3)).tolist()}
  if config.imitation:
    out["imitation"] = imitation.imitation(cfg, params, sub, sub_r, config.threshold, config.imitation_steps,
                                           config.seed)
  return name, out, r


def data_label(config) -> str:
  """Short description of the profiled data for figure titles."""
  data = str(config.data)
  if inputs.is_random(data):
    return f"random tokens, {config.num_sequences}×{config.seq_len}"
  if data.startswith("images:"):
    where = data[len("images:"):]
    return f"images: {'built-in patterns' if where == 'builtin' else os.path.basename(os.path.normpath(where))}"
  path = data[len("text:"):] if data.startswith("text:") else data
  parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
  name = f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path)
  return f"{name}, {config.num_sequences}×{config.seq_len} packed tokens"


def figures(results: Dict[str, Dict[str, Any]], all_ratios: Dict[str, np.ndarray], config, plot_dir: str) -> List[str]:
  """ratio_distributions.png (all models), and per model: per-block median and quartiles +
  dynamic depth, routing trace (first `trace_sequences` sequences), applied-oracle curve; plus
  applied_oracle.png (all models). Every title names the model(s) and the data."""
  t = config.threshold
  data = data_label(config)
  paths, dist = [], {}
  for name, r in all_ratios.items():
    mask = ratios.token_mask(r, None, config.exclude_first)
    dist[name] = r[..., mask].reshape(-1)
    blocks = ratios.per_block(r, None, config.exclude_first)
    paths.append(plots.per_block_ratios(blocks, oracle.dynamic_depth_histogram(r, t, None, config.exclude_first), t,
                                        os.path.join(plot_dir, f"{name}_per_block.png"),
                                        title=f"{name} · {data} · per-block residual ratio (RR Fig. 5/8)"))
    shown = range(min(config.trace_sequences, r.shape[2]))
    paths.append(plots.routing_trace(np.stack([oracle.routing_trace(r, t, b) for b in shown]),
                                     os.path.join(plot_dir, f"{name}_routing_trace.png"), t,
                                     title=f"{name} · {data}", sequences=shown))
  names = ", ".join(all_ratios)
  paths.insert(0, plots.ratio_distributions(dist, os.path.join(plot_dir, "ratio_distributions.png"),
                                            log=config.violin_log,
                                            title=f"{names} · {data} · residual ratios, all blocks"))
  curves = {n: res["applied_oracle"]["curve"] for n, res in results.items() if "applied_oracle" in res}
  for metric in ("perplexity", "drift"):
    chosen = {n: c for n, c in curves.items() if metric in c[0]["applied"]}
    if chosen:
      suffix = "" if metric == "perplexity" else "_drift"
      post_ln = any(results[n].get("norm") == "post" for n in chosen)
      rule = f"; skipped post-LN block → {'LN(x)' if config.post_ln_skip == 'ln' else 'x'}" if post_ln else ""
      title = (f"{', '.join(chosen)} · {data} (first {config.oracle_sequences} sequences) · "
               f"applied oracle: skip when ratio < t{rule}")
      paths.append(plots.applied_oracle_curve(chosen, os.path.join(plot_dir, f"applied_oracle{suffix}.png"), metric,
                                              title=title))
  return paths


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def run(config, workdir: str) -> Dict[str, Any]:
  """Profiles every model of `config.model` (comma-separated) and writes the workdir files."""
  if config.tokenizer not in inputs.TOKENIZER_KINDS:
    raise ValueError(f"config.tokenizer={config.tokenizer!r} is not one of {inputs.TOKENIZER_KINDS}")
  if config.post_ln_skip not in applied.POST_LN_SKIPS:
    raise ValueError(f"config.post_ln_skip={config.post_ln_skip!r} is not one of {applied.POST_LN_SKIPS}")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  results, all_ratios = {}, {}
  for spec in [s.strip() for s in str(config.model).split(",")]:
    name, res, r = profile_one(spec, config, workdir)
    if name in results:
      raise ValueError(f"config.model lists {name!r} twice")
    results[name], all_ratios[name] = res, r
  np.savez_compressed(os.path.join(workdir, "ratios.npz"), **all_ratios)
  summary = {"data": config.data, "threshold": config.threshold, "thresholds": list(config.thresholds),
             "exclude_first": config.exclude_first, "models": results}
  summary["figures"] = [os.path.relpath(p, workdir) for p in figures(results, all_ratios, config,
                                                                      os.path.join(workdir, "plots"))]
  summary = _jsonable(summary)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
