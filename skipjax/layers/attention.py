"""Multi-head causal self-attention with query subsets and a KV cache.

Queries may be any subset of positions (their original positions are passed in), keys/values
are all tokens, and the causal mask compares original positions: this is what SkipLayer needs
(LtS Alg. 1: K/V for every token, Q only for routed tokens).
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

_kernel_init = nn.initializers.normal(stddev=0.02)


def causal_mask(q_positions: jnp.ndarray, kv_positions: jnp.ndarray,
                kv_valid: Optional[jnp.ndarray] = None, causal: bool = True) -> jnp.ndarray:
  """[B, 1, Tq, Tk] boolean: key j is visible to query i iff pos(j) <= pos(i) (and j is valid).

  With `causal=False` (encoders: BERT, ViT) only validity applies.
  """
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if not causal:
    mask = jnp.ones_like(mask)
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, :].astype(bool)
  return mask[:, None]


def dot_product_attention(q, k, v, mask) -> jnp.ndarray:
  """softmax(q k^T / sqrt(d_h) + mask) v, softmax in fp32. q [B,Tq,H,D], k/v [B,Tk,H,D]."""
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  # Heads-major [B,H,T,D] operands: XLA:CPU runs the batched matmuls ~3× faster this way than
  # with the head axis in the middle (benchmarks/profile.py); on TPU/GPU layout assignment is free.
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


class MultiHeadAttention(nn.Module):
  """Self-attention split into `project_kv` and `attend` so callers can route queries."""
  features: int
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  def setup(self):
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, self.head_dim), use_bias=self.use_bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", "heads", "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")))
    self.query, self.key, self.value = proj("query"), proj("key"), proj("value")
    self.out = nn.DenseGeneral(
        self.features, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype, name="out",
        kernel_init=nn.with_logical_partitioning(_kernel_init, ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))

  def project_kv(self, x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    return self.key(x), self.value(x)

  def attend(self, x_q, q_positions, k, v, kv_positions, kv_valid=None) -> jnp.ndarray:
    """Queries from `x_q` [B,Tq,d] at `q_positions` [B,Tq] attend to k/v at `kv_positions`."""
    mask = causal_mask(q_positions, kv_positions, kv_valid, self.causal)
    return self.out(dot_product_attention(self.query(x_q), k, v, mask))

  def __call__(self, x, positions, kv_valid=None, query_index=None) -> jnp.ndarray:
    """Full causal self-attention; with `query_index` [B,Tq] only those rows are computed."""
    k, v = self.project_kv(x)
    if query_index is None:
      return self.attend(x, positions, k, v, positions, kv_valid)
    x_q = jnp.take_along_axis(x, query_index[..., None], axis=1)
    q_pos = jnp.take_along_axis(positions, query_index, axis=1)
    return self.attend(x_q, q_pos, k, v, positions, kv_valid)

  @nn.compact
  def decode_step(self, x: jnp.ndarray, index: jnp.ndarray, attend: bool = True):
    """One token per step with a KV cache (`cache` collection of length max_len).

    Writes K/V of `x` [B,1,d] at slot `index`, then (if `attend`) attends to slots <= index.
    The cache variables are created on the first (init) call from the full-length `x`.
    """
    k, v = self.project_kv(x)
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if not initialized:  # init call with the full-length input: plain causal attention.
      pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      return self.attend(x, pos, k, v, pos)
    cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k.astype(cached_k.value.dtype), index, 1)
    cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v.astype(cached_v.value.dtype), index, 1)
    if not attend:
      return None
    return self.attend_cached(x, index)

  def attend_cached(self, x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """Query `x` [B,1,d] at slot `index` attends to cache slots <= index (no cache write)."""
    k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    batch, max_len = k.shape[:2]
    kv_pos = jnp.broadcast_to(jnp.arange(max_len), (batch, max_len))
    q_pos = jnp.full((batch, 1), index)
    return self.attend(x, q_pos, k, v, kv_pos)
