"""Token-level layer-sensitivity oracle (RR §5 future work) and its rank correlation with the
residual ratio.

Sensitivity s[l, b, n] = cost of token n with only residual block (l, b) dropped − its dense
cost, where cost is the token's next-token loss (decoders) or the relative drift of its last
hidden state (encoders, dense cost 0). Each of the 2L probes is one forward with a
`gate_override` of zeros for that block (y = x; a post-LN block follows `post_ln_skip`) and ones
elsewhere. If the residual ratio (RR Eq. 1) is a good skip criterion, tokens/blocks with low
ratios have low sensitivity: Spearman's ρ between the two should be positive.
"""
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.profile.applied import forward, hidden_drift, is_decoder, token_losses
from skipjax.profile.ratios import BRANCHES


def rankdata(values: np.ndarray) -> np.ndarray:
  """Ranks 1 … n of a 1-D array, ties given their average rank (as scipy's 'average')."""
  values = np.asarray(values).reshape(-1)
  order = np.argsort(values, kind="mergesort")
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.arange(1, len(values) + 1)
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation ρ = Pearson correlation of the (average-tie) ranks."""
  ra, rb = rankdata(a), rankdata(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _token_cost(cfg, output, batch, dense_output):
  if is_decoder(cfg):
    return token_losses(output, batch["targets"])
  return hidden_drift(output, dense_output)


def layer_sensitivity(cfg, params, batch: Dict[str, Any], jit: bool = True) -> np.ndarray:
  """Per-token cost increase when only one residual block is dropped → [L, 2, B, T] float32."""
  model = models.build(cfg)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  dense = forward(model, params, batch)[0]
  shape = batch["inputs"].shape[:2] if "targets" in batch or "attention_mask" in batch else dense.shape[:2]

  def probe(params, batch, overrides):
    return _token_cost(cfg, forward(model, params, batch, overrides)[0], batch, dense)

  probe = jax.jit(probe) if jit else probe
  base = np.asarray(_token_cost(cfg, dense, batch, dense))
  ones = jnp.ones(shape, jnp.float32)
  out = np.zeros((cfg.num_layers, 2) + tuple(shape), np.float32)
  for i in range(cfg.num_layers):
    for b, name in enumerate(BRANCHES):
      overrides = {f"block_{j}": {n: ones for n in BRANCHES} for j in range(cfg.num_layers)}
      overrides[f"block_{i}"][name] = jnp.zeros(shape, jnp.float32)
      out[i, b] = np.asarray(probe(params, batch, overrides)) - base
  return out


def sensitivity_correlation(sensitivity: np.ndarray, ratios: np.ndarray,
                            valid: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """Spearman ρ between sensitivity and residual ratio: pooled over all blocks and tokens, per
  block (over tokens, [L, 2]), and per token over its 2L blocks (mean over tokens)."""
  if valid is None:
    valid = np.ones(ratios.shape[-2:], bool)
  s, r = sensitivity[..., valid], ratios[..., valid]  # [L, 2, N]
  per_block = np.array([[spearman(s[i, b], r[i, b]) for b in range(2)] for i in range(s.shape[0])])
  flat_s, flat_r = s.reshape(-1, s.shape[-1]), r.reshape(-1, r.shape[-1])
  per_token = np.array([spearman(flat_s[:, n], flat_r[:, n]) for n in range(flat_s.shape[1])])
  return {"pooled": spearman(s, r), "per_block": per_block.tolist(),
          "per_token_mean": float(np.nanmean(per_token)) if per_token.size else float("nan")}
