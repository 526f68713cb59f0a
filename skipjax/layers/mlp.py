"""Position-wise feed-forward block (FF1, activation, FF2) with a registry of activations.

Structured FF sparsity (Dong et al. 2023, "SS"): FlipReLU / SplitReLU (§2.1), FF weights tied
across layers (§3.1: `TiedKernels` + per-layer `TiedDense` biases) and the block-sparsity regulariser (Eq. 3,
`block_sparsity_penalty`, sown as an aux loss). `make_ffn` builds the FFN of a model config.
"""
from typing import Callable, Dict, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

_kernel_init = nn.initializers.normal(stddev=0.02)

# Name of the sown regulariser (collection `aux_loss`) and of the sown hidden activation a.
BLOCK_SPARSITY_LOSS = "ffn_block_sparsity"
HIDDEN = "ffn_hidden"


def fliprelu(x: jnp.ndarray, layer_index: Union[int, jnp.ndarray]) -> jnp.ndarray:
  """SS §2.1: FlipReLU^k(x) = ReLU(x) if layer k is even, −ReLU(−x) if k is odd.

  The paper numbers layers from 1 (a_{1:K}, "layers 1 to 6"), so k = layer_index + 1 for the
  0-based `layer_index` (the parameter slot): the first layer (k = 1) is −ReLU(−x).
  """
  k = jnp.asarray(layer_index) + 1
  return jnp.where(k % 2 == 0, nn.relu(x), -nn.relu(-x))


def splitrelu(x: jnp.ndarray, layer_index=None) -> jnp.ndarray:
  """SS §2.1: SplitReLU(x) = [ReLU(x_{1:D/2}), −ReLU(−x_{D/2+1:D})] over the last axis (D odd: the
  first ⌊D/2⌋ entries get ReLU)."""
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


def block_norms(a: jnp.ndarray, block_size: int, exempt: int = 0) -> jnp.ndarray:
  """‖𝓑(a, B)_{i,j}‖₂ (SS §3.2): a [..., F·D] without its first `exempt` neurons, cut into
  contiguous blocks of `block_size` neurons → [..., (F·D − E)/B] (float32).

  The norm of an all-zero block has gradient 0 (a subgradient of ‖·‖₂ at 0), not NaN.
  """
  width = a.shape[-1] - exempt
  if exempt < 0 or width <= 0 or width % block_size:
    raise ValueError(f"block_size={block_size} does not tile the {a.shape[-1]} FF neurons after the first "
                     f"exempt={exempt} (config.model.ffn.block_size / exempt)")
  blocks = a[..., exempt:].astype(jnp.float32).reshape(a.shape[:-1] + (width // block_size, block_size))
  sq = jnp.sum(jnp.square(blocks), axis=-1)             # [..., n_blocks]
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def block_sparsity_penalty(a: jnp.ndarray, block_size: int, exempt: int = 0,
                           token_mask: Optional[jnp.ndarray] = None,
                           num_sequences: Optional[int] = None) -> jnp.ndarray:
  """SS Eq. 3 for one layer k, without λ: B/(F·D) · Σ_{i,j} ‖𝓑(a_k, B)_{i,j}‖₂.

  a [batch, S, F·D]: i runs over the S tokens of a sequence, j over its blocks of B neurons; the
  first E = `exempt` neurons form their own, unregularised block (SS §3.2), the normaliser stays
  B/(F·D). The value is the per-sequence sum averaged over the batch (as the LM loss is a batch
  mean); `token_mask` [batch, S] (1: the token ran this FFN) leaves out padding / unrouted slots.
  Under routing a's rows are routing groups: `num_sequences` is then the batch size they cover.
  """
  per_token = jnp.sum(block_norms(a, block_size, exempt), axis=-1)  # [batch, S]
  if token_mask is not None:
    per_token = per_token * token_mask.astype(per_token.dtype)
  batch = a.shape[0] if num_sequences is None else num_sequences
  return block_size / a.shape[-1] * jnp.sum(per_token) / batch


class _Kernel(nn.Module):
  """A lone `kernel` param (so tied kernels sit at `<name>/kernel`, as in an untied Dense)."""
  shape: tuple
  axes: tuple

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    return self.param("kernel", nn.with_logical_partitioning(_kernel_init, self.axes), self.shape, jnp.float32)


class TiedDense(nn.Module):
  """y = x·W + b where the kernel W is given (tied across layers, SS §3.1) and the bias b is this
  layer's own ("Bias terms are not tied"); params: `bias` only, as an untied Dense's bias."""
  features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  bias_axes: tuple = ("mlp",)

  @nn.compact
  def __call__(self, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    bias = None
    if self.use_bias:
      init = nn.with_logical_partitioning(nn.initializers.zeros_init(), self.bias_axes)
      bias = self.param("bias", init, (self.features,), jnp.float32)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.dot(x, kernel)  # [..., features]
    return y if bias is None else y + bias


class TiedKernels(nn.Module):
  """SS §3.1 FF weight tying: the one FF1 kernel W₁ [D, F·D] (and gate kernel, when gated) and the
  one FF2 kernel W₂ [F·D, D] that every layer's `MLP` uses; biases are not tied (they stay in each
  layer's MLP). Returns {'wi', 'wo'[, 'gate']} for `MLP.kernels`."""
  features: int
  hidden: int
  gated: bool = False

  @nn.compact
  def __call__(self) -> Dict[str, jnp.ndarray]:
    d, f = self.features, self.hidden
    specs = {"wi": ((d, f), ("embed", "mlp")), "wo": ((f, d), ("mlp", "embed"))}
    if self.gated:
      specs["gate"] = ((d, f), ("embed", "mlp"))
    return {name: _Kernel(shape, axes, name=name)() for name, (shape, axes) in sorted(specs.items())}


class MLP(nn.Module):
  """FFN(x) = W_o act(W_i x + b_i) + b_o (SS Eq. 1/2); gated (Shazeer 2020 Eq. 5/6, SwiGLU with
  silu, GeGLU with gelu): FFN(x) = W_o (act(W_g x) ⊙ W_i x), the gate projection `gate`.

  `kernels` (SS §3.1): the tied kernels of `TiedKernels`; this layer then holds only its biases.
  `block_sparsity_weight` λ > 0: sows λ·`block_sparsity_penalty`(a) (SS Eq. 3; blocks of
  `block_size` neurons, the first `exempt` exempt) as `aux_loss/ffn_block_sparsity`, where a is
  the hidden activation (also sown as `activations/ffn_hidden`).
  """
  features: int
  hidden: int
  activation: str = "gelu"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  gated: bool = False
  block_sparsity_weight: float = 0.0
  block_size: int = 64
  exempt: int = 0
  kernels: Optional[Mapping[str, jnp.ndarray]] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, layer_index=0, token_mask: Optional[jnp.ndarray] = None,
               num_sequences: Optional[int] = None) -> jnp.ndarray:
    """x [B, T, d] → [B, T, d]. For the regulariser: `token_mask` [B, T] the tokens it counts (None:
    all), `num_sequences` the sequences x's rows come from (None: B; see block_sparsity_penalty)."""

    def dense(n, axes, name):
      if self.kernels is None:
        return nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, name=name,
                        kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
      tied = TiedDense(n, self.use_bias, self.dtype, axes[1:], name=name)
      return lambda h: tied(h, self.kernels[name])

    act = get_activation(self.activation)
    if self.gated:
      h = act(dense(self.hidden, ("embed", "mlp"), "gate")(x), layer_index)
      h = h * dense(self.hidden, ("embed", "mlp"), "wi")(x)  # [B, T, hidden]
    else:
      h = act(dense(self.hidden, ("embed", "mlp"), "wi")(x), layer_index)
    # Sown so activation-sparsity statistics can be read without changing signatures.
    self.sow("activations", HIDDEN, h)
    if self.block_sparsity_weight > 0 and self.is_mutable_collection("aux_loss"):
      penalty = block_sparsity_penalty(h, self.block_size, self.exempt, token_mask, num_sequences)
      self.sow("aux_loss", BLOCK_SPARSITY_LOSS, self.block_sparsity_weight * penalty)
    return dense(self.features, ("mlp", "embed"), "wo")(h)


def make_ffn(config, dtype=jnp.float32, name=None, kernels: Optional[Mapping[str, jnp.ndarray]] = None) -> MLP:
  """The FFN of a model config: width `d_ff` (= F·d_model when `ffn.expansion` F is set, resolved
  by the config), `activation`, `mlp_gated`, `mlp_bias` / `use_bias`, and the `ffn` sub-config
  (regulariser λ, B, E; `kernels` from `TiedKernels` when `ffn.tied`)."""
  bias = getattr(config, "mlp_bias", None)
  ffn = getattr(config, "ffn", None)
  if ffn is not None and ffn.tied and kernels is None:
    raise ValueError("config.model.ffn.tied=True: the FFN needs the shared kernels (TiedKernels) from its stack")
  extra = {} if ffn is None else dict(block_sparsity_weight=ffn.block_sparsity_weight, block_size=ffn.block_size,
                                      exempt=ffn.exempt)
  return MLP(config.d_model, config.d_ff, config.activation, config.use_bias if bias is None else bias, dtype,
             getattr(config, "mlp_gated", False), kernels=kernels, name=name, **extra)
