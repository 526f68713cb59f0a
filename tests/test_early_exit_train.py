"""Early-exit training (issue 14 item 4; LayerSkip §4.2): `config.train.early_exit` in the train step.

References are independent of the Block interception in `skipjax.depth.exits.layer_outputs`:
exit l of sequence b is the loop-layout model whose plan keeps the positions ≤ l that ran for b
under LayerDrop (plan `0:l+1` when nothing dropped; a dropped position is y = x), run with the
step's rngs (the same dropout masks); the decisions come from the plain forward; CE in numpy
float64; gradients against a central difference; the curriculum masks from a loop over the
docstring's formulas and from hand-written cases; the weights from `exits.layerskip_scales`.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import lm
from skipjax import data as data_lib, models, validation
from skipjax.convert import export
from skipjax.depth import exits
from skipjax.models import layout
from skipjax.models.stack import sown_keep
from skipjax.train import loop, step as step_lib
from skipjax.train.metrics import read_metrics
from skipjax.train.state import TrainState

L, V, D, T, B = 3, 32, 16, 6, 4


def _cfg(**extra):
  return models.TransformerConfig(vocab_size=V, d_model=D, num_heads=2, num_layers=L, d_ff=32, max_len=16, **extra)


def _params(cfg, seed=0):
  """Random numpy params of `cfg` (shapes from eval_shape: nothing to compile), strong enough that
  every exit predicts differently."""
  shapes = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
    return ((0.3 if x.ndim >= 2 else 0.1) * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))


def _batch(seed=1):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.integers(0, V, (B, T)).astype(np.int32), "targets": rng.integers(0, V, (B, T)).astype(np.int32)}


def _np_ce(logits, targets):
  """Mean −log p(target) in float64, logits [..., T, V], targets [..., T]."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


def _step_fn(cfg, ee, lr=1.0, num_steps=20):
  """A jitted train step (SGD, lr): (params, step, batch) → (metrics, gradient)."""
  model, tx = models.build(cfg), optax.sgd(lr)
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, early_exit=ee, num_steps=num_steps))

  def run(params, step, batch):
    state = TrainState(step=np.int32(step), params=params, opt_state=tx.init(params))
    new, metrics = train(state, batch, jax.random.key(7))
    return jax.device_get(metrics), jax.tree.map(lambda a, b: (a - b) / lr, params, jax.device_get(new.params))
  return run


# -- curricula and weights ------------------------------------------------------------------------

def _loop_mask(curriculum, t, P, R, T_steps, every):
  """C(t, l) by the EarlyExitConfig docstring, one position at a time."""
  out = []
  for l in range(P):
    if curriculum == "rotational":
      k = (l - t) % R == 0
    elif curriculum == "gradual":
      k = t >= ((P - 1 - l) * T_steps) // (2 * P)
    else:
      k = True
    out.append(l == P - 1 or (k and (l + 1) % every == 0))
  return np.array(out)


def test_curriculum_masks_hand_written_cases():
  mask = lambda ee, t, P, n=16: np.asarray(ee.enabled_mask(t, P, n)).astype(int).tolist()
  rot = exits.EarlyExitConfig(enabled=True, curriculum="rotational", rotation=2)
  assert [mask(rot, t, 4) for t in range(3)] == [[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1]]
  rot3 = exits.EarlyExitConfig(enabled=True, curriculum="rotational", rotation=3)
  assert [mask(rot3, t, 5) for t in range(4)] == [[1, 0, 0, 1, 1], [0, 1, 0, 0, 1], [0, 0, 1, 0, 1], [1, 0, 0, 1, 1]]
  # gradual, P = 4, T = 16: position l from step ⌊(3 − l)·16/8⌋ = 6, 4, 2, 0
  grad = exits.EarlyExitConfig(enabled=True, curriculum="gradual")
  assert [mask(grad, t, 4) for t in (0, 1, 2, 3, 4, 5, 6, 15)] == [
      [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
  every = exits.EarlyExitConfig(enabled=True, every=2)
  assert mask(every, 0, 5) == [0, 1, 0, 1, 1]
  assert mask(exits.EarlyExitConfig(enabled=True), 3, 1) == [1]


def test_curriculum_masks_and_weights_match_the_definitions():
  steps = jnp.arange(15)                                   # traced steps (as state.step in the train step)
  for curriculum in exits.EARLY_EXIT_CURRICULA:
    for P in (1, 5):
      for R in (1, 3):
        for every in (1, 2):
          ee = exits.EarlyExitConfig(enabled=True, curriculum=curriculum, rotation=R, every=every, e_scale=0.5)
          masks = np.asarray(jax.vmap(lambda t: ee.enabled_mask(t, P, 13))(steps))           # [15, P]
          weights = np.asarray(jax.vmap(lambda t: ee.loss_weights(t, P, 13))(steps))
          for t in range(15):
            want = _loop_mask(curriculum, t, P, R, 13, every)
            np.testing.assert_array_equal(np.asarray(masks[t]), want, err_msg=f"{curriculum} P={P} R={R} t={t}")
            np.testing.assert_allclose(weights[t], exits.layerskip_scales(P, 0.5, want), rtol=1e-6, atol=1e-7)
  c = np.array([1, 0, 1, 1])
  for weights, e in (("uniform", np.ones(4)), ("last", np.eye(4)[-1]), ("0.5,1,2,4", np.array([0.5, 1, 2, 4])),
                     ((0.0, 1.0, 0.0, 2.0), np.array([0, 1, 0, 2.0]))):
    ee = exits.EarlyExitConfig(enabled=True, weights=weights, curriculum="rotational")
    np.testing.assert_allclose(ee.loss_weights(0, 4, 10), e * c / (e * c).sum(), rtol=1e-6)


# -- the train step's loss ------------------------------------------------------------------------

def test_train_step_loss_equals_the_models_under_plans():
  """Dropout, LayerDrop (unit='example', linear p_max=0.6) and scan_layers=True params at once: exit l
  of sequence b is the loop model whose plan keeps the positions ≤ l that ran for b (a dropped
  position is y = x), with the step's rngs (the same dropout masks); the loss is Σ_l ẽ_l·CE_l with
  the step's curriculum (rotational R=2 at step 3: positions 1, 2); the gradient (back in the scan
  layout) matches a central difference of the step's loss."""
  cfg = _cfg(dropout_rate=0.2, tie_embeddings=False, norm_type="rmsnorm", position="rope",
             layerdrop=dict(rate=0.6, schedule="linear"))
  params, batch = _params(cfg), _batch()
  ee = exits.EarlyExitConfig(enabled=True, weights="layerskip", e_scale=0.5, curriculum="rotational", rotation=2)
  run = _step_fn(dataclasses.replace(cfg, scan_layers=True), ee)
  scan_params = jax.device_get(layout.to_scan(params))
  metrics, grad = run(scan_params, 3, batch)
  assert "layers" in grad and "block_0" not in grad        # the exits split scan params; gradients come back

  rngs = step_lib.step_rngs(jax.random.key(7), jnp.asarray(3))
  plain = dataclasses.replace(cfg, layerdrop=models.config.LayerDropConfig())
  _, variables = jax.jit(functools.partial(models.build(cfg).apply, deterministic=False, rngs=rngs,
                                           mutable=["gates"]))({"params": params}, batch["inputs"])
  keep = np.asarray(sown_keep(variables["gates"]))                          # [P, B] this step's decisions
  assert keep[0].all() and not keep.all()                                   # p_0 = 0; something dropped
  plans = {(l, b): ",".join(str(p) for p in range(l + 1) if keep[p, b]) for l in range(L) for b in range(B)}
  distinct = sorted(set(plans.values()) | {"0"})

  @jax.jit
  def reference(p):
    """Rows are independent: the whole batch once per distinct plan; plan '0' also without dropout."""
    logits = [models.build(dataclasses.replace(plain, plan=plan)).apply(
        {"params": p}, batch["inputs"], deterministic=False, rngs=rngs) for plan in distinct]
    return logits, models.build(dataclasses.replace(plain, plan="0")).apply({"params": p}, batch["inputs"])
  logits, no_dropout = reference(params)
  under_plan = dict(zip(distinct, logits))
  ce = np.zeros(L)
  for (l, b), plan in plans.items():
    ce[l] += _np_ce(under_plan[plan][b], batch["targets"][b]) / B
  w = exits.layerskip_scales(L, 0.5, [0, 1, 1])            # (l − 3) mod 2 = 0 → l = 1; the last always
  np.testing.assert_allclose(metrics["exit_ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["exit_weights"], w, rtol=1e-6)
  assert metrics["loss"] == pytest.approx(float(np.dot(w, ce)), rel=1e-5)
  assert metrics["nll"] == pytest.approx(ce[-1], rel=1e-5)
  assert metrics["layerdrop_executed_fraction"] == pytest.approx(keep.mean())
  assert np.abs(np.asarray(no_dropout) - np.asarray(under_plan["0"])).max() > 1e-2   # dropout really was on
  assert abs(ce[0] - ce[-1]) > 1e-2                                                    # the exits differ
  # central difference of the step's loss along a random direction (same rngs: same masks and drops)
  direction = jax.tree.map(lambda a: np.random.default_rng(a.size).normal(size=a.shape).astype(np.float32),
                           scan_params)
  eps = 1e-3
  f = lambda e: float(run(jax.tree.map(lambda a, d: a + e * d, scan_params, direction), 3, batch)[0]["loss"])
  fd = (f(eps) - f(-eps)) / (2 * eps)
  analytic = sum(float(np.sum(g * d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  assert analytic == pytest.approx(fd, rel=2e-2, abs=1e-3)


def test_early_exit_training_lowers_the_first_exit_more_than_plain_training():
  """15 Adam steps on one batch from the same start: with every exit's loss on (uniform weights) the
  first exit's CE falls far more than with only the last exit's loss (plain training). One compiled
  step serves both: the gradual curriculum over T = 600 steps has only the last exit on before step
  ⌊1·600/6⌋ = 100 and every exit on from step 200, so the runs differ only in their first step."""
  cfg = _cfg()
  params, batch = _params(cfg, seed=4), _batch(4)
  tx = optax.adam(1e-2)
  ee = exits.EarlyExitConfig(enabled=True, weights="uniform", curriculum="gradual")
  train = jax.jit(functools.partial(step_lib.train_step, model=models.build(cfg), tx=tx, early_exit=ee, num_steps=600))
  final, first = {}, {}
  for name, start in (("early_exit", 200), ("plain", 0)):
    state = TrainState(step=np.int32(start), params=params, opt_state=jax.jit(tx.init)(params))
    for i in range(15):
      state, metrics = train(state, batch, jax.random.key(0))
      first.setdefault(name, jax.device_get(metrics))
    final[name] = np.asarray(metrics["exit_ce"])
  np.testing.assert_allclose(first["plain"]["exit_weights"], [0, 0, 1])
  np.testing.assert_allclose(first["early_exit"]["exit_weights"], [1 / 3] * 3, rtol=1e-6)
  assert float(first["plain"]["loss"]) == pytest.approx(float(first["plain"]["nll"]), rel=1e-6)
  initial = np.asarray(first["plain"]["exit_ce"])
  assert final["early_exit"][0] < initial[0] - 2.0         # measured 3.60 → 0.83
  assert final["early_exit"][0] < final["plain"][0] - 0.5  # measured 0.83 vs 2.03
  # the first exit trails the last one by less (measured 0.23 vs 1.37)
  assert final["early_exit"][0] - final["early_exit"][-1] < 0.5 * (final["plain"][0] - final["plain"][-1])


# -- the loop: init_from, metrics, eval -----------------------------------------------------------

def test_init_from_export_trains_with_early_exit(tmp_path):
  cfg = models.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=L, d_ff=64, max_len=64)
  params = _params(cfg)
  source = export.save(str(tmp_path / "export"), cfg, params)
  config = lm.get_config("early_exit")
  config.init_from = source
  config.model.layerdrop.rate = 0.0                         # step 1's exits are then the source's
  config.data.update(seq_len=16, batch_size=8)
  config.train.update(num_steps=2, log_every_steps=1, eval_every_steps=2, eval_batches=1, checkpoint_every_steps=2,
                      warmup_steps=1, progress_bar=False)
  final = loop.train_and_evaluate(config, str(tmp_path / "run"))
  records = read_metrics(str(tmp_path / "run"))
  first = records[0]
  batch = data_lib.get_dataset(config.data, split="train", seed=config.seed, workdir=str(tmp_path / "run")).batch(0)
  batch = {k: batch[k] for k in ("inputs", "targets")}
  want = np.asarray(jax.jit(lambda p, b: exits.per_layer_ce(cfg, p, b))(params, batch))
  np.testing.assert_allclose(first["exit_ce"], want, rtol=1e-4)
  assert first["nll"] == pytest.approx(float(want[-1]), rel=1e-4)
  np.testing.assert_allclose(first["exit_weights"], exits.layerskip_scales(L, 1.0, [1, 0, 1]), rtol=1e-6)
  assert first["loss"] == pytest.approx(float(np.dot(first["exit_weights"], want)), rel=1e-4)
  assert [final[f"eval_exit_loss_{l}"] for l in range(L)][-1] == pytest.approx(final["eval_loss"], rel=1e-6)
  assert final["eval_exit_loss_0"] != pytest.approx(final["eval_loss"], rel=1e-3)


# -- bad configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("enabled", "yes", r"config\.train\.early_exit\.enabled='yes' must be True or False"),
    ("weights", "bogus", r"config\.train\.early_exit\.weights='bogus' is not one of"),
    ("weights", "1,2", r"config\.train\.early_exit\.weights='1.0,2.0' has 2 weights, the plan has 4 positions"),
    ("weights", "1,2,3,0", r"config\.train\.early_exit\.weights='1,2,3,0': explicit weights must be"),
    ("e_scale", -1.0, r"config\.train\.early_exit\.e_scale=-1.0 must be a finite number >= 0"),
    ("curriculum", "cosine", r"config\.train\.early_exit\.curriculum='cosine' is not one of"),
    ("rotation", 0, r"config\.train\.early_exit\.rotation=0 must be an integer >= 1"),
    ("every", 1.5, r"config\.train\.early_exit\.every=1.5 must be an integer >= 1"),
    ("bogus", 1, r"config\.train\.early_exit\.bogus is not an early_exit field"),
    ("model.remat", True, r"needs config\.model\.remat=False"),
    ("model.layerdrop.unit", "batch", r"config\.model\.layerdrop\.unit='batch' .*use unit='example'"),
    ("model.layerdrop.at_inference", True, r"config\.model\.layerdrop\.at_inference=True with config\.train\.early"),
    ("model.model_type", "vit", r"config\.train\.early_exit\.enabled=True needs a decoder LM"),
])
def test_bad_fields_give_one_line_errors(field, value, match):
  config = lm.get_config("early_exit")
  if field.startswith("model."):
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    with node.unlocked():
      node[leaf] = value
  else:
    block = config.train.early_exit.to_dict()
    block[field] = value
    config.train.early_exit = ml_collections.ConfigDict(block)
  with pytest.raises(ValueError, match=match) as e:
    validation.validate(config, 8)
  assert "\n" not in str(e.value)
  # field checks run before init_from resolves the model (validate_train)
  if not field.startswith("model.") and (field, value) != ("weights", "1,2"):  # not a check against the model
    with pytest.raises(ValueError, match=match):
      validation.validate_train(config.train)


def test_exit_states_are_refused_under_batch_layerdrop():
  cfg = _cfg(layerdrop=dict(rate=0.5, unit="batch"))
  with pytest.raises(ValueError, match=r"unit='batch' .*use unit='example'"):
    exits.layer_outputs(cfg, {}, jnp.zeros((2, T), jnp.int32), deterministic=False,
                        rngs={"layerdrop": jax.random.key(0), "dropout": jax.random.key(1)})
  exits.exit_config(cfg)  # deterministic (eval): LayerDrop does not draw, the exits run
