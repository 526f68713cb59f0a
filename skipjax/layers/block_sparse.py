"""A block-sparse FFN path: compute only the active blocks of B neurons (SS §3.2, §4).

SS §3.2 cuts an FF layer's F hidden neurons into contiguous blocks of B; §4 proposes to skip the
FF computation (and weight loading) of blocks that are not active. Given, per routing group (one
token, or a group of tokens that share their active set), the indices of k active blocks, this
path gathers those blocks' columns of FF1 (W_i, and W_g of a gated FFN) and rows of FF2 (W_o),
computes them and sums their contributions:

    z = x W_i[:, blocks] + b_i[blocks]              [G, S, k·B]
    a = act(z)   (gated: act(x W_g[:, blocks] + b_g[blocks]) ⊙ z)
    y = Σ_blocks a W_o[blocks, :] + b_o              [G, S, D]

All shapes are static (k fixed). With all blocks kept it equals the dense `MLP`; in general it
equals the dense FFN whose activations outside the kept blocks are zeroed. Work: S·k·B·D per
group and FF matrix instead of S·F·D; weight reads k·B·D per group instead of F·D once.

Activations that depend on the neuron's position (SplitReLU: ReLU on the first F/2 neurons) get
the kept neurons' global indices; FlipReLU gets the layer index as in `MLP`.
"""
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipjax.layers import mlp as mlp_lib


class BlockWeights(NamedTuple):
  """An MLP's weights cut into blocks of B neurons, one row of D weights per neuron (FF1 kernels
  transposed), so gathering k blocks reads contiguous memory and gives a plain [k·B, D] matrix."""
  wi: jnp.ndarray                # [nb, B, D]  W_i[:, block]ᵀ
  wo: jnp.ndarray                # [nb, B, D]  W_o[block, :]
  bi: Optional[jnp.ndarray]      # [nb, B]
  bo: Optional[jnp.ndarray]      # [D]
  gate: Optional[jnp.ndarray]    # [nb, B, D] (gated FFNs)
  bg: Optional[jnp.ndarray]      # [nb, B]
  block_size: int


def pack_blocks(params: Any, block_size: int) -> BlockWeights:
  """`MLP` params ({'wi', 'wo'[, 'gate']} Dense trees) → BlockWeights; F must be a multiple of B."""
  p = nn.meta.unbox(params)
  d_model, d_ff = p["wi"]["kernel"].shape
  if block_size < 1 or d_ff % block_size:
    raise ValueError(f"block_size={block_size} does not divide the FFN width d_ff={d_ff}")
  nb = d_ff // block_size
  cols = lambda k: k.T.reshape(nb, block_size, d_model)  # [D, F] → [nb, B, D]
  bias = lambda name: p[name]["bias"].reshape(nb, block_size) if "bias" in p[name] else None
  gated = "gate" in p
  return BlockWeights(wi=cols(p["wi"]["kernel"]), wo=p["wo"]["kernel"].reshape(nb, block_size, -1),
                      bi=bias("wi"), bo=p["wo"].get("bias"), gate=cols(p["gate"]["kernel"]) if gated else None,
                      bg=bias("gate") if gated else None, block_size=block_size)


def num_blocks(w: BlockWeights) -> int:
  return w.wi.shape[0]


def _activate(name: str, z: jnp.ndarray, neuron: jnp.ndarray, d_ff: int, layer_index) -> jnp.ndarray:
  """act(z) for z [G, S, k·B] whose neurons have global indices `neuron` [G, k·B]."""
  if name == "splitrelu":  # SS §2.1: ReLU on neurons 1..F/2, −ReLU(−·) on the rest
    first = (neuron < d_ff // 2)[:, None]  # [G, 1, k·B]
    return jnp.where(first, nn.relu(z), -nn.relu(-z))
  return mlp_lib.get_activation(name)(z, layer_index)


def block_sparse_ffn(w: BlockWeights, x: jnp.ndarray, blocks: jnp.ndarray, activation: str, gated: bool = False,
                     layer_index=0) -> jnp.ndarray:
  """The FFN on the kept blocks only (module docstring). x [G, S, D] (G routing groups of S
  tokens), blocks [G, k] int (distinct block indices per group) → [G, S, D]."""
  nb, bsz, d_model = w.wi.shape
  groups, k = blocks.shape
  rows = lambda m: m[blocks].reshape(groups, k * bsz, d_model)  # [nb, B, D] → [G, k·B, D]
  vec = lambda b: b[blocks].reshape(groups, 1, k * bsz)         # [nb, B] → [G, 1, k·B]
  neuron = (blocks[..., None] * bsz + jnp.arange(bsz)).reshape(groups, k * bsz)  # global neuron indices
  z = jnp.einsum("gsd,gnd->gsn", x, rows(w.wi))  # [G, S, k·B]
  if w.bi is not None:
    z = z + vec(w.bi)
  if gated:
    g = jnp.einsum("gsd,gnd->gsn", x, rows(w.gate))
    if w.bg is not None:
      g = g + vec(w.bg)
    a = _activate(activation, g, neuron, nb * bsz, layer_index) * z
  else:
    a = _activate(activation, z, neuron, nb * bsz, layer_index)
  y = jnp.einsum("gsn,gnd->gsd", a, rows(w.wo))  # [G, S, D]
  return y + w.bo if w.bo is not None else y


def mlp_block_sparse(mlp: mlp_lib.MLP, params: Any, x: jnp.ndarray, blocks: jnp.ndarray, block_size: int,
                     layer_index=0) -> jnp.ndarray:
  """`block_sparse_ffn` for an `MLP` module and its params (its activation and gating)."""
  return block_sparse_ffn(pack_blocks(params, block_size), x, blocks, mlp.activation, mlp.gated, layer_index)


def top_k_blocks(scores: jnp.ndarray, k: int) -> jnp.ndarray:
  """The k highest-scoring blocks per group, ascending: scores [G, nb] → [G, k] int32."""
  _, idx = jax.lax.top_k(scores, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def oracle_blocks(mlp: mlp_lib.MLP, params: Any, x: jnp.ndarray, block_size: int, k: int, layer_index=0) -> jnp.ndarray:
  """Oracle block choice from the dense activations: per group [G, S, D], the k blocks with the
  largest ‖block‖₂ (SS Eq. 3's block norm) summed over the group's tokens → [G, k] (profiling /
  benchmarks)."""
  _, state = mlp.apply({"params": params}, x, layer_index, mutable=["activations"])
  a = state["activations"][mlp_lib.HIDDEN][0]  # [G, S, F]
  return top_k_blocks(mlp_lib.block_norms(a, block_size).sum(axis=1), k)
