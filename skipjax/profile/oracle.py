"""Simulated residual-ratio oracles (RR §4.3–4.4): skip a block when its ratio is below a
threshold, with decisions taken from the full (unskipped) run's ratios, as in the paper.

Decisions are `keep = r ≥ threshold` on `[L, 2, B, T]` ratios (see ratios.py).
"""
from typing import Dict, Optional

import numpy as np

from skipjax.profile.ratios import interleave, token_mask


def oracle_keep(ratios: np.ndarray, threshold: float) -> np.ndarray:
  """RR §4.3: the oracle keeps block (l, b) for a token iff r ≥ threshold → bool [L, 2, B, T]."""
  return ratios >= threshold


def dynamic_depth(ratios: np.ndarray, threshold: float) -> np.ndarray:
  """Blocks kept per token (RR Fig. 5 right / Fig. 8) → int [B, T], in 0 … 2L."""
  return oracle_keep(ratios, threshold).sum(axis=(0, 1))


def dynamic_depth_histogram(ratios: np.ndarray, threshold: float, attention_mask=None,
                            exclude_first: bool = False) -> np.ndarray:
  """Histogram of dynamic depth over tokens: counts[k] = #tokens keeping k blocks, k = 0 … 2L."""
  depth = dynamic_depth(ratios, threshold)[token_mask(ratios, attention_mask, exclude_first)]
  return np.bincount(depth, minlength=2 * ratios.shape[0] + 1)


def routing_trace(ratios: np.ndarray, threshold: float, batch_index: int = 0,
                  attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Routing heat map (RR Fig. 6): bool [2L, T] (ATT/FFN interleaved) of kept blocks for one
  sequence; padded tokens (when a mask is given) are reported as kept=False."""
  keep = interleave(oracle_keep(ratios, threshold))[:, batch_index]
  if attention_mask is not None:
    keep = keep & np.asarray(attention_mask)[batch_index].astype(bool)[None]
  return keep


def skip_breakdown(ratios: np.ndarray, threshold: float, attention_mask=None,
                   exclude_first: bool = False) -> Dict[str, object]:
  """Where the oracle skips (RR §4.4, early vs late layers): fraction of skipped blocks per
  block [L, 2], over the first and the second half of the layers, and in total."""
  skip = ~oracle_keep(ratios, threshold)[..., token_mask(ratios, attention_mask, exclude_first)]
  per_block = skip.mean(-1)
  half = ratios.shape[0] // 2
  return {"per_block": per_block, "early": float(per_block[:half].mean()) if half else float("nan"),
          "late": float(per_block[half:].mean()), "total": float(per_block.mean())}
