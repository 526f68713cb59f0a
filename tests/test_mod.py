"""Mixture-of-Depths routing (Raposo et al. 2024): expert-choice top-k dispatch, the router weight
scaling the block output, the causal decoding rules (aux BCE / predictor) and their agreement."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lm
from skipjax import models, routing, validation
from skipjax.data.synthetic import SyntheticDataset
from skipjax.decode import generation
from skipjax.models.block import Block
from skipjax.routing import mod
from skipjax.train import step as step_lib
from skipjax.train.state import TrainState

BASE = models.TransformerConfig(vocab_size=61, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16,
                                position="rope")


def _cfg(**skip):
  kw = dict(router="mod", dispatch="capacity", target_density=0.25)
  return dataclasses.replace(BASE, skip=models.SkipConfig(**{**kw, **skip}))


def _init(module, *args, perturb=True):
  """Params without compiling an init: shapes from eval_shape; norm scales 1, biases 0, other
  weights N(0, 0.05²), MoD router/predictor kernels N(0, 1) when `perturb` (mixed routing)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("['bias']"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.normal(0.0, 1.0 if perturb and "mod_" in name else 0.05, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _np_bce(z, t, w):
  z, t, w = (np.asarray(a, np.float64) for a in (z, t, w))
  p = 1.0 / (1.0 + np.exp(-z))
  return float(np.sum(-(t * np.log(p) + (1 - t) * np.log(1 - p)) * w) / np.sum(w))


# -- dispatch -------------------------------------------------------------------------------------

def test_topk_indices_select_exactly_c_in_causal_order_and_never_padding():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4, 24)).astype(np.float32)
  valid = np.ones((4, 24), bool)
  valid[1, 15:] = False          # right padding
  valid[2, :5] = False           # left padding
  valid[3, 1::3] = False         # holes
  c = mod.capacity(24, 0.25)
  assert c == 6
  row_slots = mod.row_capacity(jnp.asarray(valid), 0.25)
  idx, ok = routing.topk_indices(jnp.asarray(scores), c, jnp.asarray(valid), row_slots)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert np.all(np.diff(idx, axis=1) > 0)  # sorted: causal order
  mask = np.asarray(mod.topk_mask(jnp.asarray(scores), c, jnp.asarray(valid), row_slots))
  for g in range(4):
    n = valid[g].sum()
    want_c = min(n, max(1, int(np.floor(0.25 * n))))
    real = np.where(valid[g])[0]
    top = set(real[np.argsort(-scores[g, real])[:want_c]])
    assert set(idx[g][ok[g]]) == top and mask[g].sum() == want_c
    assert set(np.where(mask[g] > 0)[0]) == top and not mask[g][~valid[g]].any()


def test_topk_dispatch_equals_masked_reference_values_and_gradients():
  """Same top-k mask: gathered dispatch == masked reference, incl. the router gradient through r."""
  g, s, d = 3, 12, 5
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (g, s, d))
  r = jax.random.normal(k[1], (g, s))
  w = jax.random.normal(k[2], (d, d))
  c_out = jax.random.normal(k[3], (g, s, d))
  num_slots = mod.capacity(s, 0.25)

  def branch(w, x_all):
    # uses the original positions (idx) and all tokens (a causal prefix mean), like attention
    prefix = jnp.cumsum(x_all, axis=1) / jnp.arange(1, s + 1)[None, :, None]  # [G, S, d]
    def fn(x_sel, idx, valid):
      ctx = jnp.take_along_axis(prefix, idx[..., None], axis=1)
      return jnp.tanh((x_sel + ctx) @ w) * (1.0 + 0.1 * idx[..., None])
    return fn

  def loss(w, x, r, gathered):
    if gathered:
      out = routing.topk_dispatch(branch(w, x), x, r, num_slots)
    else:
      out = routing.dispatch(branch(w, x), x, mod.topk_mask(r, num_slots), method="masked")
    return jnp.sum(mod.mod_output(x, out.output, r, out.mask) * c_out), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (l1, o1), g1 = grad(w, x, r, True)
  (l2, o2), g2 = grad(w, x, r, False)
  np.testing.assert_array_equal(o1.mask, o2.mask)
  assert np.all(np.asarray(o1.mask).sum(axis=1) == num_slots)
  np.testing.assert_allclose(o1.output, o2.output, atol=1e-6)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5)
  gr = np.asarray(g1[2])
  m = np.asarray(o1.mask) > 0
  assert np.all(gr[~m] == 0) and np.all(np.abs(gr[m]) > 0)  # r gets gradient from routed tokens only
  assert float(o1.metrics["compute_fraction"]) == pytest.approx(num_slots / s)


# -- the block ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mod_weight", ["linear", "sigmoid"])
def test_mod_block_equals_dense_block_then_select_rope_and_padding(mod_weight):
  """Routed tokens get x + w(r)·(F(x) − x) with F the dense layer at the ORIGINAL positions (RoPE,
  causal mask), w(r) = r (MoD Eq. 1) or σ(r); exactly ⌊P·n⌋ real tokens per row, the top-k of r;
  padding is never selected."""
  cfg = _cfg(target_density=0.25, mod_weight=mod_weight)
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  positions = jnp.broadcast_to(jnp.arange(16) + 5, (2, 16))
  kv_valid = jnp.ones((2, 16), bool).at[1, 10:].set(False)
  block = Block(cfg, deterministic=False)
  params = _init(block, x, positions)
  y, state = jax.jit(lambda p: block.apply({"params": p}, x, positions, kv_valid, mutable=["gates"]))(params)
  m = np.asarray(state["gates"]["layer_mask"][0])
  assert m[0].sum() == 4 and m[1].sum() == 2 and not m[1, 10:].any()
  r = np.asarray(x @ params["mod_router"]["kernel"][:, 0])
  for b in range(2):  # the top-k of r among the real tokens
    n = int(kv_valid[b].sum())
    assert set(np.where(m[b] > 0)[0]) == set(np.argsort(-r[b, :n])[:int(m[b].sum())])
  dense = Block(dataclasses.replace(cfg, skip=models.SkipConfig()))
  dense_params = {k: v for k, v in params.items() if k != "mod_router"}
  f = jax.jit(lambda p: dense.apply({"params": p}, x, positions, kv_valid))(dense_params) - x
  w = r if mod_weight == "linear" else 1 / (1 + np.exp(-r))
  want = x + (m * w)[..., None] * f
  np.testing.assert_allclose(y, want, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(y)[m == 0], np.asarray(x)[m == 0])
  with pytest.raises(ValueError, match="gate_override.*matches no gate"):
    block.apply({"params": params, "gate_override": {"attn": jnp.ones((2, 16))}}, x, positions)


def test_model_gather_equals_masked_reference_with_gradients():
  """In the model the top-k gather gives the loss and gradients (router kernel included) of the
  masked reference run with the same mask (a gate_override)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  model = models.build(dataclasses.replace(_cfg(mod_causal="predictor", dispatch="masked"), num_layers=1))
  params = _init(model, tokens)

  def loss(p, override):
    variables = {"params": p} if override is None else {"params": p, "gate_override": override}
    logits, state = model.apply(variables, tokens, deterministic=False, mutable=["gates", "aux_loss"])
    return jnp.mean(logits ** 2) + step_lib.sum_aux_losses(state), state

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l1, s1), g1 = grad(params, None)
  mask = s1["gates"]["block_0"]["layer_mask"][0]
  assert np.all(np.asarray(mask).sum(axis=1) == 4)
  (l2, _), g2 = grad(params, {"block_0": {"layer": mask}})
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(jnp.abs(g1["block_0"]["mod_router"]["kernel"]).sum()) > 0
  metrics = step_lib.routing_metrics(s1["gates"])
  np.testing.assert_allclose(metrics["layer_density"], [0.25])
  np.testing.assert_allclose(metrics["mod_causal_accuracy"], s1["gates"]["block_0"]["mod_causal_accuracy"][0])


@pytest.mark.parametrize("causal, every", [("aux_loss", 1), ("predictor", 2)])
def test_cached_decoding_equals_causal_full_forward(causal, every):
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 61)
  model = models.build(_cfg(mod_causal=causal, mod_every=every, mod_eval="causal"))
  params = _init(model, tokens)
  assert ("mod_router" in params["block_0"]) == (every == 1) and "mod_router" in params["block_1"]
  full, state = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["gates"]))(params)  # causal rule
  routed = np.asarray(models.per_layer(state["gates"], "layer_mask")[1])
  assert 0 < routed.sum() < routed.size and routed.sum() != 2 * 4  # per-token rule, not exactly C per row

  @jax.jit
  def decode_all(cache):  # one token at a time through the KV cache (LtS Alg. 2)
    def step(cache, token):
      logits, cache, executed = generation.decode_step(model, params, cache, token[:, None])
      return cache, (logits, executed)
    return jax.lax.scan(step, cache, tokens.T)[1]  # [T, B, V], [T, L, B]

  logits, executed = decode_all(generation.init_cache(model, 2))
  np.testing.assert_allclose(logits.transpose(1, 0, 2), full, atol=1e-4)
  masks = models.per_layer(state["gates"], "layer_mask")
  np.testing.assert_array_equal(executed.transpose(1, 2, 0), masks)
  assert every == 1 or np.all(np.asarray(masks[0]) == 1)  # layer 0 dense under mod_every=2


def test_bce_and_agreement_match_numpy():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 10)).astype(np.float32) * 3
  t = (rng.random((3, 10)) < 0.3).astype(np.float32)
  w = np.ones((3, 10), bool)
  w[2, 6:] = False
  np.testing.assert_allclose(mod.bce_loss(z, t, w), _np_bce(z, t, w), rtol=1e-5)
  agree = np.sum(((z > 0) == (t > 0)) * w) / w.sum()
  np.testing.assert_allclose(mod.agreement(z, t, w), agree, rtol=1e-6)
  # in the model: the sown BCE / accuracy of the predictor against the sown top-k mask
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 61)
  model = models.build(dataclasses.replace(_cfg(mod_causal="predictor", mod_aux_weight=0.3), num_layers=1))
  params = _init(model, tokens)
  _, state = jax.jit(lambda p: model.apply({"params": p}, tokens, deterministic=False, capture_intermediates=True,
                                           mutable=["gates", "aux_loss", "intermediates"]))(params)
  logits = np.asarray(state["intermediates"]["block_0"]["mod_predictor"]["__call__"][0])
  mask = np.asarray(state["gates"]["block_0"]["layer_mask"][0])
  ones = np.ones_like(mask)
  np.testing.assert_allclose(state["aux_loss"]["block_0"]["mod_bce"][0], 0.3 * _np_bce(logits, mask, ones), rtol=1e-5)
  np.testing.assert_allclose(state["gates"]["block_0"]["mod_causal_accuracy"][0],
                             np.mean((logits > 0) == (mask > 0)), rtol=1e-6)


def test_training_raises_predictor_agreement_above_base_rate():
  """50 steps on synthetic:mixed_difficulty at P = 0.25: the predictor's agreement with top-k
  membership beats the constant 'never routed' predictor (base rate 1 − P = 0.75)."""
  cfg = dataclasses.replace(_cfg(mod_causal="predictor", target_density=0.25), vocab_size=64, max_len=32,
                            position="learned", num_layers=1)
  model = models.build(cfg)
  data = SyntheticDataset("mixed_difficulty", vocab_size=64, batch_size=8, seq_len=32, split="train", seed=0,
                          eval_batches=1)
  params = _init(model, jnp.zeros((1, 32), jnp.int32), perturb=False)
  tx = optax.adam(1e-2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  accuracy, nll = [], []
  for s in range(50):
    b = data.batch(s)
    state, metrics = train(state, {"inputs": b["inputs"], "targets": b["targets"]}, jax.random.key(1))
    accuracy.append(float(metrics["mod_causal_accuracy"]))
    nll.append(float(metrics["nll"]))
  np.testing.assert_allclose(metrics["layer_density"], [0.25])
  assert np.mean(accuracy[-5:]) > 0.8 > accuracy[0], accuracy
  assert np.mean(nll[-5:]) < nll[0] - 1.0


def test_config_errors_name_the_field():
  config = lm.get_config("tiny")
  config.model.skip.update(router="mod", target_density=0.5)
  validation.validate_model(config.model)
  for field, value, match in (("granularity", "block", "granularity"), ("mod_causal", "oracle", "mod_causal"),
                              ("mod_eval", "x", "mod_eval"), ("mod_every", 0, "mod_every"),
                              ("mod_weight", "softmax", "mod_weight"),
                              ("density_warmup_steps", 10, "density_warmup_steps")):
    bad = lm.get_config("tiny")
    bad.model.skip.update(router="mod", target_density=0.5, **{field: value})
    with pytest.raises(ValueError, match=f"config.model.skip.{match}"):
      validation.validate_model(bad.model)
  bad = lm.get_config("tiny")
  bad.model.update(scan_layers=True)
  bad.model.skip.update(router="mod", mod_every=2)
  with pytest.raises(ValueError, match="mod_every=2 needs scan_layers=False"):
    validation.validate_model(bad.model)
  # The model config itself refuses them (users who build a TransformerConfig without the trainer).
  with pytest.raises(ValueError, match="mod_every=2 needs scan_layers=False"):
    dataclasses.replace(_cfg(mod_every=2), scan_layers=True)
  with pytest.raises(ValueError, match="needs config.model.norm='pre'"):
    dataclasses.replace(_cfg(), norm="post")
  with pytest.raises(ValueError, match="config.model.skip.mod_causal='oracle'"):
    dataclasses.replace(_cfg(), skip=dataclasses.replace(_cfg().skip, mod_causal="oracle"))


def test_scan_layers_equal_loop_layers_topk_eval():
  """scan_layers (mod_every=1) gives the loop's output; `mod_eval='topk'` routes exactly C per row."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  cfg = _cfg(mod_causal="predictor", mod_eval="topk")
  loop, scan = models.build(cfg), models.build(dataclasses.replace(cfg, scan_layers=True))
  params = _init(loop, tokens)
  run = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["gates"]))(p)
  (want, state), (got, _) = run(loop, params), run(scan, models.layout.to_scan(params))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(np.asarray(models.per_layer(state["gates"], "layer_mask")).sum(axis=-1) == 4)
