"""Multi-head causal self-attention with query subsets and a KV cache.

Queries may be any subset of positions (their original positions are passed in), keys/values
are all tokens, and the causal mask compares original positions: this is what SkipLayer needs
(LtS Alg. 1: K/V for every token, Q only for routed tokens). Rotary positions (RoPE) are applied
from those original positions too: queries at their own positions, keys at theirs (in decoding,
at the cache slot they are written to), so gathered queries and the KV cache stay correct.
Grouped-query attention (Ainslie et al. 2023): `num_kv_heads` K/V heads, each shared by
num_heads / num_kv_heads query heads; the KV cache stores only the K/V heads.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipjax.layers.embeddings import rotary_embedding

_kernel_init = nn.initializers.normal(stddev=0.02)


def causal_mask(q_positions: jnp.ndarray, kv_positions: jnp.ndarray,
                kv_valid: Optional[jnp.ndarray] = None, causal: bool = True,
                window: int = 0) -> jnp.ndarray:
  """[B, 1, Tq, Tk] boolean: key j is visible to query i iff pos(j) <= pos(i) (and j is valid).

  With `causal=False` (encoders: BERT, ViT) only validity applies. `window` > 0 is a sliding
  window (Mistral, Jiang et al. 2023 §2): also pos(i) − pos(j) < window.
  """
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if not causal:
    mask = jnp.ones_like(mask)
  if window:
    mask = mask & (q_positions[:, :, None] - kv_positions[:, None, :] < window)
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, :].astype(bool)
  return mask[:, None]


def dot_product_attention(q, k, v, mask) -> jnp.ndarray:
  """softmax(q k^T / sqrt(d_h) + mask) v, softmax in fp32. q [B,Tq,H,D], k/v [B,Tk,Hkv,D].

  With Hkv < H (grouped-query attention) query head h attends with K/V head h // (H / Hkv).
  """
  b, tq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  q = q / jnp.sqrt(d).astype(q.dtype)
  # Heads-major [B,H,T,D] operands: XLA:CPU runs the batched matmuls ~3× faster this way than
  # with the head axis in the middle (benchmarks/profile.py); on TPU/GPU layout assignment is free.
  # The g query heads of a K/V head are folded into its query length: [B, Hkv, g·Tq, D].
  q = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * tq, d)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, Tk, D]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  logits = logits.reshape(b, hkv, g, tq, -1)  # [B, Hkv, g, Tq, Tk]
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, hkv, g * tq, -1)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)  # [B, Hkv, g·Tq, D]
  return out.reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)


def _slots(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """[B, T] cache slots (= positions) index … index+T−1 of the tokens of `x` [B, T, d]."""
  return jnp.broadcast_to(index + jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


class MultiHeadAttention(nn.Module):
  """Self-attention split into `project_kv` and `attend` so callers can route queries.

  `num_kv_heads` (0: num_heads) K/V heads; `qkv_bias`/`out_bias` (None: `use_bias`) per
  projection (Qwen2: q/k/v bias, no output bias); `rope_theta` > 0 rotates q and k (RoPE);
  `window` > 0 is a causal sliding window.
  """
  features: int
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  causal: bool = True
  num_kv_heads: int = 0
  qkv_bias: Optional[bool] = None
  out_bias: Optional[bool] = None
  rope_theta: float = 0.0
  window: int = 0

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def setup(self):
    qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    # K/V heads get their own logical axis under GQA so the sharding rules can treat them apart.
    kv_axis = "heads" if self.kv_heads == self.num_heads else "kv_heads"
    proj = lambda name, heads, axis: nn.DenseGeneral(
        (heads, self.head_dim), use_bias=qkv_bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", axis, "kv")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis, "kv")))
    self.query = proj("query", self.num_heads, "heads")
    self.key, self.value = proj("key", self.kv_heads, kv_axis), proj("value", self.kv_heads, kv_axis)
    self.out = nn.DenseGeneral(
        self.features, axis=(-2, -1), use_bias=out_bias, dtype=self.dtype, name="out",
        kernel_init=nn.with_logical_partitioning(_kernel_init, ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))

  def _rotate(self, x: jnp.ndarray, positions: Optional[jnp.ndarray]) -> jnp.ndarray:
    if not self.rope_theta:
      return x
    if positions is None:
      raise ValueError("rotary attention needs the token positions")
    return rotary_embedding(x, positions, self.rope_theta)

  def project_kv(self, x: jnp.ndarray, positions: Optional[jnp.ndarray] = None
                 ) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """K (rotated at `positions` [B,T] under RoPE) and V of every token: [B, T, Hkv, D] each."""
    return self._rotate(self.key(x), positions), self.value(x)

  def attend(self, x_q, q_positions, k, v, kv_positions, kv_valid=None) -> jnp.ndarray:
    """Queries from `x_q` [B,Tq,d] at `q_positions` [B,Tq] attend to k/v at `kv_positions`."""
    mask = causal_mask(q_positions, kv_positions, kv_valid, self.causal, self.window)
    q = self._rotate(self.query(x_q), q_positions)
    return self.out(dot_product_attention(q, k, v, mask))

  def __call__(self, x, positions, kv_valid=None, query_index=None) -> jnp.ndarray:
    """Full causal self-attention; with `query_index` [B,Tq] only those rows are computed."""
    k, v = self.project_kv(x, positions)
    if query_index is None:
      return self.attend(x, positions, k, v, positions, kv_valid)
    x_q = jnp.take_along_axis(x, query_index[..., None], axis=1)
    q_pos = jnp.take_along_axis(positions, query_index, axis=1)
    return self.attend(x_q, q_pos, k, v, positions, kv_valid)

  @nn.compact
  def decode_step(self, x: jnp.ndarray, index: jnp.ndarray, attend: bool = True, cache: str = "",
                  write_mask: Optional[jnp.ndarray] = None):
    """Tokens at cache slots index … index+T−1 with a KV cache (`cache` collection of length max_len).

    Writes K/V of `x` [B,T,d] (T = 1: one decoding step; T > 1: a chunk, e.g. speculative
    verification) at slots index … index+T−1 ([B,T,Hkv,D]: only the K/V heads are cached), then
    (if `attend`) token t attends to slots <= index + t. The caller keeps index + T <= max_len
    (a slice past the end would be clamped). The cache variables are created on the first
    (init) call from the full-length `x`. `cache`: suffix of the cache variables' names (a
    parameter slot run at several depth positions keeps one cache per position). `write_mask`
    [B,T] (optional): only tokens where it is 1 write their K/V; the other slots keep what the
    cache holds (early exit's `recompute` policy fills missing slots of a chunk).
    """
    initialized = self.has_variable("cache", f"cached_key{cache}")
    if not initialized:  # init call with the full-length input: plain causal attention.
      pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      k, v = self.project_kv(x, pos)
    else:  # under RoPE the key is rotated at the slot (position) it is written to
      k, v = self.project_kv(x, _slots(x, index))
    cached_k = self.variable("cache", f"cached_key{cache}", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", f"cached_value{cache}", jnp.zeros, v.shape, v.dtype)
    if not initialized:
      return self.attend(x, pos, k, v, pos)
    for var, new in ((cached_k, k), (cached_v, v)):
      new = new.astype(var.value.dtype)  # [B, T, Hkv, D]
      if write_mask is not None:
        old = jax.lax.dynamic_slice_in_dim(var.value, index, x.shape[1], 1)
        new = jnp.where(write_mask[:, :, None, None] > 0, new, old)
      var.value = jax.lax.dynamic_update_slice_in_dim(var.value, new, index, 1)
    if not attend:
      return None
    return self.attend_cached(x, index, cache)

  def attend_cached(self, x: jnp.ndarray, index: jnp.ndarray, cache: str = "") -> jnp.ndarray:
    """Queries `x` [B,T,d] at slots index … index+T−1 attend causally to the cache (no cache write)."""
    k, v = self.get_variable("cache", f"cached_key{cache}"), self.get_variable("cache", f"cached_value{cache}")
    batch, max_len = k.shape[:2]
    kv_pos = jnp.broadcast_to(jnp.arange(max_len), (batch, max_len))
    q_pos = _slots(x, index)  # [B, T]
    return self.attend(x, q_pos, k, v, kv_pos)
