"""Layers against independent references: numpy attention, the paper's activations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax.layers import MLP, MultiHeadAttention, get_activation
from skipjax.layers.embeddings import sinusoidal_table


def _numpy_causal_attention(x, p, num_heads):
  """Plain numpy multi-head causal self-attention (the reference)."""
  b, t, d = x.shape
  proj = lambda name: np.einsum("btd,dhk->bthk", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.fixture(scope="module")
def attention():
  attn = MultiHeadAttention(features=16, num_heads=4, head_dim=8)
  x = jax.random.normal(jax.random.key(0), (3, 10, 16))
  pos = jnp.broadcast_to(jnp.arange(10), (3, 10))
  params = nn.meta.unbox(attn.init(jax.random.key(1), x, pos)["params"])
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  return attn, params, x, pos


def test_attention_matches_numpy_reference(attention):
  attn, params, x, pos = attention
  out = attn.apply({"params": params}, x, pos)
  ref = _numpy_causal_attention(np.asarray(x), jax.tree.map(np.asarray, params), 4)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_query_subset_equals_full_attention_rows(attention):
  attn, params, x, pos = attention
  full = attn.apply({"params": params}, x, pos)
  # A different, unsorted subset per sequence, including the first and last positions.
  index = jnp.array([[0, 3, 9], [7, 2, 5], [9, 8, 1]])
  sub = attn.apply({"params": params}, x, pos, query_index=index)
  np.testing.assert_allclose(sub, jnp.take_along_axis(full, index[..., None], axis=1), atol=1e-6)


def test_kv_valid_masks_keys(attention):
  attn, params, x, pos = attention
  valid = jnp.ones((3, 10), bool).at[:, :4].set(False)  # left padding of 4
  masked = attn.apply({"params": params}, x, pos, kv_valid=valid)
  shifted = attn.apply({"params": params}, x[:, 4:], pos[:, 4:] - 4)
  np.testing.assert_allclose(masked[:, 4:], shifted, atol=1e-5)


def test_splitrelu_and_fliprelu_follow_dong2023():
  x = jnp.array([[-2.0, -1.0, 1.0, 2.0]])
  np.testing.assert_array_equal(get_activation("splitrelu")(x), [[0.0, 0.0, 0.0, 0.0]])
  y = jnp.array([[1.0, -1.0, -3.0, 3.0]])
  np.testing.assert_array_equal(get_activation("splitrelu")(y), [[1.0, 0.0, -3.0, 0.0]])
  flip = get_activation("fliprelu")
  # SS numbers layers k = 1..K: the first layer (index 0, k = 1) is odd, −ReLU(−x).
  np.testing.assert_array_equal(flip(y, 0), [[0.0, -1.0, -3.0, 0.0]])
  np.testing.assert_array_equal(flip(y, 1), [[1.0, 0.0, 0.0, 3.0]])
  np.testing.assert_array_equal(flip(y, jnp.int32(3)), flip(y, 1))


def test_unknown_activation_is_an_error():
  with pytest.raises(ValueError, match="unknown activation 'swishh'"):
    get_activation("swishh")


def test_mlp_sows_hidden_activations():
  mlp = MLP(features=8, hidden=32, activation="relu")
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  variables = mlp.init(jax.random.key(1), x)
  y, state = mlp.apply({"params": variables["params"]}, x, mutable=["activations"])
  hidden = state["activations"]["ffn_hidden"][0]
  assert hidden.shape == (2, 5, 32) and float(jnp.min(hidden)) >= 0.0
  assert y.shape == x.shape


def test_sinusoidal_table():
  table = sinusoidal_table(50, 16)
  np.testing.assert_allclose(table[7, 0], np.sin(7.0), atol=1e-6)
  np.testing.assert_allclose(table[7, 1], np.cos(7.0), atol=1e-6)
  np.testing.assert_allclose(table[7, 2], np.sin(7.0 / 10000 ** (2 / 16)), atol=1e-6)


def test_rmsnorm_matches_numpy():
  from skipjax.layers import RMSNorm
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  g = np.random.default_rng(1).normal(size=(8,)).astype(np.float32)
  y = RMSNorm(eps=1e-5).apply({"params": {"scale": g}}, x)
  np.testing.assert_allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * g, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
  """RoFormer Eq. 16: <R_m q, R_n k> = <q, R_{n-m} k>, and R_0 is the identity."""
  from skipjax.layers import rotary_embedding
  q, k = (jax.random.normal(jax.random.key(i), (1, 1, 1, 8)) for i in (0, 1))
  rot = lambda x, p: rotary_embedding(x, jnp.full((1, 1), p), theta=500.0)
  np.testing.assert_allclose(rot(q, 0), q, atol=1e-7)
  scores = [float(jnp.sum(rot(q, m) * rot(k, m + 3))) for m in (0, 5, 17)]
  np.testing.assert_allclose(scores, scores[0], rtol=1e-5)
  assert abs(float(jnp.sum(rot(q, 0) * rot(k, 1))) - scores[0]) > 1e-4


def test_grouped_query_attention_with_window_matches_numpy():
  """GQA (query head h uses K/V head h // 3) with a causal sliding window of 3, numpy reference."""
  attn = MultiHeadAttention(features=12, num_heads=6, head_dim=4, num_kv_heads=2, window=3)
  x = jax.random.normal(jax.random.key(0), (2, 7, 12))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  params = nn.meta.unbox(attn.init(jax.random.key(1), x, pos)["params"])
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  assert params["key"]["kernel"].shape == (12, 2, 4)
  p = jax.tree.map(np.asarray, params)
  xs = np.asarray(x)
  proj = lambda name: np.einsum("btd,dhk->bthk", xs, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query"), np.repeat(proj("key"), 3, axis=2), np.repeat(proj("value"), 3, axis=2)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / 2.0
  i, j = np.arange(7)[:, None], np.arange(7)[None, :]
  logits = np.where((j <= i) & (i - j < 3), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("bqhk,hkd->bqd", np.einsum("bhqs,bshk->bqhk", w, v), p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(attn.apply({"params": params}, x, pos), ref, atol=1e-5)


def test_gated_mlp_is_swiglu():
  mlp = MLP(features=6, hidden=10, activation="silu", use_bias=False, gated=True)
  x = jax.random.normal(jax.random.key(0), (2, 3, 6))
  p = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
  assert set(p) == {"gate", "wi", "wo"}
  silu = lambda a: a / (1 + np.exp(-a))
  xs = np.asarray(x)
  ref = (silu(xs @ p["gate"]["kernel"]) * (xs @ p["wi"]["kernel"])) @ p["wo"]["kernel"]
  np.testing.assert_allclose(mlp.apply({"params": p}, x), ref, atol=1e-5)
