"""Residual ratios r = ‖R(x)‖₂ / ‖x‖₂ (RR Eq. 1) per block and token, and their summaries.

Ratios come from the norms every Block sows into `stats` (fp32), so the profiler is one forward
pass of the unchanged model. Array layout everywhere: `[num_layers, 2, batch, seq]` with index
0 = attention block, 1 = FFN block (RR Fig. 3).
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from skipjax.models import per_layer

BRANCHES = ("attn", "ffn")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def ratios_from_stats(stats: Any) -> np.ndarray:
  """RR Eq. 1 from a `stats` collection: ‖R(x)‖/‖x‖ → [L, 2, B, T] float32."""
  out = []
  for branch in BRANCHES:
    x = np.asarray(per_layer(stats, f"{branch}_input_norm"), np.float32)
    r = np.asarray(per_layer(stats, f"{branch}_residual_norm"), np.float32)
    out.append(r / np.maximum(x, np.finfo(np.float32).tiny))
  return np.stack(out, axis=1)


@functools.lru_cache(maxsize=32)
def _stats_fn(model, static: Tuple[Tuple[str, Any], ...], jit: bool) -> Callable:
  """(params, inputs, args, arrays) → `stats` collection; jitted once per (model, static kwargs)."""
  def run(params, inputs, args, arrays):
    _, state = model.apply({"params": params}, inputs, *args, mutable=["stats"], **dict(static), **arrays)
    return state["stats"]
  return jax.jit(run) if jit else run


def residual_ratios(model, params, inputs, *args, jit: bool = False, **apply_kwargs) -> np.ndarray:
  """RR Eq. 1 for every attention/FFN block and token of `model` on `inputs` → [L, 2, B, T].

  `args`/`apply_kwargs` go to `model.apply` (e.g. positions, attention_mask). With `jit=True`
  array arguments are traced and the others are static; the compiled function is cached per
  (model, static arguments), so repeated calls do not recompile.
  """
  arrays = {k: v for k, v in apply_kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
  static = tuple(sorted((k, v) for k, v in apply_kwargs.items() if k not in arrays))
  stats = _stats_fn(model, static, jit)(params, inputs, tuple(args), arrays)
  return ratios_from_stats(stats)


def token_mask(ratios: np.ndarray, attention_mask: Optional[np.ndarray] = None,
               exclude_first: bool = False) -> np.ndarray:
  """[B, T] bool of tokens to summarise: valid (mask) and, optionally, not the first valid
  token of its sequence (BOS / first-token outliers, RR §4.2)."""
  batch, seq = ratios.shape[-2:]
  valid = np.ones((batch, seq), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if exclude_first:
    first = np.argmax(valid, axis=1)
    valid = valid.copy()
    valid[np.arange(batch), first] = False
  return valid


def _select(ratios: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[L, 2, B, T] → [L, 2, N] over the N selected tokens."""
  return ratios[..., mask]


def quantiles(ratios: np.ndarray, attention_mask=None, exclude_first: bool = False,
              qs: Sequence[float] = QUANTILES) -> Dict[str, Any]:
  """Per-model ratio distribution (RR Fig. 4): median and quantiles over all blocks and tokens,
  overall and per block type."""
  sel = _select(ratios, token_mask(ratios, attention_mask, exclude_first))

  def stats(values: np.ndarray) -> Dict[str, Any]:
    values = values.reshape(-1)
    return {"median": float(np.median(values)), "mean": float(values.mean()),
            "quantiles": {str(q): float(np.quantile(values, q)) for q in qs}, "count": int(values.size)}

  return {"all": stats(sel), "attn": stats(sel[:, 0]), "ffn": stats(sel[:, 1])}


def per_block(ratios: np.ndarray, attention_mask=None, exclude_first: bool = False) -> Dict[str, np.ndarray]:
  """Per-block statistics over tokens (RR Fig. 5/8): `median`, quartiles `q25`/`q75`, `mean`,
  `std`, each [L, 2]."""
  sel = _select(ratios, token_mask(ratios, attention_mask, exclude_first))
  q25, median, q75 = np.quantile(sel, (0.25, 0.5, 0.75), axis=-1)
  return {"mean": sel.mean(-1), "std": sel.std(-1), "median": median, "q25": q25, "q75": q75}


def interleave(per_layer_blocks: np.ndarray) -> np.ndarray:
  """[L, 2, ...] → [2L, ...] in network order ATT₀, FFN₀, ATT₁, … (RR Fig. 6)."""
  return per_layer_blocks.reshape((-1,) + per_layer_blocks.shape[2:])


def summary(ratios: np.ndarray, attention_mask=None, exclude_first: bool = False) -> Dict[str, Any]:
  """JSON-serialisable summary: distribution (Fig. 4) and per-block statistics (Fig. 5/8)."""
  blocks = per_block(ratios, attention_mask, exclude_first)
  return {"num_layers": int(ratios.shape[0]), "exclude_first": exclude_first,
          **quantiles(ratios, attention_mask, exclude_first),
          "per_block": {k: v.tolist() for k, v in blocks.items()}}
