"""The block-sparse FFN path (skipjax/layers/block_sparse.py) against the dense MLP and a numpy
reference with the inactive blocks' activations zeroed."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax.layers import block_sparse
from skipjax.layers.mlp import MLP

D, F, B = 8, 24, 4  # 6 blocks

_erf = np.vectorize(math.erf)
NP_ACT = {
    "relu": lambda z, layer: np.maximum(z, 0),
    "gelu": lambda z, layer: 0.5 * z * (1 + _erf(z / np.sqrt(2))),
    "silu": lambda z, layer: z / (1 + np.exp(-z)),
    # SS §2.1 numbers layers from 1: layer_index 0 is layer k = 1 (odd) → −ReLU(−z)
    "fliprelu": lambda z, layer: np.maximum(z, 0) if (layer + 1) % 2 == 0 else np.minimum(z, 0),
    "splitrelu": lambda z, layer: np.concatenate([np.maximum(z[..., :F // 2], 0), np.minimum(z[..., F // 2:], 0)], -1),
}


def _mlp(activation, gated, bias, seed=0):
  mlp = MLP(D, F, activation, use_bias=bias, gated=gated)
  params = nn.meta.unbox(mlp.init(jax.random.key(seed), jnp.zeros((1, 1, D)))["params"])
  # non-zero biases, so that a dropped bias would show
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape), params)
  params = jax.tree.map(lambda p: p * 10.0, params)  # O(1) pre-activations
  return mlp, params


def _numpy_masked(params, x, keep, activation, gated, layer):
  """Dense FFN in numpy with the activations of neurons outside the kept blocks zeroed.
  x [G, S, D], keep [G, nb] bool."""
  p = jax.tree.map(np.asarray, params)
  lin = lambda name: x @ p[name]["kernel"] + (p[name]["bias"] if "bias" in p[name] else 0)
  a = NP_ACT[activation](lin("gate"), layer) * lin("wi") if gated else NP_ACT[activation](lin("wi"), layer)
  mask = np.repeat(keep, B, axis=-1)[:, None, :]  # [G, 1, F]
  return (a * mask) @ p["wo"]["kernel"] + (p["wo"]["bias"] if "bias" in p["wo"] else 0)


CASES = [("relu", False, True, 0), ("silu", True, False, 0), ("gelu", True, True, 0), ("fliprelu", False, True, 0),
         ("fliprelu", False, True, 1), ("splitrelu", False, True, 0), ("splitrelu", True, False, 0)]


@pytest.mark.parametrize("activation,gated,bias,layer", CASES)
def test_block_sparse_equals_dense_and_masked_dense(activation, gated, bias, layer):
  """All blocks kept: the dense MLP. k of 6 blocks kept per group: the dense FFN (numpy) with the
  other blocks' activations zeroed."""
  mlp, params = _mlp(activation, gated, bias, seed=4)
  groups, nb = 5, F // B
  x = jax.random.normal(jax.random.key(5), (groups, 3, D))  # 5 groups of 3 tokens
  x64 = np.asarray(x, np.float64)
  run = jax.jit(lambda x, blocks: block_sparse.mlp_block_sparse(mlp, params, x, blocks, B, layer))
  dense = mlp.apply({"params": params}, x, layer)
  np.testing.assert_allclose(np.asarray(run(x, jnp.tile(jnp.arange(nb), (groups, 1)))), np.asarray(dense),
                             rtol=2e-5, atol=2e-5)
  # the numpy reference agrees with the dense module (checks the reference itself)
  np.testing.assert_allclose(np.asarray(dense), _numpy_masked(params, x64, np.ones((groups, nb), bool), activation,
                                                              gated, layer), rtol=2e-4, atol=2e-4)
  rng = np.random.default_rng(0)
  blocks = np.stack([np.sort(rng.choice(nb, 2, replace=False)) for _ in range(groups)])  # [G, k]
  keep = np.zeros((groups, nb), bool)
  np.put_along_axis(keep, blocks, True, axis=1)
  ref = _numpy_masked(params, x64, keep, activation, gated, layer)
  np.testing.assert_allclose(np.asarray(run(x, jnp.asarray(blocks))), ref, rtol=2e-4, atol=2e-4)
  # a different choice gives a different output (the blocks really are selected)
  assert np.abs(np.asarray(run(x, jnp.asarray((blocks + 1) % nb))) - ref).max() > 1e-3


def test_per_token_groups_under_jit():
  """One token per group (decoding): [T, 1, D] with per-token blocks, jitted."""
  mlp, params = _mlp("relu", False, True, seed=7)
  x = jax.random.normal(jax.random.key(8), (6, 1, D))
  w = block_sparse.pack_blocks(params, B)
  blocks = block_sparse.oracle_blocks(mlp, params, x, B, 3)  # [6, 3]
  out = jax.jit(lambda w, x, b: block_sparse.block_sparse_ffn(w, x, b, "relu"))(w, x, blocks)
  keep = np.zeros((6, F // B), bool)
  np.put_along_axis(keep, np.asarray(blocks), True, axis=1)
  ref = _numpy_masked(params, np.asarray(x, np.float64), keep, "relu", False, 0)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4)


def test_top_k_blocks_by_hand():
  scores = jnp.array([[5.0, 0.0, 1.0, 2.0], [0.0, 3.0, 2.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(block_sparse.top_k_blocks(scores, 2)), [[0, 3], [1, 2]])


def test_pack_blocks_rejects_a_block_size_that_does_not_divide_d_ff():
  _, params = _mlp("relu", False, True)
  with pytest.raises(ValueError, match="block_size=5 does not divide the FFN width d_ff=24"):
    block_sparse.pack_blocks(params, 5)
