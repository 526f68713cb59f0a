"""Learned exit classifier (skipjax/depth/exit_heads.py, routing.exit.learned_confidence).

References are independent: oracle labels from the model run under truncated plans `0:l+1`;
the confidence from a numpy LayerNorm / RMSNorm of the recorded hidden states and a numpy
sigmoid; training against the best constant predictor on held-out tokens.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import models
from skipjax.depth import exit_heads as eh
from skipjax.depth import exits
from skipjax.routing import exit as ex

L, V, D, T, B = 4, 64, 32, 16, 8


def _build():
  cfg = models.TransformerConfig(vocab_size=V, d_model=D, num_heads=2, num_layers=L, d_ff=64, max_len=32)
  params = nn.meta.unbox(jax.jit(models.build(cfg).init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  # stronger blocks than the default init, so that later layers often change the argmax (labels of
  # both classes), and a non-trivial final norm (so a norm applied without its params would show)
  params = {k: (jax.tree.map(lambda a: a * 4.0 if a.ndim >= 2 else a, v) if k.startswith("block_") else v)
            for k, v in params.items()}
  rng = np.random.default_rng(7)
  if "ln_final" in params:
    params["ln_final"] = {k: jnp.asarray(rng.uniform(0.5, 1.5, size=a.shape) if k == "scale"
                                         else rng.normal(scale=0.1, size=a.shape), a.dtype)
                          for k, a in params["ln_final"].items()}
  return cfg, params


def _batches(n, seed):
  rng = np.random.default_rng(seed)
  return [{"inputs": rng.integers(0, V, (B, T)).astype(np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
  cfg, params = _build()
  before = jax.tree.map(lambda a: np.array(a, copy=True), params)
  train = _batches(4, seed=0)
  heads, history = eh.train_exit_heads(cfg, params, train, steps=100, learning_rate=0.05, seed=0)
  return cfg, params, before, heads, history


def test_labels_equal_truncated_model_oracle(trained):
  cfg, params, _, _, _ = trained
  batch = _batches(1, seed=3)[0]
  data = jax.jit(lambda p, b: eh.features_and_labels(cfg, p, b))(params, batch)
  labels = np.asarray(data.labels)                                          # [L, B, T]
  assert labels.shape == (L, B, T) and data.features.shape == (L, B, T, D)
  truncated = jax.jit(lambda p, x: jnp.stack([models.build(dataclasses.replace(cfg, plan=f"0:{l + 1}")).apply(
      {"params": p}, x) for l in range(L)]))
  trunc = np.asarray(truncated(params, jnp.asarray(batch["inputs"])))      # [L, B, T, V]
  top = trunc.argmax(-1)                                                    # [L, B, T]
  want = (top == top[-1:]).astype(np.float32)
  # compare where both argmaxes are unambiguous (top-2 gap far above the 1e-5 path difference)
  srt = np.sort(trunc, -1)
  clear = (srt[..., -1] - srt[..., -2]) > 1e-3                              # [L, B, T]
  clear = clear & clear[-1:]
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(labels[clear], want[clear])
  np.testing.assert_array_equal(labels[-1], 1.0)
  assert 0.2 < labels[:-1].mean() < 0.8                                     # both classes occur


def test_training_beats_constant_predictor_on_held_out(trained):
  cfg, params, _, heads, history = trained
  assert history.shape == (100,) and np.all(np.isfinite(history))
  assert history[0] == pytest.approx(np.log(2.0), abs=0.02)                 # near-zero init: c ≈ 1/2
  assert history[-10:].mean() < history[0] - 0.15 and history[-10:].mean() < history[:10].mean() - 0.05
  m = eh.evaluate_exit_heads(cfg, params, heads, _batches(2, seed=1))
  early = slice(0, L - 1)                                                   # the last position is not trained
  p = m["positive_rate"][early]
  constant_bce = -(p * np.log(p) + (1 - p) * np.log(1 - p))                 # the best constant's BCE
  assert m["loss"][early].mean() < constant_bce.mean() - 0.05
  assert m["accuracy"][early].mean() > m["constant_accuracy"][early].mean() + 0.05
  np.testing.assert_array_equal(m["positive_rate"][-1], 1.0)
  assert m["tokens"] == 2 * B * T
  # untrained heads (c ≈ 1/2 everywhere) are not better than the constant predictor
  m0 = eh.evaluate_exit_heads(cfg, params, eh.init_exit_heads(L, D, seed=0, scale=0.0), _batches(2, seed=1))
  np.testing.assert_allclose(m0["loss"], np.log(2.0), rtol=1e-5)


def test_frozen_params_untouched_and_no_gradient(trained):
  cfg, params, before, heads, _ = trained
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    assert a.dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, np.asarray(b))
  batch = dict(_batches(1, seed=2)[0], weights=np.random.default_rng(2).uniform(size=(B, T)).astype(np.float32))
  g_params, g_heads = jax.jit(jax.grad(eh.exit_head_loss, argnums=(2, 0)), static_argnums=1)(heads, cfg, params, batch)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_params))
  assert np.abs(np.asarray(g_heads["w"][:-1])).max() > 0
  np.testing.assert_array_equal(g_heads["w"][-1], 0.0)                      # the last position is excluded


def _np_layer_norm(h, scale, bias, eps):
  h = h.astype(np.float64)
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  return (h - mu) / np.sqrt(var + eps) * scale + bias


def test_confidence_equals_numpy(trained):
  cfg, params, _, _, _ = trained
  batch = _batches(1, seed=4)[0]
  rng = np.random.default_rng(5)
  heads = {"w": jnp.asarray(rng.normal(scale=0.3, size=(L, D)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(L,)), jnp.float32)}
  out = jax.jit(lambda p, x: exits.layer_outputs(cfg, p, x))(params, jnp.asarray(batch["inputs"]))
  hidden = np.asarray(out.hidden)                                           # [L + 1, B, T, D]
  ln = params["ln_final"]
  normed = _np_layer_norm(hidden[1:], np.asarray(ln["scale"]), np.asarray(ln["bias"]), cfg.layer_norm_eps)
  want = 1 / (1 + np.exp(-(np.einsum("lbtd,ld->lbt", normed, np.asarray(heads["w"], np.float64))
                           + np.asarray(heads["b"])[:, None, None])))
  got = np.asarray(eh.confidence(cfg, params, heads, batch))                # [L, B, T]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ex.learned_confidence(heads["w"], heads["b"], jnp.asarray(normed, jnp.float32)),
                             want, rtol=1e-5, atol=1e-6)
  assert np.all((got > 0) & (got < 1)) and got.std() > 0.05
  # the normed state is the shared head's input: tied head → logits = h̄ Eᵀ
  np.testing.assert_allclose(np.asarray(eh.normed_states(cfg, params, out.hidden)) @ np.asarray(
      params["embed"]["embedding"]).T, out.logits, rtol=1e-4, atol=1e-4)
  # and the exit rule applies unchanged
  d = ex.exit_layer(jnp.asarray(got), 0.6, min_layer=1)
  assert d.layer.shape == (B, T)


def _drop_norm_bias(tree):
  """LayerNorm params {'scale', 'bias'} → RMSNorm params {'scale'} (the rest of the tree as is)."""
  if isinstance(tree, dict):
    if set(tree) == {"scale", "bias"}:
      return {"scale": tree["scale"]}
    return {k: _drop_norm_bias(v) for k, v in tree.items()}
  return tree


def test_normed_states_rmsnorm_and_no_final_norm(trained):
  cfg, params, _, _, _ = trained
  batch = jnp.asarray(_batches(1, seed=6)[0]["inputs"])
  rms_cfg = dataclasses.replace(cfg, norm_type="rmsnorm")
  rms_params = _drop_norm_bias(params)
  out = jax.jit(lambda p, x: exits.layer_outputs(rms_cfg, p, x))(rms_params, batch)
  h = np.asarray(out.hidden[1:], np.float64)
  scale = np.asarray(params["ln_final"]["scale"])
  want = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * scale
  got = np.asarray(eh.normed_states(rms_cfg, rms_params, out.hidden))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got @ np.asarray(params["embed"]["embedding"]).T, out.logits, rtol=1e-4, atol=1e-4)
  raw_cfg = dataclasses.replace(cfg, final_norm=False)
  raw_params = {k: v for k, v in params.items() if k != "ln_final"}
  out = jax.jit(lambda p, x: exits.layer_outputs(raw_cfg, p, x))(raw_params, batch)
  np.testing.assert_array_equal(eh.normed_states(raw_cfg, raw_params, out.hidden), out.hidden[1:])


def test_save_load_round_trip_and_errors(trained, tmp_path):
  cfg, _, _, heads, _ = trained
  path = tmp_path / "heads.npz"
  eh.save_exit_heads(path, heads, dict(eh.heads_meta(cfg), steps=100))
  assert os.listdir(tmp_path) == ["heads.npz"]                              # no temp file left behind
  loaded, meta = eh.load_exit_heads(path, cfg)
  np.testing.assert_array_equal(loaded["w"], heads["w"])
  np.testing.assert_array_equal(loaded["b"], heads["b"])
  assert meta == {"num_positions": L, "d_model": D, "plan": "0:4", "steps": 100}
  with pytest.raises(ValueError, match="plan") as e:
    eh.load_exit_heads(path, dataclasses.replace(cfg, plan="0,1,1,3"))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="do not fit") as e:
    eh.load_exit_heads(path, dataclasses.replace(cfg, plan="0:3"))
  assert str(path) in str(e.value) and "\n" not in str(e.value)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip file\n\x00\x01")
  for p in (bad, tmp_path / "missing.npz"):
    with pytest.raises(ValueError) as e:
      eh.load_exit_heads(p)
    assert str(e.value).startswith(f"exit heads file {p}:") and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="meta lacks 'plan'"):
    eh.save_exit_heads(tmp_path / "x.npz", heads, {"num_positions": L, "d_model": D})
  with pytest.raises(ValueError, match="do not fit"):
    eh.save_exit_heads(tmp_path / "x.npz", heads, dict(eh.heads_meta(cfg), d_model=D + 1))
  assert sorted(os.listdir(tmp_path)) == ["bad.npz", "heads.npz"]
