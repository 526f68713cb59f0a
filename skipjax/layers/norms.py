"""Normalisation layers (LayerNorm, RMSNorm) with logical axis names for sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp

_ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
_zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
NORM_TYPES = ("layernorm", "rmsnorm")


def layer_norm(eps: float = 1e-5, affine: bool = True, dtype=jnp.float32, name=None) -> nn.LayerNorm:
  """LayerNorm over the last axis; `affine=False` is OPT's `layer_norm_elementwise_affine=False`."""
  return nn.LayerNorm(
      epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype,
      scale_init=_ones, bias_init=_zeros, name=name)


class RMSNorm(nn.Module):
  """Zhang & Sennrich 2019 Eq. 4: y = g ⊙ x / sqrt(mean(x²) + eps), the RMS taken in float32.

  As Llama/Qwen2: normalise in fp32, cast back to the activation dtype, then scale by g.
  """
  eps: float = 1e-6
  affine: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)  # [..., d]
    h = h.astype(self.dtype)
    if self.affine:
      h = h * self.param("scale", _ones, (x.shape[-1],), jnp.float32).astype(self.dtype)
    return h


def make_norm(kind: str = "layernorm", eps: float = 1e-5, affine: bool = True, dtype=jnp.float32,
              name=None) -> nn.Module:
  """The normalisation layer `kind` (`layernorm` | `rmsnorm`); params `scale` (and LN `bias`)."""
  if kind == "rmsnorm":
    return RMSNorm(eps, affine, dtype, name=name)
  if kind != "layernorm":
    raise ValueError(f"unknown norm type {kind!r}; known: {list(NORM_TYPES)}")
  return layer_norm(eps, affine, dtype, name)
