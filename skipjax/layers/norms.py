"""Normalisation layers with logical axis names for sharding."""
import flax.linen as nn
import jax.numpy as jnp

_ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
_zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))


def layer_norm(eps: float = 1e-5, affine: bool = True, dtype=jnp.float32, name=None) -> nn.LayerNorm:
  """LayerNorm over the last axis; `affine=False` is OPT's `layer_norm_elementwise_affine=False`."""
  return nn.LayerNorm(
      epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype,
      scale_init=_ones, bias_init=_zeros, name=name)
