"""Token embeddings and learned / sinusoidal position embeddings."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_embed_init = nn.initializers.normal(stddev=0.02)


def token_embedding(vocab_size: int, features: int, dtype=jnp.float32, name=None) -> nn.Embed:
  return nn.Embed(
      vocab_size, features, dtype=dtype,
      embedding_init=nn.with_logical_partitioning(_embed_init, ("vocab", "embed")), name=name)


class LearnedPositions(nn.Module):
  """Learned absolute positions; table row `position + offset` (OPT uses offset 2)."""
  max_len: int
  features: int
  offset: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
    table = self.param(
        "embedding", nn.with_logical_partitioning(_embed_init, (None, "embed")),
        (self.max_len + self.offset, self.features), jnp.float32)
    return jnp.take(table, positions + self.offset, axis=0).astype(self.dtype)


def sinusoidal_table(max_len: int, features: int) -> np.ndarray:
  """Vaswani et al. 2017 §3.5: PE(p, 2i) = sin(p / 10000^{2i/d}), PE(p, 2i+1) = cos(...)."""
  pos = np.arange(max_len)[:, None]
  inv = np.exp(-np.log(10000.0) * np.arange(0, features, 2) / features)
  table = np.zeros((max_len, features), np.float32)
  table[:, 0::2] = np.sin(pos * inv)
  table[:, 1::2] = np.cos(pos * inv)[:, : features // 2]
  return table


class SinusoidalPositions(nn.Module):
  """Fixed sinusoidal positions (no parameters)."""
  max_len: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
    table = jnp.asarray(sinusoidal_table(self.max_len, self.features))
    return jnp.take(table, positions, axis=0).astype(self.dtype)
