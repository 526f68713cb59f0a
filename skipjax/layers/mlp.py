"""Position-wise feed-forward block with a registry of activations."""
from typing import Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

_kernel_init = nn.initializers.normal(stddev=0.02)


def fliprelu(x: jnp.ndarray, layer_index: Union[int, jnp.ndarray]) -> jnp.ndarray:
  """Dong et al. 2023 §2.1: ReLU(x) on even layers k, -ReLU(-x) on odd ones."""
  return jnp.where(jnp.asarray(layer_index) % 2 == 0, nn.relu(x), -nn.relu(-x))


def splitrelu(x: jnp.ndarray, layer_index=None) -> jnp.ndarray:
  """Dong et al. 2023 §2.1: [ReLU(x_{1:D/2}), -ReLU(-x_{D/2+1:D})]."""
  del layer_index
  half = x.shape[-1] // 2
  return jnp.concatenate([nn.relu(x[..., :half]), -nn.relu(-x[..., half:])], axis=-1)


def _pointwise(fn: Callable) -> Callable:
  return lambda x, layer_index=None: fn(x)


# Every activation takes (x, layer_index); only FlipReLU uses the layer index.
ACTIVATIONS = {
    "relu": _pointwise(nn.relu),
    "gelu": _pointwise(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": _pointwise(lambda x: jax.nn.gelu(x, approximate=True)),
    "silu": _pointwise(nn.silu),
    "fliprelu": fliprelu,
    "splitrelu": splitrelu,
}


def get_activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MLP(nn.Module):
  """FFN(x) = W_o act(W_i x + b_i) + b_o; gated (Shazeer 2020 Eq. 5/6, SwiGLU with silu, GeGLU
  with gelu): FFN(x) = W_o (act(W_g x) ⊙ W_i x), the gate projection `gate`."""
  features: int
  hidden: int
  activation: str = "gelu"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  gated: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, layer_index=0) -> jnp.ndarray:
    dense = lambda n, axes, name: nn.Dense(
        n, use_bias=self.use_bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
    act = get_activation(self.activation)
    if self.gated:
      h = act(dense(self.hidden, ("embed", "mlp"), "gate")(x), layer_index)
      h = h * dense(self.hidden, ("embed", "mlp"), "wi")(x)  # [B, T, hidden]
    else:
      h = act(dense(self.hidden, ("embed", "mlp"), "wi")(x), layer_index)
    # Sown so activation-sparsity statistics can be read without changing signatures.
    self.sow("activations", "ffn_hidden", h)
    return dense(self.features, ("mlp", "embed"), "wo")(h)


def make_ffn(config, dtype=jnp.float32, name=None) -> MLP:
  """The FFN of a model config (fields d_model, d_ff, activation, mlp_gated, mlp_bias/use_bias)."""
  bias = getattr(config, "mlp_bias", None)
  return MLP(config.d_model, config.d_ff, config.activation,
             config.use_bias if bias is None else bias, dtype, getattr(config, "mlp_gated", False), name=name)
