"""Early-exit confidence measures and decisions (skipjax/routing/exit.py) and the shared-head exit
logits / LayerSkip loss (skipjax/depth/exits.py).

References are independent: measures and decisions as numpy loops; exit logits as the model run
under the truncated plan `0:l+1` (plan truncation + final norm + head is the exit prediction);
the early-exit loss as a sum of the truncated models' cross-entropies.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import models
from skipjax.depth import exits, importance
from skipjax.models import layout
from skipjax.routing import exit as ex

L, V, D, T, B = 3, 32, 16, 6, 2


def _np_softmax(x):
  x = x.astype(np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(L, B, T, V)) * 3).astype(np.float32)


def test_measures_match_numpy(logits):
  p = _np_softmax(logits)                                                    # [L, B, T, V]
  srt = np.sort(p, -1)
  np.testing.assert_allclose(ex.softmax_max(jnp.asarray(logits)), p.max(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ex.top2_margin(jnp.asarray(logits)), srt[..., -1] - srt[..., -2], rtol=1e-5, atol=1e-6)
  neg_h = np.sum(p * np.log(p), -1)
  np.testing.assert_allclose(ex.entropy(jnp.asarray(logits)), neg_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ex.entropy(jnp.asarray(logits), normalized=True), 1 + neg_h / np.log(V),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(ex.entropy(jnp.asarray(logits))) <= 0)
  np.testing.assert_allclose(ex.confidence("top2_margin", logits=jnp.asarray(logits)),
                             srt[..., -1] - srt[..., -2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="measure='bogus'"):
    ex.confidence("bogus", logits=jnp.asarray(logits))


def test_saturation_matches_numpy():
  h = np.random.default_rng(1).normal(size=(L + 1, B, T, D))
  want = np.zeros((L, B, T))
  for l in range(L):
    for b in range(B):
      for t in range(T):
        u, v = h[l + 1, b, t], h[l, b, t]
        want[l, b, t] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
  np.testing.assert_allclose(ex.saturation(jnp.asarray(h, jnp.float32)), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ex.saturation(jnp.asarray(np.stack([h[0], h[0]]), jnp.float32)), 1.0, rtol=1e-6)


def test_decaying_threshold():
  t = np.arange(10)
  for lam, tau, n in ((0.8, 4.0, 10), (1.0, 0.0, 5), (0.0, 2.0, 7)):
    want = np.clip(0.9 * lam + 0.1 * np.exp(-tau * t / n), 0, 1)
    np.testing.assert_allclose(ex.decaying_threshold(lam, t, n, tau), want, rtol=1e-6)
  lam_t = np.asarray(ex.decaying_threshold(0.8, t, 10, 4.0))
  assert np.all(np.diff(lam_t) < 0) and lam_t[0] == pytest.approx(0.82)


def _np_exit(conf, thr, min_layer):
  n = conf.shape[0]
  out = np.full(conf.shape[1:], n - 1)
  thr = np.broadcast_to(thr, conf.shape[1:])
  for idx in np.ndindex(conf.shape[1:]):
    for l in range(min_layer, n):
      if conf[(l,) + idx] >= thr[idx]:
        out[idx] = l
        break
  return out


def _np_oracle(a, stable):
  n = a.shape[0]
  out = np.zeros(a.shape[1:], int)
  for idx in np.ndindex(a.shape[1:]):
    col = a[(slice(None),) + idx]
    for l in range(n):
      if (np.all(col[l:] == col[-1]) if stable else col[l] == col[-1]):
        out[idx] = l
        break
  return out


def test_exit_layer_matches_loops():
  rng = np.random.default_rng(2)
  conf = rng.uniform(size=(5, 3, 7)).astype(np.float32)
  for thr in (0.3, 0.7, 0.95):
    for min_layer in (0, 1, 3, 4):
      d = ex.exit_layer(jnp.asarray(conf), thr, min_layer)
      want = _np_exit(conf, thr, min_layer)
      np.testing.assert_array_equal(d.layer, want)
      np.testing.assert_array_equal(d.early, want < 4)
      np.testing.assert_array_equal(d.confidence, np.take_along_axis(conf, want[None], 0)[0])
  # a per-position threshold [T] broadcasts over the batch
  thr_t = np.asarray(ex.decaying_threshold(0.7, np.arange(7), 7, 3.0))
  np.testing.assert_array_equal(ex.exit_layer(jnp.asarray(conf), thr_t, 1).layer, _np_exit(conf, thr_t, 1))
  # threshold 0 exits at min_layer; threshold > 1 never exits early
  for min_layer in (0, 2):
    np.testing.assert_array_equal(ex.exit_layer(jnp.asarray(conf), 0.0, min_layer).layer, min_layer)
  d = ex.exit_layer(jnp.asarray(conf), 1.01, 0)
  np.testing.assert_array_equal(d.layer, 4)
  assert not np.any(d.early)
  with pytest.raises(ValueError, match="min_layer=5"):
    ex.exit_layer(jnp.asarray(conf), 0.5, 5)
  np.testing.assert_array_equal(ex.fixed_exit(5, 2, (3,)).layer, [2, 2, 2])
  m = np.asarray(ex.active_mask(jnp.asarray([0, 2, 4]), 5))                  # [5, 3]
  np.testing.assert_array_equal(m, (np.arange(5)[:, None] <= np.array([0, 2, 4])[None]).astype(np.float32))


def test_oracle_matches_loops():
  a = np.random.default_rng(3).integers(0, 3, size=(6, 4, 9))               # small vocab: many agreements
  for stable in (False, True):
    d = ex.oracle_exit_layer(jnp.asarray(a), stable=stable)
    np.testing.assert_array_equal(d.layer, _np_oracle(a, stable))
    assert np.all(np.asarray(d.layer) <= 5)
  assert np.all(np.asarray(ex.oracle_exit_layer(jnp.asarray(a)).layer)
                <= np.asarray(ex.oracle_exit_layer(jnp.asarray(a), stable=True).layer))
  # a case where they differ: agrees at 0, disagrees at 1, agrees from 2
  col = jnp.asarray([[7], [1], [7], [7]])
  assert int(ex.oracle_exit_layer(col).layer[0]) == 0
  assert int(ex.oracle_exit_layer(col, stable=True).layer[0]) == 2


# -- shared-head exit logits and the early-exit loss ------------------------------------------

CONFIGS = {
    "tied_pre": dict(),
    "untied_rms_rope": dict(tie_embeddings=False, norm_type="rmsnorm", position="rope", mlp_gated=True,
                            activation="silu", use_bias=False),
}


def _model(name, **extra):
  cfg = models.TransformerConfig(vocab_size=V, d_model=D, num_heads=2, num_layers=L, d_ff=32, max_len=16,
                                 **CONFIGS[name], **extra)
  params = nn.meta.unbox(models.build(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  # stronger layers than the default init, so that layers really change the prediction
  params = {k: (jax.tree.map(lambda a: a * 4.0 if a.ndim >= 2 else a, v) if k.startswith("block_") else v)
            for k, v in params.items()}
  rng = np.random.default_rng(4)
  batch = {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
           "targets": rng.integers(0, V, (B, T)).astype(np.int32)}
  return cfg, params, batch


def _truncated_logits(cfg, params, inputs, plan):
  return models.build(dataclasses.replace(cfg, plan=plan)).apply({"params": params}, jnp.asarray(inputs))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_logits_equal_truncated_models(name):
  cfg, params, batch = _model(name)
  got = np.asarray(jax.jit(lambda p, b: exits.layer_logits(cfg, p, b))(params, batch))   # [L, B, T, V]
  assert got.shape == (L, B, T, V)
  full = np.asarray(models.build(cfg).apply({"params": params}, jnp.asarray(batch["inputs"])))
  np.testing.assert_allclose(got[-1], full, rtol=1e-5, atol=1e-5)
  for l in range(L):
    want = np.asarray(_truncated_logits(cfg, params, batch["inputs"], f"0:{l + 1}"))
    np.testing.assert_allclose(got[l], want, rtol=1e-5, atol=1e-5)
  # layers differ (the test would not notice a head applied to the wrong state otherwise)
  assert np.abs(got[0] - got[-1]).max() > 1e-2


def test_layer_logits_scan_layout_and_plan():
  cfg, params, batch = _model("tied_pre")
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  got = np.asarray(exits.layer_logits(scan_cfg, layout.to_scan(params), batch))
  want = np.asarray(exits.layer_logits(cfg, params, batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # a non-identity plan: exits after each of its positions (repeat layer 1, drop layer 2)
  plan_cfg = dataclasses.replace(cfg, plan="0,1,1")
  got = np.asarray(exits.layer_logits(plan_cfg, params, batch))
  assert got.shape[0] == 3
  for p, prefix in enumerate(("0", "0,1", "0,1,1")):
    np.testing.assert_allclose(got[p], _truncated_logits(cfg, params, batch["inputs"], prefix), rtol=1e-5, atol=1e-5)
  hidden = exits.layer_outputs(cfg, params, jnp.asarray(batch["inputs"])).hidden
  assert hidden.shape == (L + 1, B, T, D)
  # the states agree with the importance measures' interception (layer inputs/outputs at even indices)
  np.testing.assert_allclose(hidden, importance.hidden_states(cfg, params, batch)[::2], rtol=1e-5, atol=1e-5)


def test_layerskip_scales():
  s = exits.layerskip_scales(4, e_scale=1.0)
  # e(l) = e_scale·Σ_{i≤l} i for l < L − 1; e(L − 1) = L − 1 + e_scale·Σ_{i≤L−2} i
  raw = np.array([0.0, 1.0, 3.0, 3.0 + 3.0])
  np.testing.assert_allclose(s, raw / raw.sum())
  np.testing.assert_allclose(exits.layerskip_scales(4, 0.0), [0, 0, 0, 1])
  c = np.array([0, 1, 0, 1])
  np.testing.assert_allclose(exits.layerskip_scales(4, 1.0, c), raw * c / (raw * c).sum())


def test_early_exit_loss_equals_direct_sum():
  cfg, params, batch = _model("untied_rms_rope")
  weights = exits.layerskip_scales(L, e_scale=0.5)
  w_tok = np.random.default_rng(5).uniform(size=(B, T)).astype(np.float32)
  batch = dict(batch, weights=w_tok)
  loss = jax.jit(lambda p: exits.early_exit_loss(cfg, p, batch, weights))
  got = float(loss(params))
  want = 0.0
  for l in range(L):
    logits = np.asarray(_truncated_logits(cfg, params, batch["inputs"], f"0:{l + 1}"), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want += weights[l] * (nll * w_tok).sum() / w_tok.sum()
  assert got == pytest.approx(want, rel=1e-5)
  # differentiable: the gradient matches a finite difference along a random direction
  grad = jax.jit(jax.grad(lambda p: exits.early_exit_loss(cfg, p, batch, weights)))(params)
  direction = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(a.size).normal(size=a.shape), a.dtype), params)
  eps = 1e-3
  f = lambda s: float(loss(jax.tree.map(lambda a, d: a + s * d, params, direction)))
  fd = (f(eps) - f(-eps)) / (2 * eps)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  assert analytic == pytest.approx(fd, rel=2e-2, abs=1e-3)
  with pytest.raises(ValueError, match="weights have shape"):
    exits.early_exit_loss(cfg, params, batch, np.ones(L + 1))


def test_oracle_on_random_model():
  """Analysis example: the consistency oracle on a random-init model exits at ≤ L − 1 everywhere,
  and where it exits, the exit prediction equals the full model's."""
  cfg, params, batch = _model("tied_pre")
  logits = exits.layer_logits(cfg, params, batch)                           # [L, B, T, V]
  argmax = jnp.argmax(logits, -1)                                           # [L, B, T]
  d = ex.oracle_exit_layer(argmax)
  layer = np.asarray(d.layer)
  assert layer.shape == (B, T) and np.all((layer >= 0) & (layer <= L - 1))
  at_exit = np.take_along_axis(np.asarray(argmax), layer[None], 0)[0]
  np.testing.assert_array_equal(at_exit, np.asarray(argmax[-1]))
