"""`config.init_from` into a model with an execution plan, and healing a pruned export.

A full 4-layer export initialises a model whose `config.model.plan` drops (or half-runs) a layer:
the blocks it runs get the source's parameters, the others are reported as not copied, and the
new model's loss is the source's loss under the same plan; any other unmatched parameter still
fails with one line.
"""
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import lm
from skipjax import models
from skipjax.convert import export
from skipjax.depth import plan as plan_lib, prune
from skipjax.train import init_from, loop, optim, state as state_lib
from skipjax.train.metrics import read_metrics

L = 4
SMALL = dict(model=dict(d_model=32, num_heads=2, num_layers=2, d_ff=64), data=dict(seq_len=16, batch_size=8),
             train=dict(num_steps=3, log_every_steps=1, eval_every_steps=3, eval_batches=1, checkpoint_every_steps=3,
                        keep_checkpoints=1, warmup_steps=1, progress_bar=False))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A random 4-layer decoder (random biases and norms too) exported as `skipjax.convert` does."""
  cfg = models.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=L, d_ff=64, max_len=64)
  shapes = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype),
                        nn.meta.unbox(shapes["params"]))
  return export.save(str(tmp_path_factory.mktemp("src") / "export"), cfg, params), cfg, params


def _config(path, plan=""):
  config = lm.get_config("tiny")
  for block, fields in SMALL.items():
    config[block].update(fields)
  config.init_from = path
  config.model.plan = plan
  return config


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def _fresh(config):
  """(model, fresh params, their shardings) of the run, as train_and_evaluate builds them."""
  init_from.apply_model_config(config)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(model, tx, jax.random.key(1),
                                                  jnp.zeros((1, config.data.seq_len), jnp.int32), _mesh())
  return model, state.params, shardings.params


def _nll(model, params, tokens):
  logits = model.apply({"params": params}, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return float(-jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.mark.parametrize("plan,not_copied", [("0,2,3", ["block_1"]), ("0,1a,2,3", ["block_1/ln_ffn", "block_1/mlp"])])
def test_full_source_into_a_plan_model(source, caplog, plan, not_copied):
  path, cfg, params = source
  config = _config(path, plan)
  model, fresh, shardings = _fresh(config)
  assert config.model.plan == plan and config.model.num_layers == L  # the run's plan, the source's depth
  with caplog.at_level(logging.INFO):
    got = init_from.overlay_params(path, fresh, shardings, model.config.execution_plan)
  lines = [r.getMessage() for r in caplog.records if "not copied" in r.getMessage()]
  assert len(lines) == 1 and lines[0].endswith("never runs " + ", ".join(not_copied)), lines
  want, have = _flat(params), _flat(got)
  assert set(have) < set(want)
  for name in want:
    if any(name.startswith(prefix + "/") for prefix in not_copied):
      assert name not in have, name
    else:
      np.testing.assert_array_equal(have[name], want[name], err_msg=name)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
  under_plan = models.build(models.TransformerConfig(**{**cfg.__dict__, "plan": plan}))
  assert _nll(model, got, tokens) == _nll(under_plan, params, tokens)
  assert _nll(model, got, tokens) != _nll(models.build(cfg), params, tokens)  # the plan changes the model


def _state(cfg, path):
  tx, _ = optim.make_optimizer(_config(path).train)
  state, shardings = state_lib.create_train_state(models.build(cfg), tx, jax.random.key(1),
                                                  jnp.zeros((1, 8), jnp.int32), _mesh())
  return state.params, shardings.params


def test_other_unmatched_parameters_still_fail(source):
  path, cfg, _ = source
  plan = plan_lib.parse("0,2,3", L)
  # scan layout: the source's block_0 (a block the plan runs) has no place in layers/block
  scanned = _state(models.TransformerConfig(**{**cfg.__dict__, "scan_layers": True}), path)
  with pytest.raises(ValueError, match=r"parameter block_0/.* of the source has no place in the model") as e:
    init_from.overlay_params(path, *scanned, plan)
  assert "\n" not in str(e.value)
  # a parameter outside the blocks (an untied source's lm_head into a tied model): refused under a plan too
  untied = models.TransformerConfig(**{**cfg.__dict__, "tie_embeddings": False})
  shapes = jax.eval_shape(lambda: models.build(untied).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  untied_path = export.save(path + "_untied", untied, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                                  nn.meta.unbox(shapes["params"])))
  planned = _state(models.TransformerConfig(**{**cfg.__dict__, "plan": "0,2,3"}), path)
  with pytest.raises(ValueError, match=r"parameter lm_head/.* of the source has no place in the model"):
    init_from.overlay_params(untied_path, *planned, plan)
  # without the plan (the previous behaviour) the dropped block is refused as well
  with pytest.raises(ValueError, match=r"parameter block_1/.* of the source has no place in the model"):
    init_from.overlay_params(path, *planned)


def test_plan_and_layerdrop_are_run_fields(source):
  path, cfg, _ = source
  stored = export.config_to_dict(models.TransformerConfig(**{**cfg.__dict__, "plan": "0,1a,3"}))
  stored["layerdrop"] = {"rate": 0.5}
  config = _config(path, "0,2,3")
  init_from.apply_model_config(config, stored)
  assert config.model.plan == "0,2,3"  # the run's own plan
  assert config.model.get("layerdrop") != {"rate": 0.5}
  config = _config(path, "")
  init_from.apply_model_config(config, stored)
  assert config.model.plan == "0,1a,3"  # unset: the source's (a branch-pruned export keeps its plan)


def test_healing_runs_on_a_pruned_export_and_on_a_plan(source, tmp_path):
  """Shortened LLaMA / Gromov healing: continued training of the pruned model with skipjax.train."""
  path, cfg, params = source
  new_cfg, new_params, _ = prune.pruned_model(cfg, params, [1])
  pruned = export.save(str(tmp_path / "pruned"), new_cfg, new_params)
  results = {}
  for name, config in (("pruned", _config(pruned)), ("plan", _config(path, "0,2,3"))):
    workdir = tmp_path / f"heal_{name}"
    results[name] = loop.train_and_evaluate(config, str(workdir))
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert json.loads((workdir / "config.json").read_text())["init_from"] == config.init_from
  # the same three layers, the same analytic compute: the plan counts only the blocks it runs
  assert results["plan"]["flops_per_token"] == pytest.approx(results["pruned"]["flops_per_token"])
  # step 1 of both starts from the same weights (blocks 0, 2, 3 of the source), so the first loss matches
  first = {name: read_metrics(str(tmp_path / f"heal_{name}"))[0]["loss"] for name in results}
  assert first["plan"] == pytest.approx(first["pruned"], rel=1e-5)
