"""FF activation sparsity statistics (SS = Dong et al. 2023) and CATS thresholds (Lee et al. 2024);
CLI: `python -m skipjax.profile --mode=sparsity`.

The activation a of an FF layer is the hidden that enters FF2 (SS Eq. 1), as the FFN sows it
(`activations/…/ffn_hidden`): act(W_1 x + b_1), or for gated FFNs (SwiGLU/GeGLU) the product
act(W_g x) ⊙ W_i x. A neuron is *active* for a token when its entry is non-zero (with a CATS
threshold t: when |a| ≥ t and a ≠ 0). Statistics, all over the profiled (valid) tokens:
- activation sparsity (SS §1): the fraction of non-zero entries of a (lower is sparser);
- neuron activation frequency (SS Fig. 1/2): per neuron, the fraction of tokens it is active on;
- block sparsity (SS §3.2): neurons are cut into contiguous blocks of B; a block is active when
  one of its neurons is; per token, the fraction of the layer's neurons inside active blocks
  (= E/F + B·#active blocks/F, the first E `exempt` neurons forming one always-active block);
- block activation maps (SS Fig. 4): active blocks of a few sampled tokens per layer;
- Dice 2|A∩B|/(|A|+|B|) and Jaccard |A∩B|/|A∪B| of the active-neuron sets A, B of the same token
  in two layers (SS Fig. 3), averaged over tokens (tokens where both sets are empty are left out).
CATS (§3): per layer, t = the quantile of |a| at the target fraction of zeroed entries, from a
random calibration sample of the profiled tokens; the model is then run with a·1[|a| ≥ t] (the
`skipjax.layers.ffn_threshold` hook; site 'hidden' = a above, 'gate' = CATS's act(W_g x)) and the
same statistics plus the perplexity cost are reported.

Workdir: `config.json`, `sparsity.json` (numbers), `sparsity.npz` (per-neuron frequencies
`{model}/{pass}/frequency` [L, F], block maps [L, S, nb], thresholds [L]), `plots/*.png`.
"""
import contextlib
import functools
import json
import os
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from skipjax import models, plots
from skipjax.depth import plan as plan_lib
from skipjax.layers import ffn_threshold
from skipjax.models import layout
from skipjax.profile import applied

HIDDEN = "ffn_hidden"


# -- statistics on activations (jnp; also take numpy arrays) ------------------------------------

def active_mask(a, t=0.0):
  """Active neurons: a ≠ 0 and |a| ≥ t (t = 0: SS's non-zero entries; t > 0: CATS)."""
  a = jnp.asarray(a)
  return (a != 0) & (jnp.abs(a) >= t)


def activation_sparsity(active) -> jnp.ndarray:
  """SS §1: the fraction of non-zero (active) entries."""
  return jnp.mean(jnp.asarray(active, jnp.float32))


def neuron_frequency(active) -> jnp.ndarray:
  """SS Fig. 1/2: [..., N, F] active → [..., F], the fraction of the N tokens each neuron is active on."""
  return jnp.mean(jnp.asarray(active, jnp.float32), axis=-2)


def num_blocks(d_ff: int, block_size: int, exempt: int = 0, where: str = "config.sparsity") -> int:
  """Blocks of B neurons after the E exempt ones (SS §3.2: equal sizes); ValueError otherwise."""
  if block_size < 1:
    raise ValueError(f"{where}.block_size={block_size} must be ≥ 1")
  if not 0 <= exempt < d_ff:
    raise ValueError(f"{where}.exempt={exempt} must be in [0, d_ff={d_ff})")
  if (d_ff - exempt) % block_size:
    raise ValueError(f"{where}.block_size={block_size} does not divide d_ff − exempt = {d_ff} − {exempt}")
  return (d_ff - exempt) // block_size


def block_active(active, block_size: int, exempt: int = 0) -> jnp.ndarray:
  """SS §3.2: [..., F] → [..., nb]: a block is active when at least one of its neurons is."""
  active = jnp.asarray(active)
  nb = num_blocks(active.shape[-1], block_size, exempt)
  return jnp.any(active[..., exempt:].reshape(active.shape[:-1] + (nb, block_size)), axis=-1)


def block_sparsity(active, block_size: int, exempt: int = 0) -> jnp.ndarray:
  """SS §3.2 per token: the fraction of the layer's F neurons inside active blocks, the E exempt
  neurons counting as one always-active block → [...]."""
  d_ff = jnp.shape(active)[-1]
  blocks = jnp.sum(block_active(active, block_size, exempt), axis=-1, dtype=jnp.float32)
  return (exempt + block_size * blocks) / d_ff


def overlap_sums(active) -> Dict[str, jnp.ndarray]:
  """SS Fig. 3 over tokens: [L, N, F] → sums over tokens of Dice and Jaccard [L, L] between the
  layers' active sets, and the count of tokens entering each pair (union non-empty)."""
  a = jnp.asarray(active, jnp.float32)
  inter = jnp.einsum("lnf,mnf->lmn", a, a)  # [L, L, N] |A_l ∩ A_m| per token
  size = jnp.sum(a, axis=-1)  # [L, N]
  total = size[:, None] + size[None, :]  # |A_l| + |A_m|
  union = total - inter
  used = union > 0
  dice = jnp.where(used, 2 * inter / jnp.where(used, total, 1), 0)
  jac = jnp.where(used, inter / jnp.where(used, union, 1), 0)
  return {"dice": dice.sum(-1), "jaccard": jac.sum(-1), "pairs": used.sum(-1, dtype=jnp.float32)}


def layer_similarity(active) -> Tuple[np.ndarray, np.ndarray]:
  """SS Fig. 3: [L, N, F] active → (Dice [L, L], Jaccard [L, L]) averaged over tokens."""
  s = overlap_sums(active)
  n = np.maximum(np.asarray(s["pairs"]), 1)
  return np.asarray(s["dice"]) / n, np.asarray(s["jaccard"]) / n


def cats_thresholds(values, target: float) -> np.ndarray:
  """CATS §3: per layer, t_l = the `target` quantile of |values[l]| ([L, ...] → [L]), so that a
  fraction `target` of the entries has |a| < t_l (is zeroed) and 1 − target stays (SS sparsity)."""
  if not 0 <= target < 1:
    raise ValueError(f"config.sparsity.cats: target {target} must be in [0, 1)")
  v = np.abs(np.asarray(values, np.float32)).reshape(len(values), -1)
  return np.quantile(v, target, axis=1, method="inverted_cdf").astype(np.float32)


# -- the model pass ------------------------------------------------------------------------------

def _find(tree, name: str):
  """The first value sown as `name` anywhere below `tree` (the FFN's own sub-tree)."""
  if not isinstance(tree, dict):
    return None
  if name in tree:
    return tree[name]
  for v in tree.values():
    found = _find(v, name)
    if found is not None:
      return found
  return None


def per_layer_sown(acts, name: str) -> jnp.ndarray:
  """A value the FFN sows (`name`), stacked over the layers → [L, B, T, F] (loop or scan layout)."""
  if layout.is_scan(acts):
    found = _find(acts[layout.SCAN_KEY][layout.SCAN_BLOCK], name)
    if found is None:
      raise ValueError(f"no FFN sowed {name!r}")
    return jnp.asarray(found[0])
  rows = []
  for i in layout.slots(acts):
    found = _find(acts[layout.block_name(i)], name)
    if found is None:
      raise ValueError(f"block {i}'s FFN sowed no {name!r}")
    rows.append(found[0])
  return jnp.stack(rows)


def _blocks_cfg(cfg):
  return cfg if applied.is_decoder(cfg) else cfg.transformer


def describe_hidden(cfg) -> str:
  blocks = _blocks_cfg(cfg)
  if getattr(blocks, "mlp_gated", False):
    return f"{blocks.activation}(W_g x) ⊙ W_i x  (gated FFN: the product entering FF2)"
  return f"{blocks.activation}(W_1 x + b_1)"


def _pass_sums(a, valid, t, block_size: int, exempt: int, map_idx):
  """Per-batch sums of every statistic: a [L, B, T, F], valid [B, T], t [L], map_idx [S] (flat)."""
  L, F = a.shape[0], a.shape[-1]
  flat = a.reshape(L, -1, F)  # [L, N, F]
  active = active_mask(flat, t[:, None, None]) & valid.reshape(1, -1, 1)
  blocks = block_active(active, block_size, exempt)  # [L, N, nb]
  bs = jnp.where(valid.reshape(1, -1), block_sparsity(active, block_size, exempt), 0)  # [L, N]
  return {"tokens": valid.sum(dtype=jnp.float32), "active": active.sum((1, 2), dtype=jnp.float32),
          "frequency": active.sum(1, dtype=jnp.float32), "block_sparsity": bs.sum(1),
          "block_frequency": blocks.sum(1, dtype=jnp.float32), **overlap_sums(active),
          "maps": blocks[:, map_idx]}


@functools.lru_cache(maxsize=8)
def _step_fn(model, decoder: bool, hooked: bool, site: str, capture: bool, block_size: int, exempt: int):
  """One jitted pass over a batch: (params, batch, valid [B, T], t [L], calib_idx, map_idx) →
  (sums, token losses or None, calibration |values| [L, n, F])."""

  def step(params, batch, valid, t, calib_idx, map_idx):
    with contextlib.ExitStack() as hooks:
      zero = hooks.enter_context(ffn_threshold.zero_below(t, site)) if hooked else None
      gate = hooks.enter_context(ffn_threshold.capture_gate()) if capture else None
      out, state = applied.forward(model, params, batch, mutable=["activations"])
    if zero is not None:
      ffn_threshold.check_applied(zero, site)
    if gate is not None:
      ffn_threshold.check_applied(gate, "gate")
    a = per_layer_sown(state["activations"], HIDDEN).astype(jnp.float32)  # [L, B, T, F]
    # The 'gate' site has already zeroed a; the 'hidden' site zeroes it at FF2's input.
    stat_t = t if (hooked and site == "hidden") else jnp.zeros_like(t)
    sums = _pass_sums(a, valid, stat_t, block_size, exempt, map_idx)
    calib = per_layer_sown(state["activations"], ffn_threshold.GATE_ACT) if capture else a
    calib = jnp.abs(calib.reshape(calib.shape[0], -1, calib.shape[-1])[:, calib_idx])  # [L, n, F]
    losses = applied.token_losses(out, batch["targets"]) if decoder else None
    return sums, losses, calib

  return jax.jit(step)


def _chunks(batch: Dict[str, np.ndarray], size: int) -> List[Dict[str, np.ndarray]]:
  n = len(batch["inputs"])
  return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def summarise(sums: Dict[str, np.ndarray], block_size: int, exempt: int) -> Dict[str, Any]:
  """Accumulated sums → the statistics (per layer and means over layers) and arrays for figures."""
  n = max(float(sums["tokens"]), 1.0)
  L, F = sums["frequency"].shape
  freq = sums["frequency"] / n  # [L, F]
  pairs = np.maximum(sums["pairs"], 1)
  dice, jac = sums["dice"] / pairs, sums["jaccard"] / pairs
  off = ~np.eye(L, dtype=bool)
  sparsity = sums["active"] / (n * F)
  block = sums["block_sparsity"] / n
  top = np.argsort(-freq, axis=1)[:, :5]
  numbers = {
      "tokens": int(n), "sparsity": float(sparsity.mean()), "sparsity_per_layer": sparsity.tolist(),
      "block_sparsity": float(block.mean()), "block_sparsity_per_layer": block.tolist(),
      "block_size": block_size, "exempt": exempt,
      "dice": dice.tolist(), "jaccard": jac.tolist(),
      "dice_mean_between_layers": float(dice[off].mean()) if L > 1 else None,
      "jaccard_mean_between_layers": float(jac[off].mean()) if L > 1 else None,
      "neurons": {"never_active": (freq == 0).mean(1).tolist(), "active_over_half": (freq > 0.5).mean(1).tolist(),
                  "max_frequency": freq.max(1).tolist(), "top5": top.tolist(),
                  "top5_frequency": np.take_along_axis(freq, top, 1).tolist()}}
  arrays = {"frequency": freq.astype(np.float32), "block_frequency": (sums["block_frequency"] / n).astype(np.float32),
            "maps": sums["maps"], "dice": dice, "jaccard": jac}
  return {"numbers": numbers, "arrays": arrays}


def profile_pass(cfg, params, batch: Dict[str, np.ndarray], s, batch_size: int, thresholds: np.ndarray,
                 calib_tokens: int = 0, hooked: bool = False, seed: int = 0) -> Dict[str, Any]:
  """All statistics over `batch` with FFN thresholds `thresholds` [L] (zeros: the dense model).

  Returns {'numbers', 'arrays', 'loss', 'perplexity' (decoders), 'calibration' ([L, n, F] |a| of
  `calib_tokens` random tokens, or None)}."""
  decoder = applied.is_decoder(cfg)
  model = models.build(cfg)
  capture = hooked and s.site == "gate"
  step = _step_fn(model, decoder, hooked, s.site, capture, s.block_size, s.exempt)
  parts = _chunks(batch, batch_size)
  rng = np.random.default_rng(seed)
  per_chunk = -(-calib_tokens // len(parts)) if calib_tokens else 0
  sums, losses, calib = None, [], []
  for i, part in enumerate(parts):
    valid = _valid(model, params, part)  # [B, T]
    tokens = valid.size
    calib_idx = np.sort(rng.choice(tokens, min(per_chunk, tokens), replace=False)) if per_chunk else np.zeros(0, int)
    shown = min(s.map_tokens, tokens)
    map_idx = np.sort(rng.choice(tokens, shown, replace=False)) if i == 0 else np.zeros(shown, int)
    got, loss, cal = step(params, {k: jnp.asarray(v) for k, v in part.items()}, jnp.asarray(valid),
                          jnp.asarray(thresholds, jnp.float32), jnp.asarray(calib_idx), jnp.asarray(map_idx))
    got = jax.tree.map(np.asarray, got)
    maps = got.pop("maps")
    if sums is None:
      sums = {**got, "maps": maps}
    else:
      sums = {k: (v if k == "maps" else v + got[k]) for k, v in sums.items()}
    if loss is not None:
      losses.append(np.asarray(loss).reshape(-1))
    if per_chunk:
      calib.append(np.asarray(cal))
  out = summarise(sums, s.block_size, s.exempt)
  if losses:
    loss = float(np.concatenate(losses).mean())
    out.update(loss=loss, perplexity=float(np.exp(loss)))
  out["calibration"] = np.concatenate(calib, axis=1) if calib else None
  return out


def _valid(model, params, part: Dict[str, np.ndarray]) -> np.ndarray:
  """[B, T] bool of the tokens to count: the attention mask, else all (packed text; ViT patches +
  CLS, whose number comes from the model's output shape)."""
  if "attention_mask" in part:
    return np.asarray(part["attention_mask"], bool)
  if "targets" in part:
    return np.ones(part["targets"].shape, bool)
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, jnp.asarray(part["inputs"]))
  return np.ones(out.shape[:2], bool)


def check_config(s, d_ff: int) -> None:
  """One-line ValueErrors naming the `config.sparsity` field."""
  num_blocks(d_ff, s.block_size, s.exempt)
  if s.site not in ffn_threshold.SITES:
    raise ValueError(f"config.sparsity.site={s.site!r} is not one of {ffn_threshold.SITES}")
  for t in s.cats:
    if not 0 < float(t) < 1:
      raise ValueError(f"config.sparsity.cats: target {t} must be in (0, 1) (the fraction of zeroed activations)")
  if s.map_tokens < 1 or s.figure_layers < 1:
    raise ValueError("config.sparsity.map_tokens and figure_layers must be ≥ 1")
  if s.cats and s.calib_tokens < 1:
    raise ValueError(f"config.sparsity.calib_tokens={s.calib_tokens} must be ≥ 1 with CATS targets")


def profile_model(cfg, params, batch: Dict[str, np.ndarray], s, batch_size: int, seed: int = 0
                  ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """The dense statistics and, per CATS target, thresholds + statistics + perplexity cost.

  Returns (JSON numbers, arrays for sparsity.npz and the figures)."""
  blocks = _blocks_cfg(cfg)
  check_config(s, blocks.d_ff)
  if not plan_lib.is_identity(blocks.execution_plan, blocks.num_layers):
    raise ValueError(f"config.model.plan={blocks.plan!r}: the sparsity profiler needs the identity plan "
                     "(one FFN per layer)")
  L = blocks.num_layers
  targets = [float(t) for t in s.cats]
  hooked = bool(targets)
  dense = profile_pass(cfg, params, batch, s, batch_size, np.zeros(L, np.float32),
                       s.calib_tokens if targets else 0, hooked, seed)
  out = {"hidden": describe_hidden(cfg), "gated": bool(getattr(blocks, "mlp_gated", False)),
         "activation": blocks.activation, "num_layers": L, "d_ff": blocks.d_ff,
         "dense": {**dense["numbers"], **{k: dense[k] for k in ("loss", "perplexity") if k in dense}}}
  arrays = {f"dense/{k}": v for k, v in dense["arrays"].items()}
  logging.info("dense: sparsity %.4f, block sparsity %.4f%s", out["dense"]["sparsity"], out["dense"]["block_sparsity"],
               f", ppl {dense['perplexity']:.3f}" if "perplexity" in dense else "")
  rows = []
  for target in targets:
    t = cats_thresholds(dense["calibration"], target)
    res = profile_pass(cfg, params, batch, s, batch_size, t, 0, True, seed)
    row = {"target_zero_fraction": target, "site": s.site, "thresholds": t.tolist(),
           "calibration_tokens": int(dense["calibration"].shape[1]), **res["numbers"]}
    if "perplexity" in res:
      row.update(loss=res["loss"], perplexity=res["perplexity"],
                 perplexity_increase=res["perplexity"] / dense["perplexity"] - 1)
    rows.append(row)
    arrays.update({f"cats_{target:g}/{k}": v for k, v in res["arrays"].items()})
    arrays[f"cats_{target:g}/thresholds"] = t
    logging.info("CATS %.2f (%s): sparsity %.4f, block sparsity %.4f%s", target, s.site, row["sparsity"],
                 row["block_sparsity"], f", ppl {row['perplexity']:.3f}" if "perplexity" in row else "")
  out["cats"] = rows
  return out, arrays


# -- figures and the CLI pipeline -------------------------------------------------------------------

def shown_layers(num_layers: int, count: int) -> List[int]:
  """`count` layers evenly spaced from the first to the last (all when there are fewer)."""
  if num_layers <= count:
    return list(range(num_layers))
  return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, count)})


def figures(name: str, res: Dict[str, Any], arrays: Dict[str, np.ndarray], s, data: str, plot_dir: str) -> List[str]:
  """Per pass (dense, each CATS target): SS Fig. 1/2 (frequencies), Fig. 3 (Dice/Jaccard), Fig. 4
  (block maps) and per-layer (block) sparsity; and the CATS perplexity-cost curve."""
  paths = []
  passes = [("dense", "dense", res["dense"])] + [
      (f"cats_{r['target_zero_fraction']:g}", f"CATS zero {r['target_zero_fraction']:g} ({r['site']})", r)
      for r in res["cats"]]
  layers = shown_layers(res["num_layers"], s.figure_layers)
  for key, label, nums in passes:
    head = f"{name} · {data} · {label}"
    paths.append(plots.neuron_frequencies(
        arrays[f"{key}/frequency"], os.path.join(plot_dir, f"{name}_{key}_frequency.png"), layers,
        title=f"{head} · neuron activation frequency (SS Fig. 1/2)"))
    paths.append(plots.layer_similarity(
        arrays[f"{key}/dice"], arrays[f"{key}/jaccard"], os.path.join(plot_dir, f"{name}_{key}_similarity.png"),
        title=f"{head} · active-neuron similarity between layers (SS Fig. 3)"))
    paths.append(plots.block_activation_maps(
        arrays[f"{key}/maps"], os.path.join(plot_dir, f"{name}_{key}_block_maps.png"), layers,
        title=f"{head} · active blocks (B={s.block_size}{f', {s.exempt} exempt' if s.exempt else ''}) "
              f"of {arrays[f'{key}/maps'].shape[1]} random tokens (SS Fig. 4)"))
    paths.append(plots.sparsity_per_layer(
        nums["sparsity_per_layer"], nums["block_sparsity_per_layer"],
        os.path.join(plot_dir, f"{name}_{key}_per_layer.png"),
        title=f"{head} · sparsity (fraction non-zero) and block sparsity (B={s.block_size}) per layer"))
  if res["cats"] and "perplexity" in res["dense"]:
    paths.append(plots.cats_cost(
        res["dense"], res["cats"], os.path.join(plot_dir, f"{name}_cats_cost.png"),
        title=f"{name} · {data} · CATS: zero |a| < t per layer ({res['cats'][0]['site']})"))
  return paths


def _write_atomic(path: str, write, mode: str = "w") -> None:
  """`write(file)` into a temporary name, then renamed: an interrupted run leaves no half file."""
  tmp = path + ".tmp"
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)


def run(config, workdir: str) -> Dict[str, Any]:
  """`python -m skipjax.profile --mode=sparsity`: every model of `config.model` → the workdir files."""
  from skipjax.profile import run as ratios_run  # pylint: disable=import-outside-toplevel
  s = config.sparsity
  if config.tokenizer not in ratios_run.inputs.TOKENIZER_KINDS:
    raise ValueError(f"config.tokenizer={config.tokenizer!r} is not one of {ratios_run.inputs.TOKENIZER_KINDS}")
  os.makedirs(workdir, exist_ok=True)
  _write_atomic(os.path.join(workdir, "config.json"), lambda f: f.write(config.to_json(indent=2)))
  data = ratios_run.data_label(config)
  results, all_arrays, paths = {}, {}, []
  for spec in [x.strip() for x in str(config.model).split(",")]:
    name, directory, cfg, params = ratios_run.load_model(spec, config, workdir)
    if name in results:
      raise ValueError(f"config.model lists {name!r} twice")
    batch = ratios_run.make_batch(config, directory, cfg)
    res, arrays = profile_model(cfg, params, batch, s, config.batch_size, config.seed)
    res["path"] = directory
    results[name] = res
    all_arrays.update({f"{name}/{k}": v for k, v in arrays.items()})
    paths += figures(name, res, arrays, s, data, os.path.join(workdir, "plots"))
  summary = {"data": config.data, "sparsity": s.to_dict(), "models": results,
             "figures": [os.path.relpath(p, workdir) for p in paths]}
  summary = ratios_run._jsonable(summary)  # pylint: disable=protected-access
  _write_atomic(os.path.join(workdir, "sparsity.npz"), lambda f: np.savez_compressed(f, **all_arrays), "wb")
  _write_atomic(os.path.join(workdir, "sparsity.json"), lambda f: json.dump(summary, f, indent=1))
  return summary
