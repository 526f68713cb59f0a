"""FF activation-sparsity statistics (SS), the CATS threshold hook and `--mode=sparsity` of the profiler."""
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skipjax import models
from skipjax.layers import ffn_threshold
from skipjax.layers.mlp import MLP
from skipjax.profile import sparsity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hand example: 2 layers × 3 tokens × 4 neurons (token 2 is empty in both layers).
ACTIVE = np.array([
    [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]],   # layer 0
    [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]],   # layer 1
], bool)


def test_statistics_by_hand():
  np.testing.assert_allclose(float(sparsity.activation_sparsity(ACTIVE[0])), 4 / 12)
  np.testing.assert_allclose(float(sparsity.activation_sparsity(ACTIVE)), 7 / 24)
  np.testing.assert_allclose(np.asarray(sparsity.neuron_frequency(ACTIVE)),
                             [[2 / 3, 1 / 3, 0, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3]])
  # B = 2: layer 0 tokens have active blocks [1,1], [1,0], [0,0]; layer 1: [1,0], [0,1], [0,0]
  np.testing.assert_array_equal(np.asarray(sparsity.block_active(ACTIVE, 2)),
                                [[[1, 1], [1, 0], [0, 0]], [[1, 0], [0, 1], [0, 0]]])
  np.testing.assert_allclose(np.asarray(sparsity.block_sparsity(ACTIVE, 2)), [[1.0, 0.5, 0.0], [0.5, 0.5, 0.0]])
  # exempt E = 2 (one always-active block of 2), then blocks of 1: layer 0 token 0 → (2 + 1)/4
  np.testing.assert_allclose(np.asarray(sparsity.block_sparsity(ACTIVE, 1, exempt=2)),
                             [[0.75, 0.5, 0.5], [0.5, 1.0, 0.5]])
  # Dice / Jaccard of layers 0 and 1: token 0 {0,3} vs {0}: 2/3 and 1/2; token 1 disjoint: 0, 0;
  # token 2 has both sets empty and is left out.
  dice, jac = sparsity.layer_similarity(ACTIVE)
  np.testing.assert_allclose(dice, [[1, 1 / 3], [1 / 3, 1]], rtol=1e-6)
  np.testing.assert_allclose(jac, [[1, 1 / 4], [1 / 4, 1]], rtol=1e-6)
  # activity with a threshold: |a| ≥ t and a ≠ 0
  a = np.array([0.0, -0.2, 0.5, -1.0])
  np.testing.assert_array_equal(np.asarray(sparsity.active_mask(a)), [0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(sparsity.active_mask(a, 0.5)), [0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"block_size=3 does not divide d_ff − exempt = 4 − 0"):
    sparsity.block_sparsity(ACTIVE, 3)


def test_cats_thresholds_hit_the_target_and_zeroing_matches_numpy():
  rng = np.random.default_rng(0)
  values = (rng.standard_normal((3, 500, 40)) * np.array([0.5, 1.0, 3.0])[:, None, None]).astype(np.float32)
  for target in (0.5, 0.9):
    t = sparsity.cats_thresholds(values, target)
    zeroed = np.mean(np.abs(values) < t[:, None, None], axis=(1, 2))
    np.testing.assert_allclose(zeroed, target, atol=1 / values[0].size)
    kept = np.asarray(ffn_threshold.zero_small(jnp.asarray(values), jnp.asarray(t)[:, None, None]))  # [L, N, F]
    ref = np.where(np.abs(values) < t[:, None, None], 0, values)
    np.testing.assert_allclose(kept, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sparsity.activation_sparsity(kept != 0)), 1 - target, atol=1e-3)


@pytest.mark.parametrize("gated,site", [(False, "hidden"), (True, "hidden"), (True, "gate")])
def test_threshold_hook_on_one_mlp_matches_numpy(gated, site):
  mlp = MLP(6, 16, "silu" if gated else "relu", gated=gated)
  x = jax.random.normal(jax.random.key(1), (2, 5, 6))
  params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda p: 20 * p + 0.05, params)
  t = np.array([0.0, 0.3, 0.0], np.float32)  # layer_index 1 → t = 0.3
  with ffn_threshold.zero_below(jnp.asarray(t), site) as state:
    out = mlp.apply({"params": params}, x, 1)
  ffn_threshold.check_applied(state)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  xx = np.asarray(x, np.float64)
  lin = lambda n: xx @ p[n]["kernel"] + p[n]["bias"]
  if gated:
    g = lin("gate") / (1 + np.exp(-lin("gate")))
    a = (np.where(np.abs(g) < 0.3, 0, g) * lin("wi")) if site == "gate" else g * lin("wi")
  else:
    a = np.maximum(lin("wi"), 0)
  if site == "hidden":
    a = np.where(np.abs(a) < 0.3, 0, a)
  ref = a @ p["wo"]["kernel"] + p["wo"]["bias"]
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
  assert np.mean(a == 0) > 0.1  # the threshold really zeroed something
  dense = mlp.apply({"params": params}, x, 1)
  assert np.abs(np.asarray(dense) - ref).max() > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_threshold_hook_in_a_model_is_per_layer_and_off_by_default(scan):
  cfg = models.TransformerConfig(vocab_size=40, d_model=16, num_heads=2, num_layers=3, d_ff=32, activation="silu",
                                 mlp_gated=True, scan_layers=scan, max_len=16)
  model = models.build(cfg)
  tokens = (jnp.arange(16).reshape(2, 8) * 7) % 40
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])

  @jax.jit
  def run(params, t):
    """(dense, thresholded) logits."""
    with ffn_threshold.zero_below(t, "hidden") as state:
      out = model.apply({"params": params}, tokens)
    ffn_threshold.check_applied(state)
    return model.apply({"params": params}, tokens), out

  dense, same = run(params, jnp.zeros(3))
  np.testing.assert_allclose(np.asarray(same), np.asarray(dense), rtol=1e-6, atol=1e-6)
  # t = ∞ in layer 1 only ≡ layer 1's FF2 kernel zeroed (its FFN leaves only the FF2 bias)
  _, out = run(params, jnp.array([0.0, jnp.inf, 0.0]))
  if scan:
    mlp = params["layers"]["block"]["mlp"]
    zeroed_wo = {**mlp["wo"], "kernel": mlp["wo"]["kernel"].at[1].set(0)}
    zeroed = {**params, "layers": {"block": {**params["layers"]["block"], "mlp": {**mlp, "wo": zeroed_wo}}}}
  else:
    mlp = params["block_1"]["mlp"]
    zeroed = {**params, "block_1": {**params["block_1"], "mlp": {**mlp, "wo": {
        **mlp["wo"], "kernel": jnp.zeros_like(mlp["wo"]["kernel"])}}}}
  reference, _ = run(zeroed, jnp.zeros(3))
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out) - np.asarray(dense)).max() > 1e-4
  # the gate site needs a gated FFN: a model without one is an error, not a silent no-op (trace only)
  relu = models.build(dataclasses.replace(cfg, mlp_gated=False, activation="relu"))
  with ffn_threshold.zero_below(jnp.ones(3), "gate") as state:
    jax.eval_shape(lambda: relu.init_with_output(jax.random.key(0), tokens))
  with pytest.raises(ValueError, match="site 'gate' needs mlp_gated=True"):
    ffn_threshold.check_applied(state, "gate")


def _settings(**kw):
  base = dict(block_size=8, exempt=0, cats=(), site="hidden", calib_tokens=10_000, map_tokens=4, figure_layers=6)
  return ml_collections.ConfigDict({**base, **kw})


def test_profile_model_statistics_equal_a_direct_numpy_evaluation():
  """profile_model over 2 chunks = the statistics computed in numpy on the sown activations."""
  cfg = models.TransformerConfig(vocab_size=40, d_model=16, num_heads=2, num_layers=3, d_ff=32, activation="relu",
                                 max_len=16)
  model = models.build(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 40, (4, 9)).astype(np.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
  params = jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p + 0.02, params)
  res, arrays = sparsity.profile_model(cfg, params, batch, _settings(cats=(0.7,)), batch_size=2)
  logits, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["activations"]))(params, batch["inputs"])
  a = np.stack([np.asarray(state["activations"][f"block_{i}"]["mlp"]["ffn_hidden"][0]) for i in range(3)])
  active = (a != 0).reshape(3, -1, 32)  # [L, N, F]
  d = res["dense"]
  assert 0.2 < d["sparsity"] < 0.8
  np.testing.assert_allclose(d["sparsity_per_layer"], active.mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(arrays["dense/frequency"], active.mean(1), rtol=1e-6)
  blocks = active.reshape(3, -1, 4, 8).any(-1)
  np.testing.assert_allclose(d["block_sparsity_per_layer"], blocks.mean((1, 2)), rtol=1e-6)
  inter = np.einsum("lnf,mnf->lmn", active.astype(np.float64), active.astype(np.float64))
  size = active.sum(-1)
  total = size[:, None] + size[None]
  used = total > 0  # tokens where both sets are empty are left out
  dice = np.where(used, 2 * inter / np.maximum(total, 1), 0).sum(-1) / np.maximum(used.sum(-1), 1)
  np.testing.assert_allclose(np.asarray(d["dice"]), dice, rtol=1e-5)
  logp = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1).mean()
  np.testing.assert_allclose(d["perplexity"], np.exp(nll), rtol=1e-5)
  # CATS 0.7 calibrated on all tokens: layer 0 (whose input the thresholds do not change) has 30 % non-zero
  row = res["cats"][0]
  assert row["target_zero_fraction"] == 0.7 and row["calibration_tokens"] == 32
  np.testing.assert_allclose(row["sparsity_per_layer"][0], 0.3, atol=1 / active[0].size)
  assert row["sparsity"] < d["sparsity"] and np.isfinite(row["perplexity"])
  assert arrays["dense/maps"].shape == (3, 4, 4)


def test_cli_writes_figures_and_numbers(tmp_path):
  workdir = tmp_path / "work"
  cmd = [sys.executable, "-m", "skipjax.profile", "--mode=sparsity", "--config=configs/profile.py:tiny",
         f"--workdir={workdir}", "--config.sparsity.cats=(0.5,0.8)", "--config.num_sequences=4"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((workdir / "sparsity.json").read_text())
  res = summary["models"]["tiny_opt"]
  assert [r["target_zero_fraction"] for r in res["cats"]] == [0.5, 0.8]
  assert 0 < res["dense"]["sparsity"] < 1 and res["cats"][1]["sparsity"] < res["dense"]["sparsity"]
  assert len(res["dense"]["dice"]) == 2 and "perplexity_increase" in res["cats"][0]
  for fig in summary["figures"]:
    assert (workdir / fig).stat().st_size > 1000, fig
  names = {os.path.basename(f) for f in summary["figures"]}
  assert {"tiny_opt_dense_frequency.png", "tiny_opt_dense_similarity.png", "tiny_opt_dense_block_maps.png",
          "tiny_opt_cats_cost.png", "tiny_opt_cats_0.8_block_maps.png"} <= names
  with np.load(workdir / "sparsity.npz") as z:
    assert z["tiny_opt/dense/frequency"].shape == (2, 64)
    assert z["tiny_opt/cats_0.8/thresholds"].shape == (2,)


def test_bad_block_size_is_a_one_line_config_error(tmp_path):
  from configs import profile as profile_config  # pylint: disable=import-outside-toplevel
  config = profile_config.get_config("tiny")
  config.sparsity.block_size = 7
  with pytest.raises(ValueError, match=r"^config.sparsity.block_size=7 does not divide d_ff − exempt = 64 − 0$"):
    sparsity.run(config, str(tmp_path))
