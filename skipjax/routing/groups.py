"""Routing groups (LtS §2.2): the token pools within which routed tokens are compacted.

LtS forms its Gsize groups from all non-skipped tokens of a batch ("Gsize ∝ P·B·T"), so that the
compute follows the batch's routed count rather than each sequence's. Here a routing group is
`group_size` consecutive tokens of the row-major [B, T] batch:

  * 0: one batch row (S = T tokens), the default;
  * a divisor of T: T / group_size pieces of every row;
  * a multiple of T: k = group_size / T whole rows pooled into one group.

Pointwise compute (the FFN, and the FFN part of a routed layer) is dispatched over these groups.
Attention queries stay per batch row, because a query attends to the K/V of its own row
(LtS Alg. 1): see `dispatch.dispatch_layer`. A group never spans two data shards when the number
of groups per batch is divisible by the mesh's data axis (`check_group_size`, run by
skipjax.validation), so routing needs no cross-device traffic.

`dispatch='grouped'` cuts each group into chunks of `gsize` slots; `capacity` gives each group
C = ⌈capacity_factor·P·S_group⌉ slots. `effective_groups` reports what a configuration gets.
"""
import math
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

FIELD = "config.model.skip.group_size"


def fit_group_size(batch: int, seq_len: int, group_size: int) -> int:
  """Tokens per routing group for a [batch, seq_len] input (static).

  The configured `group_size` when it tiles the input (validated for the training shape). Other
  shapes (init, evaluation buckets, one-row scoring) fall back to the largest fitting unit:
  whole rows, as many as both ⌊group_size / seq_len⌋ and `batch` allow (their gcd), or one row.
  """
  if group_size <= 0 or group_size == seq_len:
    return seq_len
  if group_size < seq_len:
    return group_size if seq_len % group_size == 0 else seq_len
  return math.gcd(group_size // seq_len, batch) * seq_len


def check_group_size(batch: int, seq_len: int, group_size: int, data_shards: int = 1,
                     field: str = FIELD) -> None:
  """One-line ValueError naming `field` unless `group_size` tiles [batch, seq_len] into groups
  that each lie on one of `data_shards` data shards (whole rows, groups per batch divisible)."""
  g = group_size
  if not isinstance(g, int) or isinstance(g, bool) or g < 0:
    raise ValueError(f"{field}={g!r} must be an integer >= 0 (0: one batch row)")
  if g == 0:
    return
  if seq_len % g and g % seq_len:
    raise ValueError(f"{field}={g} must divide the sequence length {seq_len} or be a multiple of it "
                     "(a group of whole rows)")
  if g > seq_len and batch % (g // seq_len):
    raise ValueError(f"{field}={g} spans {g // seq_len} rows, which does not divide the batch size {batch}")
  groups = batch * seq_len // g
  if groups % data_shards:
    raise ValueError(f"{field}={g} gives {groups} routing groups per batch, not divisible by the mesh data "
                     f"axis ({data_shards}): a group would cross data shards")


def to_routing_groups(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
  """[B, T, ...] -> [B·T/g, g, ...]: routing groups of g consecutive tokens (row-major).

  g must divide T (pieces of a row) or be a multiple of T dividing B·T (whole rows), so a group
  never holds part of a row together with part of another.
  """
  b, t = x.shape[:2]
  if (t % group_size and group_size % t) or (b * t) % group_size:
    raise ValueError(f"routing group size {group_size} must divide the sequence length {t}, or be a "
                     f"multiple of it dividing the {b}·{t} tokens of the batch")
  return x.reshape((b * t // group_size, group_size) + x.shape[2:])


def from_routing_groups(x: jnp.ndarray, seq_len: int) -> jnp.ndarray:
  """Inverse of `to_routing_groups`: [B·T/g, g, ...] -> [B, T, ...]."""
  n, g = x.shape[:2]
  return x.reshape((n * g // seq_len, seq_len) + x.shape[2:])


def default_gsize(group_size: int, target_density: float) -> int:
  """A Gsize ∝ P·S (LtS §2.2): a quarter of the expected routed tokens per group, at least 1."""
  return max(1, math.ceil(target_density * group_size / 4))


def row_gsize(gsize: int, seq_len: int, group_tokens: int) -> int:
  """Chunk size of the per-row (attention) dispatch of a layer routed over groups of
  `group_tokens`: a row's share of a group chunk, ⌈gsize·T / S_group⌉, within [1, T]."""
  return int(min(seq_len, max(1, math.ceil(gsize * seq_len / group_tokens))))


def capacity_slots(group_size: int, target_density: float, capacity_factor: float) -> int:
  """Slots per group for `capacity` dispatch: C = ceil(capacity_factor·P·S), within [1, S]."""
  c = math.ceil(capacity_factor * target_density * group_size - 1e-9)
  return int(min(max(c, 1), group_size))


def expected_grouped_fraction(num_groups: int, group_tokens: int, gsize: int, target_density: float) -> float:
  """E[compute_fraction] of `grouped` when every token is routed independently with probability P.

  Chunk k runs (for every group at once) iff some group has more than k·gsize routed tokens;
  chunk 0 always runs. With n_g ~ Binomial(S, P) i.i.d. over the G groups:
  E[#chunks] = 1 + Σ_{k ≥ 1} (1 − F(k·gsize)^G), F the binomial CDF; fraction = #chunks·gsize/S.
  """
  from scipy import stats  # (a jax dependency; imported here so `import skipjax` stays light)
  gsize = min(gsize, group_tokens)
  n_chunks = -(-group_tokens // gsize)
  k = np.arange(1, n_chunks)
  cdf = stats.binom.cdf(k * gsize, group_tokens, target_density)
  chunks = 1.0 + float(np.sum(1.0 - cdf ** num_groups))
  return chunks * gsize / group_tokens


class RoutingGroups(NamedTuple):
  """What a configuration's routing groups are (`effective_groups`)."""
  groups_per_batch: int       # G, routing groups in one global batch
  tokens_per_group: int       # S_group
  rows_per_group: float       # S_group / T (< 1: pieces of a row)
  gsize: int                  # `grouped` chunk within a group (clamped to S_group)
  chunks_per_group: int       # ⌈S_group / gsize⌉
  capacity_slots: int         # `capacity` C = ⌈capacity_factor·P·S_group⌉
  row_gsize: int              # `grouped` chunk of the per-row (attention) dispatch at layer granularity
  compute_fraction: float     # expected pointwise (FFN) token slots computed / tokens at P
  row_compute_fraction: float  # the same for the per-row attention queries (layer / block granularity)


def effective_groups(batch_size: int, seq_len: int, *, group_size: int = 0, gsize: Optional[int] = None,
                     target_density: float = 1.0, capacity_factor: float = 1.25, method: str = "grouped",
                     data_shards: int = 1) -> RoutingGroups:
  """The routing groups of a [batch_size, seq_len] batch and their expected cost at P.

  Args mirror `config.data.{batch_size, seq_len}` and `config.model.skip.{group_size, gsize,
  target_density, capacity_factor, dispatch}`; `data_shards` is the mesh's data axis. Expected
  compute fractions assume each token routed independently with probability P (`masked`: 1;
  `capacity`: C/S, its static cost; `grouped`: `expected_grouped_fraction`). Capacity at layer
  granularity with whole-row groups sizes the FFN from the per-row attention slots (k·⌈cf·P·T⌉,
  `dispatch_layer`), which this report does not distinguish.
  """
  check_group_size(batch_size, seq_len, group_size, data_shards)
  s = fit_group_size(batch_size, seq_len, group_size)
  groups = batch_size * seq_len // s
  gsize = min(gsize or default_gsize(s, target_density), s)
  rgsize = row_gsize(gsize, seq_len, s)
  c = capacity_slots(s, target_density, capacity_factor)
  if method == "masked":
    fraction = row_fraction = 1.0
  elif method == "capacity":
    fraction, row_fraction = c / s, capacity_slots(seq_len, target_density, capacity_factor) / seq_len
  elif method == "grouped":
    fraction = expected_grouped_fraction(groups, s, gsize, target_density)
    row_fraction = expected_grouped_fraction(batch_size, seq_len, rgsize, target_density)
  else:
    raise ValueError(f"unknown dispatch method {method!r}")
  return RoutingGroups(groups, s, s / seq_len, gsize, -(-s // gsize), c, rgsize, fraction, row_fraction)
