"""The gated residual block (DESIGN.md): y = x + m ⊙ R(x) for attention and FFN branches.

The gate `m` comes from `gate()`; the dense model's gate is "always on" (m = None), which
compiles to the plain pre-/post-LN Transformer layer (LtS Eq. 5). Per-block statistics are sown:
  stats/{attn,ffn}_input_norm, stats/{attn,ffn}_residual_norm   ‖x‖₂, ‖R(x)‖₂ per token (fp32)
  gates/...      gate decisions, aux_loss/...   weighted auxiliary losses (summed by training).
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from skipjax.layers import MLP, MultiHeadAttention, layer_norm
from skipjax.models.config import TransformerConfig


def _token_norm(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


class Block(nn.Module):
  """One Transformer layer whose two residual branches go through a gate hook."""
  config: TransformerConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.ln_attn = layer_norm(cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.ln_ffn = layer_norm(cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.heads_dim, cfg.use_bias, dtype, cfg.causal)
    self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.use_bias, dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def gate(self, branch: str, x: jnp.ndarray) -> Optional[jnp.ndarray]:
    """Per-token gate m ∈ {0,1} for `branch` ('attn' | 'ffn'); None means always on."""
    del branch, x
    return None

  def _record(self, branch: str, x: jnp.ndarray, r: jnp.ndarray) -> None:
    if self.is_mutable_collection("stats"):
      self.sow("stats", f"{branch}_input_norm", _token_norm(x))
      self.sow("stats", f"{branch}_residual_norm", _token_norm(r))

  def _residual(self, branch: str, x, r, ln):
    """x + m ⊙ R(x), with LN before (pre-LN: done by the caller) or after (post-LN)."""
    self._record(branch, x, r)
    r = self.dropout(r, deterministic=self.deterministic)
    m = self.gate(branch, x)
    y = x + (r if m is None else m[..., None].astype(r.dtype) * r)
    return ln(y) if self.config.norm == "post" else y

  def _pre(self, ln, x):
    return ln(x) if self.config.norm == "pre" else x

  def __call__(self, x, positions, kv_valid=None, layer_index=0):
    """Full-sequence forward. x [B,T,d], positions [B,T], kv_valid [B,T] or None."""
    a = self.attn(self._pre(self.ln_attn, x), positions, kv_valid)
    x = self._residual("attn", x, a, self.ln_attn)
    f = self.mlp(self._pre(self.ln_ffn, x), layer_index)
    return self._residual("ffn", x, f, self.ln_ffn)

  def decode(self, x, index, layer_index=0):
    """One decoding step with the KV cache: x [B,1,d] at cache slot `index`."""
    a = self.attn.decode_step(self._pre(self.ln_attn, x), index)
    x = self._residual("attn", x, a, self.ln_attn)
    f = self.mlp(self._pre(self.ln_ffn, x), layer_index)
    return self._residual("ffn", x, f, self.ln_ffn)
