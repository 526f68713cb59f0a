"""Issue 15 review of the SkipLayer gates: gate_form (P1), router bias / input / learning rate (P3),
eval executed depth (P6), post-LN routing (P8), the highway form (P9), one depth count and
per-batch eval gate keys (P11)."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from configs import lm
from skipjax import decode, models, routing, validation
from skipjax.train import loop, optim, step as step_lib

D, T = 16, 8
BASE = models.TransformerConfig(vocab_size=31, d_model=D, num_heads=2, num_layers=1, d_ff=32, max_len=T)


def _cfg(norm="pre", **skip):
  kw = dict(router="top1", target_density=0.5, granularity="layer")
  return dataclasses.replace(BASE, norm=norm, final_norm=norm == "pre", skip=models.SkipConfig(**{**kw, **skip}))


# Test-side inputs and references are numpy: every eager jax op would be one more XLA compile.


def _init(module, *args, method=None):
  init = jax.jit(lambda *a: module.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, *a,
                                        method=method)["params"])
  return jax.tree.map(np.asarray, nn.meta.unbox(init(*args)))


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _x(seed=0):
  return _normal((2, T, D), seed)


def _pos():
  return np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))


def _tokens(batch=2, seed=3):
  return np.random.default_rng(seed).integers(0, BASE.vocab_size, (batch, T)).astype(np.int32)


def _mixed(params, bias=0.0):
  """Router kernels N(0, 1) (mixed decisions), router biases [0, bias]."""
  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    if "router" not in name:
      return a
    return np.array([0.0, bias], np.float32) if name.endswith("['bias']") else _normal(a.shape, len(name))
  return jax.tree_util.tree_map_with_path(perturb, params)


def _without_routers(params):
  return {k: v for k, v in params.items() if not k.startswith("router")}


def _logits(params, x, name="router"):
  """The router logits x @ W_G + b [.., 2] from a block's router params `name` (numpy)."""
  return np.asarray(x, np.float64) @ params[name]["kernel"] + params[name]["bias"]


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _layer_norm(x, scale, bias):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + BASE.layer_norm_eps) * scale + bias


# -- P1: gate_form ---------------------------------------------------------------------------------


def test_residual_gate_form_carries_the_relaxation_gradient_and_the_paper_form_does_not():
  """A layer that helps every token (target x + 2R(x)): the soft relaxation's router gradient
  s₀s₁⟨dy, R(x)⟩ is negative for every token. gate_form='residual' gives exactly it on routed
  tokens; the paper's Eq. 4 gives s₀s₁⟨dy, F(x)⟩ / −s₀s₁⟨dy, x⟩, of random sign."""
  n = 2048
  kg = jax.random.key(0)
  x = 3.0 * _normal((n, D), 1)                           # the stream dominates F(x) = x + R(x)
  r = _normal((n, D), 2)
  f, target = x + r, x + 2.0 * r
  logits = _normal((n, 2), 3)

  def loss(logits, form):
    y = routing.gated_layer_output(x, f, routing.gumbel_gate(logits, kg), form=form)
    return 0.5 * jnp.sum((y - target) ** 2), y

  @jax.jit
  def run(logits):
    grad = jax.value_and_grad(loss, has_aux=True)
    s = jax.nn.softmax(logits + jax.random.gumbel(kg, logits.shape))   # the relaxation (τ = 1)
    return grad(logits, "paper"), grad(logits, "residual"), routing.gumbel_gate(logits, kg).mask, s

  ((_, y_paper), g_paper), ((_, y_res), g_res), mask, s = jax.tree.map(np.asarray, run(logits))
  np.testing.assert_array_equal(y_res, y_paper)          # ST-Gumbel forward: identical, bit-exact
  routed = mask > 0
  assert 0.3 < routed.mean() < 0.7
  relax = s[:, 0] * s[:, 1] * np.sum((y_res - target) * r, axis=-1)  # ∂L/∂l₁ = s₀s₁⟨dy, R⟩
  np.testing.assert_allclose(g_res[routed, 1], relax[routed], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(g_res[routed, 0], -relax[routed], rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(g_res[~routed], 0.0)      # a skipped token's R is not computed
  right = lambda g, where: float(np.mean(g[where, 1] < 0))  # descent raises l₁: route more
  assert right(g_res, routed) >= 0.95
  paper_routed, paper_skipped = right(g_paper, routed), right(g_paper, ~routed)
  assert paper_skipped < 0.7 and paper_routed < 0.95, (paper_routed, paper_skipped)


def test_block_wires_gate_form_into_the_router_gradient():
  x, pos = _x(), _pos()
  block = models.Block(_cfg(gate_form="residual"), deterministic=False)
  params = _mixed(_init(block, x, pos))
  dense = models.Block(BASE)
  f = np.asarray(jax.jit(dense.apply)({"params": _without_routers(params)}, x, pos))  # F(x), the dense layer
  r, target = f - x, x + 2.0 * (f - x)

  def loss(p, form):
    y = models.Block(_cfg(gate_form=form), deterministic=False).apply({"params": p}, jnp.asarray(x), pos)
    return 0.5 * jnp.sum((y - target) ** 2), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, "residual")
  logits = _logits(params, x)
  s = _softmax(logits)
  m = (logits[..., 1] > logits[..., 0]).astype(np.float64)
  assert 0.2 < m.mean() < 0.8
  c = m * s[..., 0] * s[..., 1] * np.sum((np.asarray(y) - target) * r, axis=-1)   # top1: g₁ = s₁, ∂L/∂l₁
  want_kernel = np.einsum("btd,btk->dk", x, np.stack([-c, c], -1))
  np.testing.assert_allclose(grads["router"]["kernel"], want_kernel, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(grads["router"]["bias"], [-c.sum(), c.sum()], rtol=1e-3, atol=1e-5)


# -- P3: router bias, router input, router learning rate -------------------------------------------


def test_router_bias_init_target_starts_at_logit_p_under_a_density_warmup():
  x = _x()
  logit = lambda p: math.log(p / (1 - p))
  for init, p0 in (("warmup", routing.WARMUP_INIT_DENSITY), ("target", 0.25)):
    block = models.Block(_cfg(router="gumbel", target_density=0.25, density_warmup_steps=100, router_bias_init=init))
    params = _init(block, x, method=lambda b, x: b._gate("layer", x))  # only the router runs
    np.testing.assert_allclose(params["router"]["bias"], [0.0, logit(p0)], rtol=1e-6)


@pytest.mark.parametrize("granularity,name", [("layer", "layer"), ("ffn", "ffn")])
def test_norm_router_input_is_invariant_to_the_stream_scale(granularity, name):
  """skip.router_input='norm': the router reads its block's pre-norm LN(x) (ln_attn for the layer
  router, ln_ffn for the FFN router), so scaling the stream by 10 leaves its gates unchanged."""
  x, pos = _x(), _pos()
  block = models.Block(_cfg(granularity=granularity, router_input="norm"))
  params = _mixed(_init(block, x, pos))
  ln, router = ("ln_ffn", "router_ffn") if name == "ffn" else ("ln_attn", "router")
  params[ln]["scale"] = 1.0 + 0.5 * _normal((D,), 4)  # tell ln_attn / ln_ffn apart
  gate = jax.jit(lambda h: block.apply({"params": params}, h, method=lambda b, h: b._gate(name, h).probs))
  probs, probs_10 = np.asarray(gate(x)), np.asarray(gate(10.0 * x))
  np.testing.assert_allclose(probs_10, probs, atol=1e-4)
  h = _layer_norm(x, params[ln]["scale"], params[ln]["bias"])
  np.testing.assert_allclose(probs, _softmax(_logits(params, h, router))[..., 1], atol=1e-5)
  stream = lambda u: _softmax(_logits(params, u, router))[..., 1]  # what the 'stream' router reads
  assert np.max(np.abs(stream(10.0 * x) - stream(x))) > 0.1


def test_router_lr_multiplier_scales_only_router_updates():
  params = {"block_0": {"router": {"kernel": np.ones((D, 2), np.float32), "bias": np.zeros((2,), np.float32)},
                        "mlp": {"wi": {"kernel": np.ones((D, 4), np.float32)}}}, "embed": np.ones((3, D), np.float32)}
  grads = jax.tree.map(lambda a: _normal(a.shape, a.size), params)

  def second_update(multiplier):  # warmup-cosine lr is 0 at step 0: compare the second update
    train = lm.get_config("tiny").train
    train.update(router_lr_multiplier=multiplier, warmup_steps=1)
    tx, _ = optim.make_optimizer(train)

    @jax.jit
    def run():
      _, state = tx.update(grads, tx.init(params), params)
      return tx.update(grads, state, params)[0]
    return jax.tree.map(np.asarray, run())

  base, fast = second_update(1.0), second_update(3.0)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree.leaves(fast)):
    want = 3.0 * a if "router" in jax.tree_util.keystr(path) else a
    assert np.max(np.abs(a)) > 0
    np.testing.assert_allclose(b, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_gate_options_are_validated_with_one_line_errors():
  config = lm.get_config("tiny")
  for field, bad in (("gate_form", "soft"), ("router_bias_init", "zero"), ("router_input", "ln")):
    c = lm.get_config("tiny")
    c.model.skip.update(router="gumbel", **{field: bad})
    with pytest.raises(ValueError, match=rf"^config\.model\.skip\.{field}='{bad}' is not one of [^\n]*$"):
      validation.validate_model(c.model)
    with pytest.raises(ValueError, match=rf"^config\.model\.skip\.{field}="):
      _cfg(**{field: bad})
  config.train.router_lr_multiplier = 0.0
  with pytest.raises(ValueError, match=r"^config\.train\.router_lr_multiplier=0\.0 must be in"):
    validation.validate_train(config.train)
  with pytest.raises(ValueError, match=r"^config\.model\.skip\.router_input='norm' needs config\.model\.norm='pre'"):
    _cfg(norm="post", router_input="norm")


# -- P6 / P11: executed depth, one definition; eval keys per batch -----------------------------------


class _EvalData:
  num_batches = 2

  def __init__(self, batches):
    self.batches = batches

  def batch(self, i):
    return self.batches[i]


def test_eval_reports_executed_depth_counted_from_the_sown_masks():
  model = models.build(_cfg())
  batches = [{"inputs": np.asarray(_tokens(seed=s)), "targets": np.asarray(_tokens(seed=s + 1))} for s in (3, 5)]
  params = _mixed(_init(model, batches[0]["inputs"]))
  eval_fn = jax.jit(lambda p, b, r, i: step_lib.eval_step(p, b, r, i, model=model))
  result = loop.evaluate(eval_fn, params, _EvalData(batches), 2, None)
  counts = []
  forward = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["gates"]))
  for b in batches:  # independent count: Σ_l m_l per token, from the sown layer masks
    _, state = forward(b["inputs"])
    layers = [state["gates"][f"block_{l}"]["layer_mask"][0] for l in range(BASE.num_layers)]
    counts.append(np.mean(np.sum(np.stack(layers), axis=0)))
  assert 0.3 < np.mean(counts) < 1.7
  np.testing.assert_allclose(result["eval_executed_depth"], np.mean(counts), rtol=1e-6)


def test_ffn_routing_depth_is_one_count_in_training_eval_metrics_and_decoding():
  """FFN-only routing: a layer counts (1 + m_ffn)/2 in executed_depth, eval, routing_metrics and
  decode.executed_layers alike."""
  model = models.build(_cfg(granularity="ffn"))
  tokens = _tokens()
  params = _mixed(_init(model, tokens))
  _, state = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["gates"]))(params)
  m = np.stack([np.asarray(state["gates"][f"block_{l}"]["ffn_mask"][0]) for l in range(BASE.num_layers)])
  assert 0.0 < m.mean() < 1.0
  want = np.sum((1.0 + m) / 2.0, axis=0)                                   # [B, T]
  depth, effective = jax.jit(lambda g: (step_lib.executed_depth(g), step_lib.routing_metrics(g)["effective_depth"]))(
      state["gates"])
  np.testing.assert_allclose(depth, want, rtol=1e-6)
  np.testing.assert_allclose(effective, want.mean(), rtol=1e-6)
  out = jax.jit(lambda p, b: step_lib.eval_step(p, b, model=model))(params, {"inputs": tokens, "targets": tokens})
  np.testing.assert_allclose(out["depth_sum"], want.sum(), rtol=1e-6)
  step = decode.make_step_fn(model)
  cache = decode.init_cache(model, tokens.shape[0])
  for t in range(T):
    _, cache, executed = step(params, cache, tokens[:, t:t + 1])          # [L, B]
    np.testing.assert_allclose(np.sum(executed, axis=0), want[:, t], rtol=1e-6)


def test_eval_gate_key_differs_per_batch_and_is_reproducible():
  model = models.build(_cfg(router="random"))
  batch = {"inputs": np.asarray(_tokens()), "targets": np.asarray(_tokens(seed=4))}
  params = _init(model, batch["inputs"])
  eval_fn = jax.jit(lambda p, b, r, i: step_lib.eval_step(p, b, r, i, model=model))
  key = jax.random.key(9)
  nll = lambda i: float(eval_fn(params, batch, key, np.int32(i))["nll_sum"])
  assert nll(0) != nll(1)                      # the same batch at index 0 and 1: other gates
  assert nll(1) == nll(1)
  seen = []
  record = lambda p, b, r, i: seen.append(float(eval_fn(p, b, r, i)["nll_sum"])) or eval_fn(p, b, r, i)
  data = _EvalData([batch, batch])
  first = loop.evaluate(record, params, data, 2, None, key)
  assert seen[0] != seen[1]
  assert loop.evaluate(record, params, data, 2, None, key) == first


# -- P8: post-LN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,router", [("block", "gumbel"), ("ffn", "top1"), ("ffn", "highway")])
def test_post_ln_refuses_block_and_ffn_routers_at_model_level(granularity, router):
  with pytest.raises(ValueError, match=rf"^config\.model\.skip\.granularity='{granularity}' with "
                                       rf"router='{router}' needs config\.model\.norm='pre'[^\n]*$"):
    _cfg(norm="post", granularity=granularity, router=router)
  c = lm.get_config("tiny")
  c.model.update(norm="post")
  c.model.skip.update(router=router, granularity=granularity)
  with pytest.raises(ValueError, match=rf"^config\.model\.skip\.granularity='{granularity}'"):
    validation.validate_model(c.model)
  c.model.skip.update(granularity="layer")
  validation.validate_model(c.model)  # layer granularity trains with post-LN
  _cfg(norm="post", granularity=granularity, router="random")  # no gradient needed


def test_post_ln_layer_routing_is_the_post_ln_layer_trains_its_router_and_decodes():
  """Layer granularity with post-LN: F(x) keeps the block norms (all routed = the dense post-LN
  model), the router gets a gradient, and KV-cache decoding (Block.decode's layer path, here with
  gate_form='residual') equals the full forward."""
  tokens = _tokens()
  dense = models.build(dataclasses.replace(BASE, norm="post", final_norm=False))
  model = models.build(_cfg(norm="post", router="gumbel", gate_form="residual"))
  on = _mixed(_init(model, tokens), bias=100.0)                           # every token routed
  dense_params = {k: _without_routers(v) if k.startswith("block_") else v for k, v in on.items()}
  train_mode = lambda p: model.apply({"params": p}, tokens, deterministic=False, rngs={"gate": jax.random.key(1)})
  loss_and_grad = jax.jit(jax.value_and_grad(lambda p: (jnp.mean(train_mode(p) ** 2), train_mode(p)), has_aux=True))
  (_, logits), _ = loss_and_grad(on)
  np.testing.assert_allclose(logits, jax.jit(dense.apply)({"params": dense_params}, tokens), atol=1e-5)
  params = _mixed(on)
  _, grads = loss_and_grad(params)
  for l in range(BASE.num_layers):
    assert np.abs(np.asarray(grads[f"block_{l}"]["router"]["kernel"])).sum() > 0
  full, state = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["gates"]))(params)
  masks = np.stack([np.asarray(state["gates"][f"block_{l}"]["layer_mask"][0]) for l in range(BASE.num_layers)])
  assert 0.0 < masks.mean() < 1.0
  cache = decode.init_cache(model, tokens.shape[0])
  np.testing.assert_allclose(_helpers.decode_step_by_step(model, params, cache, tokens), full, atol=3e-5)


# -- P9: highway -----------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "ffn"])
def test_highway_is_t_times_h_plus_one_minus_t_times_x(granularity):
  x, pos = _x(), _pos()
  block = models.Block(_cfg(router="highway", granularity=granularity))
  name = "router" if granularity == "layer" else "router_ffn"
  params = _init(block, x, pos)
  params[name] = {"kernel": _normal((D, 2), 5), "bias": np.array([0.0, 0.7], np.float32)}
  dense = lambda h, branches: models.Block(BASE).apply({"params": _without_routers(params)}, h, pos,
                                                        branches=branches)

  @jax.jit
  def run(x):
    y = block.apply({"params": params}, x, pos)
    if granularity == "layer":
      return y, x, dense(x, (True, True))               # H = F(x), the layer's output
    u = dense(x, (True, False))                         # the FFN block's input (after attention)
    return y, u, dense(u, (False, True)) - u            # H = R(u), the FFN branch output
  y, u, h = jax.tree.map(np.asarray, run(x))
  logits = _logits(params, u, name)
  t = 1.0 / (1.0 + np.exp(logits[..., :1] - logits[..., 1:]))            # σ(l₁ − l₀)
  assert 0.1 < t.mean() < 0.9 and t.std() > 0.05
  np.testing.assert_allclose(y, t * h + (1.0 - t) * u, atol=2e-5)
