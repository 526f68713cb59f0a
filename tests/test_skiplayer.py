"""SkipLayer in the model (LtS §2): dispatch equivalence, param tree, routed decoding, cond."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from skipjax import models

BASE = models.TransformerConfig(vocab_size=61, d_model=32, num_heads=4, num_layers=3, d_ff=64, max_len=16)


def _cfg(**skip):
  kw = dict(router="gumbel", dispatch="masked", target_density=0.5, granularity="layer", gsize=4,
            capacity_factor=2.0)
  return dataclasses.replace(BASE, skip=models.SkipConfig(**{**kw, **skip}))


def _params(model, tokens):
  return nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(2)}, tokens)["params"])


def _loss_and_grads(model, params, tokens):
  def loss(p):
    logits, state = model.apply({"params": p}, tokens, deterministic=False,
                                rngs={"gate": jax.random.key(3)}, mutable=["gates", "aux_loss"])
    return jnp.mean(logits ** 2) + sum(jax.tree.leaves(state["aux_loss"])), state
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("granularity", ["layer", "block", "ffn"])
def test_dispatch_methods_agree_in_the_model(granularity):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  ref_model = models.build(_cfg(granularity=granularity))
  params = _params(ref_model, tokens)
  (ref_loss, ref_state), ref_grads = _loss_and_grads(ref_model, params, tokens)
  for method in ("capacity", "grouped"):
    model = models.build(_cfg(granularity=granularity, dispatch=method))
    assert jax.tree.structure(_params(model, tokens)) == jax.tree.structure(params)
    (loss, state), grads = _loss_and_grads(model, params, tokens)
    assert float(jnp.max(jnp.stack(jax.tree.leaves(
        {k: v for k, v in state["gates"]["block_0"].items() if k.endswith("dropped_fraction")})))) == 0.0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_routing_metrics_and_capacity_loss_are_sown():
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 61)
  model = models.build(_cfg())
  (_, state), grads = _loss_and_grads(model, _params(model, tokens), tokens)
  gates = state["gates"]
  masks = models.per_layer(gates, "layer_mask")
  assert masks.shape == (3, 4, 16) and set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_allclose(models.per_layer(gates, "layer_density"), masks.mean(axis=(1, 2)), rtol=1e-6)
  r = masks.mean(axis=(1, 2))
  aux = jnp.stack([state["aux_loss"][f"block_{i}"]["layer_capacity_loss"][0] for i in range(3)])
  np.testing.assert_allclose(aux, 0.1 * (r - 0.5) ** 2, rtol=1e-5)  # λ (r_i − P)²
  assert float(jnp.abs(grads["block_0"]["router"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_all_routed_skiplayer_equals_the_dense_model(granularity):
  """Routers forced on (bias +100): every dispatch gives the dense model's logits, training mode."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  dense_model = models.build(BASE)
  for method in ("masked", "capacity", "grouped"):
    model = models.build(_cfg(granularity=granularity, dispatch=method))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[..., 1].set(100.0) if "router" in jax.tree_util.keystr(path)
        and "bias" in jax.tree_util.keystr(path) else x, _params(model, tokens))
    dense_params = {k: {n: v for n, v in sub.items() if not n.startswith("router")}
                    if k.startswith("block_") else sub for k, sub in params.items()}
    assert jax.tree.structure(dense_params) == jax.tree.structure(_params(dense_model, tokens))
    logits, _ = model.apply({"params": params}, tokens, deterministic=False, rngs={"gate": jax.random.key(5)},
                            mutable=["gates", "aux_loss"])
    np.testing.assert_allclose(logits, dense_model.apply({"params": dense_params}, tokens), atol=1e-6)


def test_random_gating_baseline_evaluates_at_density_p():
  """The random baseline draws Bernoulli(P) gates at eval too (no learned argmax to fall back on)."""
  from skipjax.train import step as step_lib
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 61)
  model = models.build(_cfg(router="random", target_density=0.25))
  batch = {"inputs": tokens, "targets": tokens}
  out = step_lib.eval_step(_params(model, tokens), batch, jax.random.key(5), model=model)
  depth = float(out["depth_sum"] / out["count"])  # executed layers per token, E = 3·0.25
  assert np.isfinite(float(out["nll_sum"])) and abs(depth - 0.75) < 0.2, depth


@pytest.mark.parametrize("granularity,batch", [("layer", 1), ("layer", 2), ("block", 1), ("ffn", 2)])
def test_routed_decoding_equals_full_forward_with_argmax_routing(granularity, batch):
  cfg = _cfg(granularity=granularity, router="top1")  # top1: Eq. 4 output scaling by g
  tokens = jax.random.randint(jax.random.key(1), (batch, 16), 0, 61)
  model = models.build(cfg)
  params = _params(model, tokens)
  params = _helpers.perturb_routers(params)  # mixed decisions, not all-on / all-off
  full, state = model.apply({"params": params}, tokens, mutable=["gates"])
  name = "layer_mask" if granularity == "layer" else "ffn_mask"
  masks = models.per_layer(state["gates"], name)
  assert 0.0 < float(masks.mean()) < 1.0, "routing decisions should be mixed"
  cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), decode=True)["cache"]
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True, mutable=["cache", "gates"]))
  outs, step_masks = [], []
  for t in range(tokens.shape[1]):
    logits, new = step(cache, tokens[:, t:t + 1])
    cache = new["cache"]
    outs.append(logits)
    step_masks.append(models.per_layer(new["gates"], name))
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
  np.testing.assert_array_equal(jnp.concatenate(step_masks, axis=-1), masks)


def _shapes(jaxpr, inside_cond=False, found=None):
  """(shape, inside a cond branch?) of every value produced in a jaxpr, recursively."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      found.append((tuple(getattr(v.aval, "shape", ())), inside_cond))
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _shapes(inner, inside_cond or eqn.primitive.name == "cond", found)
  return found


def test_batch1_decoding_skips_compute_with_cond():
  model = models.build(_cfg())
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = _params(model, tokens)
  cache = model.init(jax.random.key(0), tokens, decode=True)["cache"]
  closed = jax.make_jaxpr(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                                   mutable=["cache"]))(cache, tokens[:, :1])
  assert str(closed).count("cond[") == BASE.num_layers
  shapes = _shapes(closed.jaxpr)
  ffn_hidden = (1, 1, BASE.d_ff)
  # The gated-off layer's FFN (and attention query) exist only inside the cond branches.
  assert ffn_hidden in {s for s, inside in shapes if inside}
  assert ffn_hidden not in {s for s, inside in shapes if not inside}


def test_gate_override_and_oracle_threshold():
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  model = models.build(BASE)
  params = _params(model, tokens)
  dense = model.apply({"params": params}, tokens)
  ones = {f"block_{i}": {"attn": jnp.ones((2, 12)), "ffn": jnp.ones((2, 12))} for i in range(3)}
  np.testing.assert_allclose(model.apply({"params": params, "gate_override": ones}, tokens), dense, atol=1e-6)
  zeros = jax.tree.map(jnp.zeros_like, ones)
  skipped = model.apply({"params": params, "gate_override": zeros}, tokens)
  # Every block skipped: logits = head(LN_final(embeddings)).
  x = jnp.take(params["embed"]["embedding"], tokens, axis=0) + params["pos_embed"]["embedding"][:12]
  ln = nn.LayerNorm(epsilon=BASE.layer_norm_eps).apply({"params": params["ln_final"]}, x)
  np.testing.assert_allclose(skipped, ln @ params["embed"]["embedding"].T, atol=1e-5)
  oracle = models.build(dataclasses.replace(BASE, oracle_threshold=1e-9))
  np.testing.assert_allclose(oracle.apply({"params": params}, tokens), dense, atol=1e-6)
  oracle = models.build(dataclasses.replace(BASE, oracle_threshold=1e9))
  np.testing.assert_allclose(oracle.apply({"params": params}, tokens), skipped, atol=1e-6)


def test_capacity_loss_drives_every_layer_to_target_density():
  """LtS §2.1: start the routers at r ≈ 0.8 (bias init for P = 0.8) and train with P = 0.2."""
  import functools
  import optax
  from configs import skiplayer
  from skipjax import data
  from skipjax.train import step as step_lib
  from skipjax.train.state import TrainState

  config = skiplayer.get_config("tiny")
  config.model.update(vocab_size=64, d_model=32, num_heads=2, num_layers=4, d_ff=64)
  config.data.update(seq_len=32, batch_size=16)
  config.model.skip.update(density_warmup_steps=0)  # LtS: P from step 0
  start = models.build({**config.model.to_dict(), "skip": {**config.model.skip.to_dict(), "target_density": 0.8}})
  config.model.skip.update(target_density=0.2, aux_weight=1.0)
  model = models.build(config.model)
  tokens = jnp.zeros((1, 32), jnp.int32)
  params = nn.meta.unbox(start.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, tokens)["params"])
  tx = optax.adam(3e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  ds = data.get_dataset(config.data, split="train", seed=0)
  densities = []
  for i in range(300):
    batch = {k: v for k, v in ds.batch(i).items() if k in ("inputs", "targets")}
    state, metrics = train(state, batch, jax.random.key(2))
    densities.append(np.asarray(metrics["layer_density"]))
  assert np.all(densities[0] > 0.6), densities[0]
  final = np.mean(densities[-10:], axis=0)
  np.testing.assert_allclose(final, 0.2, atol=0.05)


def test_density_warmup_anneals_the_target_from_dense_to_p():
  """`skip.density_warmup_steps`: P_t = P + (1 − P)(1 − t/N), then P; in the capacity loss and for
  random gating, and the router's bias starts at the warm-up's start (σ(logit 0.99))."""
  from skipjax import routing
  from skipjax.train import step as step_lib
  from skipjax.train.state import TrainState
  import optax

  np.testing.assert_allclose([routing.scheduled_density(t, 0.25, 100) for t in (0, 50, 100, 400)],
                             [1.0, 0.625, 0.25, 0.25], rtol=1e-6)
  assert float(routing.scheduled_density(7, 0.25, 0)) == 0.25
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 61)
  batch = {"inputs": tokens, "targets": tokens}
  tx = optax.sgd(0.0)
  for router in ("gumbel", "random"):
    model = models.build(_cfg(router=router, target_density=0.25, density_warmup_steps=100))
    params = _params(model, tokens)
    if router == "gumbel":
      np.testing.assert_allclose(params["block_0"]["router"]["bias"], [0.0, np.log(0.99 / 0.01)], rtol=1e-5)
    for step, expected in ((0, 1.0), (50, 0.625), (100, 0.25)):
      state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params))
      _, metrics = step_lib.train_step(state, batch, jax.random.key(2), model=model, tx=tx)
      r = np.asarray(metrics["layer_density"])
      if router == "random":  # Bernoulli(P_t) gates
        np.testing.assert_allclose(r, expected, atol=0.15)
      else:  # λ Σ (r_i − P_t)² with r_i measured
        np.testing.assert_allclose(float(metrics["aux_loss"]), 0.1 * np.sum((r - expected) ** 2), rtol=1e-4)
  from configs import skiplayer
  from skipjax import validation
  config = skiplayer.get_config("tiny")
  config.model.skip.update(dispatch="capacity", density_warmup_steps=10)
  with pytest.raises(ValueError, match="density_warmup_steps"):
    validation.validate(config, 1)
