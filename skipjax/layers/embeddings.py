"""Token embeddings; learned (resizable), sinusoidal and rotary position embeddings."""
import flax.linen as nn
import jax
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


def rotary_embedding(x: jnp.ndarray, positions: jnp.ndarray, theta: float = 10000.0) -> jnp.ndarray:
  """RoFormer (Su et al. 2021) Eq. 34 in the rotate-half layout of GPT-NeoX / HF Llama.

  x [B, T, H, D] at original token positions [B, T]: feature pairs (i, i + D/2) are rotated by
  the angle pos · theta^(−2i/D). The angles are computed in float32.
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys (1981) cubic convolution kernel with a = −0.75 (as PyTorch's bicubic)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of 1-D bicubic resampling with half-pixel centres (align_corners=False)
  and edge replication, i.e. `torch.nn.functional.interpolate(mode='bicubic')` along one axis."""
  scale = in_size / out_size
  src = scale * (np.arange(out_size) + 0.5) - 0.5  # [out]
  base = np.floor(src)
  weights = np.zeros((out_size, in_size), np.float64)
  for tap in range(-1, 3):
    w = _cubic(src - (base + tap))
    idx = np.clip(base + tap, 0, in_size - 1).astype(int)
    np.add.at(weights, (np.arange(out_size), idx), w)
  return weights.astype(np.float32)


def resize_position_grid(table: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Position embeddings of a square patch grid [g·g, d] bicubically resized to [h·w, d]
  (DINOv2 / ViT at another image size, Dosovitskiy et al. 2021 §3.2); interpolated in fp32."""
  g = int(round(table.shape[0] ** 0.5))
  if (g, g) == (height, width):
    return table
  grid = table.astype(jnp.float32).reshape(g, g, -1)
  rows, cols = jnp.asarray(bicubic_matrix(g, height)), jnp.asarray(bicubic_matrix(g, width))
  out = jnp.einsum("hi,ijd,wj->hwd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)  # [h, w, d]
  return out.reshape(height * width, -1).astype(table.dtype)
