"""Sharded training: (4,2) mesh vs one device, params sharded per the rules, optimizers."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm
from skipjax import models
from skipjax.train import optim, sharding, state as state_lib, step as step_lib


def _config(optimizer="adamw"):
  config = lm.get_config("tiny")
  config.model.update(vocab_size=64, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16)
  config.train.update(optimizer=optimizer, learning_rate=1e-2, warmup_steps=2, num_steps=10)
  return config


def _run_steps(config, mesh_shape, devices, num_steps=3):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=mesh_shape, axes=("data", "model"))), devices)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 16), jnp.int32), mesh)
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx),
                  in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)))
  tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
  losses = []
  for _ in range(num_steps):  # the same batch each step, so the loss must fall
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, sharding.batch_sharding(mesh))
    state, metrics = train(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_sharded_step_matches_single_device(optimizer):
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  config = _config(optimizer)
  single, single_losses = _run_steps(config, (1, 1), jax.devices()[:1])
  sharded, sharded_losses = _run_steps(config, (4, 2), jax.devices())
  # Tolerance: fp32 reductions are split differently across 8 devices (all-reduce order).
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  assert single_losses[-1] < single_losses[0]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(single.params)[0],
                          jax.tree.leaves(sharded.params)):
    name = jax.tree_util.keystr(path)
    if optimizer == "adafactor" and "['key']['bias']" in name:
      # dL/d(key bias) is analytically 0 (it adds a per-query constant to every logit), and
      # Adafactor's update g/sqrt(v) turns its rounding noise into O(lr) steps of random sign.
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=name)


def test_params_are_sharded_per_logical_rules():
  state, _ = _run_steps(_config(), (4, 2), jax.devices(), num_steps=1)
  p = state.params
  assert p["block_0"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, "model")
  assert p["block_0"]["mlp"]["wo"]["kernel"].sharding.spec == P("model", None)
  assert p["block_0"]["attn"]["query"]["kernel"].sharding.spec == P(None, "model", None)
  assert p["block_0"]["attn"]["out"]["kernel"].sharding.spec == P("model", None, None)
  assert p["embed"]["embedding"].sharding.spec == P("model", None)
  wi = p["block_0"]["mlp"]["wi"]["kernel"]
  assert {s.data.shape for s in wi.addressable_shards} == {(32, 32)}  # d_ff 64 split in 2
  # Adam moments follow their parameter's sharding.
  mu = state.opt_state[1][0].mu["block_0"]["mlp"]["wi"]["kernel"]
  assert mu.sharding.spec == P(None, "model")


def test_constant_then_rsqrt_schedule():
  cfg = _config("adafactor").train
  schedule = optim.constant_then_rsqrt(cfg)
  assert float(schedule(0)) == pytest.approx(cfg.learning_rate)
  assert float(schedule(cfg.warmup_steps * 4 - 1)) == pytest.approx(cfg.learning_rate / 2)


def test_adafactor_second_moment_decay_is_constant():
  """β2 = 0.99 at every step (LtS §3), unlike optax's default 1 - t^-0.8."""
  tx = optim.adafactor(lambda s: 1.0, 0.99)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  g = {"w": jnp.full((3,), 2.0)}
  for _ in range(3):
    _, state = tx.update(g, state, params)
  v = state[0].v["w"]
  expected = sum(0.01 * 0.99 ** k * 4.0 for k in range(3))  # v_t = β2 v + (1-β2) g²
  np.testing.assert_allclose(v, expected, rtol=1e-5)
