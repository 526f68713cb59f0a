"""LayerDrop (Fan et al. 2019) with per-position rates (LayerSkip, Elhoushi et al. 2024) in the stack walk.

References: the empirical drop frequency against the Bernoulli rates; a dropped sequence against
the same sequence through the model whose plan omits the dropped positions (skipjax.depth.plan).
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _helpers
from configs import lm
from skipjax import decode, models, validation
from skipjax.depth import plan as plan_lib
from skipjax.models import layout, stack
from skipjax.models.config import LayerDropConfig
from skipjax.train import state as state_lib, step as step_lib

BASE = dict(vocab_size=37, d_model=16, num_heads=2, num_layers=4, d_ff=24, max_len=12)


def _cfg(layerdrop=None, **kw):
  return models.TransformerConfig(**{**BASE, **kw}, layerdrop=LayerDropConfig(**(layerdrop or {})))


def _tokens(batch=8, length=10, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, BASE["vocab_size"])


def _params(cfg, tokens):
  return nn.meta.unbox(models.build(cfg).init(jax.random.key(0), tokens)["params"])


# Eager applies: for these tiny models, op by op is ~10x cheaper than compiling one program per plan.
@functools.lru_cache(maxsize=None)
def _apply_fn(cfg, deterministic, jit):
  model = models.build(cfg)

  def fn(p, t, k):
    rngs = {} if k is None else {"layerdrop": k}
    out, state = model.apply({"params": p}, t, deterministic=deterministic, rngs=rngs, mutable=["gates"])
    return out, stack.sown_keep(state.get("gates", {}))
  return jax.jit(fn) if jit else fn


def _apply(cfg, params, tokens, key=None, deterministic=False, jit=False):
  """(logits, keep [P, B] or None); `jit`: one program for every key (lax.cond and scan compile eagerly too)."""
  return _apply_fn(cfg, deterministic, jit)(params, tokens, key)


def _without(plan, kept) -> str:
  """The plan with the dropped positions omitted ('0-': a single position running nothing, when none is kept)."""
  return plan_lib.to_string(tuple(e for e, k in zip(plan, kept) if k)) or "0-"


def _plain(cfg, params, tokens, plan=""):
  """The deterministic model without LayerDrop, under `plan`."""
  return models.build(dataclasses.replace(cfg, layerdrop=LayerDropConfig(), plan=plan)).apply({"params": params}, tokens)


# -- (1) the rates ---------------------------------------------------------------------------

def test_schedules_are_the_published_formulas():
  L = 5
  np.testing.assert_allclose(LayerDropConfig(rate=0.3).position_rates(L), [0.3] * L)
  np.testing.assert_allclose(LayerDropConfig(rate=0.4, schedule="linear").position_rates(L),
                             [0.4 * l / (L - 1) for l in range(L)])
  exp = LayerDropConfig(rate=0.4, schedule="exponential").position_rates(L)
  np.testing.assert_allclose(exp, [0.4 * (2.0 ** (l / (L - 1)) - 1) for l in range(L)])  # e^{l ln2/(L-1)} = 2^{l/(L-1)}
  assert exp[0] == 0.0 and math.isclose(exp[-1], 0.4) and all(np.diff(exp) > 0)
  assert LayerDropConfig(rate=0.2, rates="0.1,0,0.5").position_rates(3) == (0.1, 0.0, 0.5)  # explicit overrides


@pytest.mark.parametrize("layerdrop,unit", [
    (dict(rate=0.3), "example"),
    (dict(rate=0.6, schedule="linear"), "example"),
    (dict(rate=0.6, schedule="exponential"), "example"),
    (dict(rates="0.1,0.45,0,0.8"), "example"),
    (dict(rate=0.5, schedule="linear"), "batch"),
])
def test_drop_frequency_hits_the_rates(layerdrop, unit):
  cfg = _cfg(dict(layerdrop, unit=unit))
  rates = np.asarray(cfg.layerdrop.position_rates(cfg.num_layers))
  batch, seeds = (256, 4) if unit == "example" else (2, 600)
  tokens = _tokens(batch, 4)
  params = _params(cfg, tokens)
  model = models.build(cfg)
  keep_of = jax.jit(jax.vmap(lambda k: stack.sown_keep(model.apply(
      {"params": params}, tokens, deterministic=False, rngs={"layerdrop": k}, mutable=["gates"])[1]["gates"])))
  keep = np.asarray(keep_of(jax.random.split(jax.random.key(7), seeds)))  # [S, P, B]
  assert set(np.unique(keep)) <= {0.0, 1.0}
  if unit == "batch":
    assert (keep == keep[..., :1]).all()  # one decision for the whole batch
    drops = 1 - keep[..., 0]  # [S, P]
  else:
    drops = 1 - keep.transpose(0, 2, 1).reshape(-1, cfg.num_layers)  # [S·B, P]
  n = drops.shape[0]
  sigma = np.sqrt(rates * (1 - rates) / n)
  assert (np.abs(drops.mean(0) - rates) <= 4 * sigma + 1e-12).all(), (drops.mean(0), rates)
  if unit == "example":
    # Independent across sequences: a column of one draw is not constant where 0 < p (P(constant) ~ p^256),
    # and the joint drop rate of two positions is p_i·p_j (4 sigma).
    for p in np.flatnonzero(rates > 0):
      assert not (keep[:, p] == keep[:, p, :1]).all(axis=-1).any()
    i, j = np.argsort(rates)[-2:]
    joint, want = (drops[:, i] * drops[:, j]).mean(), rates[i] * rates[j]
    assert abs(joint - want) <= 4 * np.sqrt(want * (1 - want) / n)


# -- (2) a dropped sequence is the plan model without the dropped positions ------------------

@pytest.mark.parametrize("kw", [{}, {"plan": "0,1,1,3,2"},
                                {"norm": "post", "post_ln_skip": "ln", "final_norm": False}])
def test_dropped_sequence_equals_the_plan_that_omits_its_positions(kw):
  cfg = _cfg(dict(rate=0.5), **kw)
  plan = cfg.execution_plan
  tokens = _tokens()
  params = _params(cfg, tokens)
  checked = set()
  for seed in range(2):
    got, keep = _apply(cfg, params, tokens, jax.random.key(seed))
    keep = np.asarray(keep) > 0  # [P, B]
    assert keep.shape == (len(plan), tokens.shape[0])
    for kept in {tuple(k) for k in keep.T}:  # one reference per pattern, on the sequences that drew it
      rows = np.flatnonzero((keep.T == kept).all(axis=1))
      kept = np.asarray(kept)
      if cfg.norm == "post":  # post_ln_skip='ln': a dropped position is the block with no branch on ('p-')
        ref = plan_lib.to_string(tuple(e if k else dataclasses.replace(e, attn=False, ffn=False)
                                       for e, k in zip(plan, kept)))
      elif not kw and kept.any():
        ref = plan_lib.to_string(plan_lib.drop(cfg.num_layers, np.flatnonzero(~kept)))  # the per-example reference
      else:
        ref = _without(plan, kept)
      np.testing.assert_allclose(got[rows], _plain(cfg, params, tokens, ref)[rows], atol=2e-5,
                                 err_msg=f"seed {seed}, sequences {rows}, keep {kept}")
      checked.add(tuple(kept))
  assert len(checked) >= 6 and not all(k.all() for k in map(np.asarray, checked))  # several patterns, with drops


def test_encoder_drops_per_sequence():
  tcfg = models.TransformerConfig(**BASE, causal=False, norm="post", final_norm=False,
                                  layerdrop=LayerDropConfig(rate=0.5))
  enc = models.EncoderConfig(transformer=tcfg)
  model = models.build(enc)
  tokens = _tokens()
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
  got, state = model.apply({"params": params}, tokens, deterministic=False, rngs={"layerdrop": jax.random.key(3)},
                           mutable=["gates"])
  keep = np.asarray(stack.sown_keep(state["gates"]))
  assert 0 < keep.mean() < 1
  for b in range(tokens.shape[0]):
    kept = keep[:, b] > 0
    plan = tuple(e for e, k in zip(tcfg.execution_plan, kept) if k) or (plan_lib.PlanEntry(0, False, False),)
    ref = dataclasses.replace(enc, transformer=dataclasses.replace(tcfg, plan=plan_lib.to_string(plan),
                                                                  layerdrop=LayerDropConfig()))
    np.testing.assert_allclose(got[b:b + 1], models.build(ref).apply({"params": params}, tokens[b:b + 1]), atol=2e-5)


# -- (3) off means the plain model -------------------------------------------------------------

def test_rate_zero_and_deterministic_are_the_plain_model():
  tokens = _tokens()
  plain_cfg = _cfg()
  params = _params(plain_cfg, tokens)
  plain = _plain(plain_cfg, params, tokens)
  for layerdrop in (dict(rate=0.0), dict(rates="0,0,0,0"), dict(rate=0.0, schedule="exponential", unit="batch")):
    got, keep = _apply(_cfg(layerdrop), params, tokens, jax.random.key(1))
    assert keep is None
    np.testing.assert_array_equal(got, plain)
  got, keep = _apply(_cfg(dict(rate=0.5)), params, tokens, None, deterministic=True)  # eval: nothing drops, no rng
  assert keep is None
  np.testing.assert_array_equal(got, plain)


def test_at_inference_samples_when_deterministic():
  tokens = _tokens()
  cfg = _cfg(dict(rate=0.5, at_inference=True))
  params = _params(cfg, tokens)
  got, keep = _apply(cfg, params, tokens, jax.random.key(2), deterministic=True)
  keep = np.asarray(keep)
  assert 0 < keep.mean() < 1
  b = int(np.argmin(keep.sum(0)))  # a sequence with dropped positions
  kept = keep[:, b] > 0
  np.testing.assert_allclose(got[b:b + 1], _plain(cfg, params, tokens[b:b + 1], _without(cfg.execution_plan, kept)),
                             atol=2e-5)
  # eval_step passes the 'layerdrop' stream
  out = jax.jit(functools.partial(step_lib.eval_step, model=models.build(cfg)))(
      params, {"inputs": tokens, "targets": tokens}, jax.random.key(0))
  assert np.isfinite(float(out["nll_sum"]))


def test_decoding_never_drops():
  tokens = _tokens(2, BASE["max_len"])
  cfg = _cfg(dict(rate=0.5))
  model = models.build(cfg)
  params = _params(cfg, tokens)
  cache = decode.init_cache(model, tokens.shape[0])
  np.testing.assert_allclose(_helpers.decode_step_by_step(model, params, cache, tokens),
                             _plain(cfg, params, tokens), atol=3e-5)
  with pytest.raises(ValueError, match=r"layerdrop.at_inference=True is not supported with KV-cache decoding"):
    models.build(_cfg(dict(rate=0.5, at_inference=True))).apply(
        {"params": params, "cache": cache}, tokens[:, :1], decode=True, mutable=["cache"],
        rngs={"layerdrop": jax.random.key(0)})


# -- (4) unit='batch': a dropped position is not computed ---------------------------------------

def _cond_branches(jaxpr):
  """The `cond` equations of a jaxpr (recursively), each as its branches' printed jaxprs."""
  found = []

  def visit(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "cond":
        found.append([str(b) for b in eqn.params["branches"]])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("scan", [False, True])
def test_unit_batch_skips_the_compute_and_equals_the_plan_model(scan):
  tokens = _tokens()
  cfg = _cfg(dict(rate=0.5, unit="batch"), scan_layers=scan)
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)
  params = _params(loop_cfg, tokens)
  run_params = layout.to_layout(params, scan)
  model = models.build(cfg)
  jaxpr = jax.make_jaxpr(lambda p, k: model.apply({"params": p}, tokens, deterministic=False,
                                                  rngs={"layerdrop": k}))(run_params, jax.random.key(0))
  conds = _cond_branches(jaxpr)
  assert len(conds) == (1 if scan else cfg.num_layers)  # scanned: one cond in the scan body
  for branches in conds:  # lax.cond branches are (false, true): the skipped one has no matmul
    assert sorted(b.count("dot_general") for b in branches)[0] == 0
    assert max(b.count("dot_general") for b in branches) >= 6  # q, k, v, o, wi, wo
  patterns = set()
  for seed in range(4):
    got, keep = _apply(cfg, run_params, tokens, jax.random.key(seed), jit=True)
    keep = np.asarray(keep)
    assert (keep == keep[:, :1]).all()
    kept = keep[:, 0] > 0
    patterns.add(tuple(kept))
    np.testing.assert_allclose(got, _plain(loop_cfg, params, tokens, _without(cfg.execution_plan, kept)), atol=2e-5)
  assert len(patterns) >= 3


# -- (5) training ------------------------------------------------------------------------------

def test_train_step_uses_the_layerdrop_stream_and_logs_the_executed_fraction():
  unit = "batch"  # (per-example training is the same walk with jnp.where; its forward is checked above)
  config = lm.get_config("layerdrop")
  config.model.update(**BASE)
  config.model.layerdrop.update(rate=0.6, unit=unit)
  validation.validate_model(config.model)
  model = models.build(config.model)
  tokens = np.asarray(_tokens(8, 11))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = nn.meta.unbox(model.init(state_lib.init_rngs(jax.random.key(0)), batch["inputs"])["params"])
  tx = optax.sgd(0.1)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
  rng = jax.random.key(5)
  new, metrics = train(state, batch, rng)
  assert np.isfinite(float(metrics["loss"]))
  # The step's decisions are those of the 'layerdrop' stream of step_rngs(rng, step).
  rngs = step_lib.step_rngs(rng, state.step)
  keep = np.asarray(stack.sown_keep(model.apply(
      {"params": params}, batch["inputs"], deterministic=False, rngs=rngs, mutable=["gates"])[1]["gates"]))
  np.testing.assert_allclose(float(metrics["layerdrop_executed_fraction"]), keep.mean(), rtol=1e-6)
  # The other streams keep their pre-LayerDrop values (bit-for-bit resumption of older runs).
  dropout, gate = jax.random.split(jax.random.fold_in(rng, state.step))
  assert (jax.random.key_data(rngs["dropout"]) == jax.random.key_data(dropout)).all()
  assert (jax.random.key_data(rngs["gate"]) == jax.random.key_data(gate)).all()
  # A position dropped for every sequence gets no gradient: plain SGD leaves its block unchanged.
  assert unit == "example" or 0 < keep[:, 0].sum() < 4
  for p in range(4):
    moved = float(optax.tree.norm(jax.tree.map(jnp.subtract, new.params[layout.block_name(p)],
                                               params[layout.block_name(p)])))
    assert (moved == 0.0) == (keep[p].sum() == 0), (p, moved, keep[p])
  # Without the stream: one clear error.
  with pytest.raises(ValueError, match="got no 'layerdrop' rng"):
    model.apply({"params": params}, batch["inputs"], deterministic=False, rngs={"dropout": rng})


# -- (6) scanned layers ------------------------------------------------------------------------

@pytest.mark.parametrize("layerdrop", [dict(rate=0.0), dict(rate=0.5, schedule="linear"), dict(rate=0.5, unit="batch")])
def test_scan_takes_the_loops_decisions(layerdrop):
  tokens = _tokens()
  loop_cfg = _cfg(layerdrop)
  scan_cfg = dataclasses.replace(loop_cfg, scan_layers=True)
  params = _params(loop_cfg, tokens)
  for seed in range(1):
    key = jax.random.key(seed)
    loop_out, loop_keep = _apply(loop_cfg, params, tokens, key)
    scan_out, scan_keep = _apply(scan_cfg, layout.to_scan(params), tokens, key)
    if layerdrop["rate"] == 0:
      assert loop_keep is None and scan_keep is None
      np.testing.assert_array_equal(loop_out, _plain(loop_cfg, params, tokens))
    else:
      np.testing.assert_array_equal(scan_keep, loop_keep)
    np.testing.assert_allclose(scan_out, loop_out, atol=2e-5)


# -- (7) config errors -------------------------------------------------------------------------

@pytest.mark.parametrize("layerdrop,field", [
    (dict(rate=1.0), "rate"), (dict(rate=-0.1), "rate"), (dict(rate=float("nan")), "rate"),
    (dict(schedule="cubic"), "schedule"), (dict(unit="token"), "unit"), (dict(at_inference="yes"), "at_inference"),
    (dict(rates="0.1,x,0,0"), "rates"), (dict(rates="0.1,1.5,0,0"), "rates"), (dict(rates="0.1,0.2"), "rates"),
    (dict(ratez=0.1), "ratez"),
])
def test_bad_fields_give_one_line_naming_the_field(layerdrop, field):
  config = lm.get_config("tiny")
  config.model.update(num_layers=4)
  with config.unlocked():
    config.model.layerdrop = dict(layerdrop)
  for check in (lambda: validation.validate_model(config.model),
                lambda: models.TransformerConfig.from_dict(config.model)):
    with pytest.raises(ValueError) as e:
      check()
    assert f"config.model.layerdrop.{field}" in str(e.value) and "\n" not in str(e.value)


def test_unit_batch_refuses_routed_blocks():
  with pytest.raises(ValueError, match=r"layerdrop.unit='batch' needs a dense block"):
    _cfg(dict(rate=0.1, unit="batch"), skip=models.SkipConfig(router="top1", target_density=0.5))
  _cfg(dict(rate=0.1, unit="example"), skip=models.SkipConfig(router="top1", target_density=0.5))  # per example: fine
