"""The depth bench end to end on a reduced default preset, checked against independent computations."""
import json
import os

import numpy as np
import pytest

from configs import depthbench as depthbench_config
from skipjax import depthbench, models
from skipjax.depth import exits, importance
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune as prune_lib
from skipjax.depthbench import methods as methods_lib
from skipjax.profile import ratios as ratios_lib


def reduced_config(methods: str):
  c = depthbench_config.get_config("default")
  c.training.model.update(d_model=32, d_ff=64, num_layers=4)
  c.training.data.update(batch_size=16, seq_len=32)
  c.training.train.update(num_steps=20, eval_every_steps=20, checkpoint_every_steps=20, warmup_steps=2)
  c.data.update(seq_len=32, eval_sequences=8, calibration_sequences=4, batch_size=4, prompts=2, prompt_len=8,
                new_tokens=8)
  c.timing.update(repeats=1, prefill_len=32, decode_tokens=8)
  c.fractions = "0.75,0.5"
  c.methods = methods
  c.static.update(measures="ratio,sleb", heal_steps=0)
  c.early_exit.update(measures="softmax_max", policies="propagate,full")
  c.speculative.exit_fractions = "0.5"
  c.routers.densities = "0.5"
  c.random_seeds = 2
  return c


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bench"))
  config = reduced_config("static,healed,oracle,early_exit,self_speculative,mod")
  return workdir, config, depthbench.run(config, workdir)


def _base(workdir):
  source = prune_lib.load_source(os.path.join(workdir, "models", "base"))
  return importance.measuring_config(source.cfg), importance.loop_params(source.params), source


def _eval_batches(config, source):
  return prune_lib.calibration(source, "synthetic", config.data.seq_len, config.data.eval_sequences,
                               config.data.batch_size, seed=0)


def test_outputs_and_not_applicable(bench):
  workdir, _, res = bench
  for name in ("results.json", "results.md", "plots/pareto_depth.png", "plots/pareto_time.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert "heal_steps=0" in res["families"]["healed"]["reason"]
  md = open(os.path.join(workdir, "results.md")).read()
  assert "Not applicable here" in md and "**healed**" in md
  assert res["full"]["agreement"] == 1.0
  methods = {m for f in res["families"].values() for m in f.get("methods", {})}
  assert {"static_ratio", "static_sleb", "oracle_simulated", "oracle_applied", "early_exit_softmax_max_propagate",
          "early_exit_softmax_max_full", "self_speculative", "mod"} <= methods
  for f in res["families"].values():
    for pts in f.get("methods", {}).values():
      for p in pts:
        assert np.isfinite(p["nll"]) and 0 <= p["agreement"] <= 1 and p["depth"] > 0 and p["flops"] > 0
        assert p["prefill_ms"] > 0


def test_plan_points_equal_a_plain_forward(bench):
  """The full model and a static plan: the bench's NLL equals `importance.calibration_nll` (one
  jitted forward of the model built with the plan, not the per-block runner)."""
  workdir, config, res = bench
  cfg, params, source = _base(workdir)
  batches = _eval_batches(config, source)
  np.testing.assert_allclose(res["full"]["nll"], importance.calibration_nll(cfg, params, batches), rtol=1e-5)
  p = res["families"]["static"]["methods"]["static_sleb"][-1]
  plan = plan_lib.parse(p["plan"], cfg.num_layers)
  np.testing.assert_allclose(p["nll"], importance.calibration_nll(cfg, params, batches, plan=plan), rtol=1e-5)
  assert p["depth"] == len(plan)


def test_oracle_simulated_depth_is_the_count_of_ratios_above_t(bench):
  workdir, config, res = bench
  cfg, params, source = _base(workdir)
  model = models.build(cfg)
  r = np.concatenate([ratios_lib.residual_ratios(model, params, b["inputs"]).reshape(cfg.num_layers, 2, -1)
                      for b in _eval_batches(config, source)], -1)
  for p in res["families"]["oracle"]["methods"]["oracle_simulated"]:
    expected = (r >= p["threshold"]).mean(axis=(1, 2)).sum()                  # layers, ½ per block
    np.testing.assert_allclose(p["depth"], expected, rtol=1e-5)


def test_early_exit_full_policy_equals_the_per_layer_logits(bench):
  """`full`: every token's logits are the shared head at its exit of the full model's states, so its
  NLL is the per-layer NLL (`exits.layer_outputs`) gathered at the exits softmax_max picks."""
  workdir, config, res = bench
  cfg, params, source = _base(workdir)
  for p in res["families"]["early_exit"]["methods"]["early_exit_softmax_max_full"]:
    nll, n = 0.0, 0
    for b in _eval_batches(config, source):
      out = exits.layer_outputs(cfg, params, b["inputs"])
      logits = np.asarray(out.logits, np.float64)                              # [P, B, T, V]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      conf = probs.max(-1)                                                     # [P, B, T]
      early = conf[:-1] >= p["threshold"]
      at = np.where(early.any(0), early.argmax(0), cfg.num_layers - 1)         # [B, T]
      lp = np.log(np.take_along_axis(probs, b["targets"][None, ..., None], -1)[..., 0])  # [P, B, T]
      nll -= np.take_along_axis(lp, at[None], 0).sum()
      n += at.size
    np.testing.assert_allclose(p["nll"], nll / n, rtol=1e-4)


def test_self_speculative_is_exact_and_spends_at_least_the_full_depth(bench):
  _, _, res = bench
  (p,) = res["families"]["self_speculative"]["methods"]["self_speculative"]
  assert p["identical_to_greedy"]
  assert p["nll"] == res["full"]["nll"] and p["depth"] >= res["model"]["num_layers"]


def test_resume_reuses_finished_families_and_runs_new_ones(bench, capsys):
  workdir, config, res = bench
  config = reduced_config("oracle,skip_policy")
  again = depthbench.run(config, workdir)
  out = capsys.readouterr().out
  assert "oracle: reused" in out and "training" not in out
  assert again["families"]["oracle"] == res["families"]["oracle"]
  assert set(again["families"]["skip_policy"]["methods"]) == set(methods_lib.SKIP_POLICIES)
  assert json.load(open(os.path.join(workdir, "results.json")))["families"].keys() == {"oracle", "skip_policy"}


def test_bad_method_and_fractions_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match=r"config.methods: unknown method family 'nope'"):
    depthbench.run(reduced_config("static,nope"), str(tmp_path))
  c = reduced_config("static")
  c.fractions = "0.5,2"
  with pytest.raises(ValueError, match=r"config.fractions='0.5,2'"):
    depthbench.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written before the config is checked


def test_healed_points_and_their_control(bench):
  """Healing trains each pruned export and, as the control, the full model for the same steps; a
  healed point's NLL is its own model's plain forward."""
  workdir, config, _ = bench
  os.remove(os.path.join(workdir, "families", "healed.json"))  # was: not applicable (heal_steps=0)
  config = reduced_config("healed")
  config.static.heal_steps = 4
  res = depthbench.run(config, workdir)["families"]["healed"]["methods"]
  L = config.training.model.num_layers
  assert [p["depth"] for p in res["healed_bi"]] == [L - 1, L - 2]
  (control,) = res["healed_control"]
  assert control["depth"] == L and control["heal_steps"] == 4
  source = prune_lib.load_source(os.path.join(workdir, "models", "healed_bi_2"))
  cfg, params = importance.measuring_config(source.cfg), importance.loop_params(source.params)
  np.testing.assert_allclose(res["healed_bi"][1]["nll"],
                             importance.calibration_nll(cfg, params, _eval_batches(config, _base(workdir)[2])),
                             rtol=1e-5)


def test_agreement_is_top1_against_the_full_models_greedy_continuation(bench):
  """Recomputed without the bench: greedy continuation by plain full forwards (no KV cache), then
  the plan model's argmax at each continuation position given the full model's prefix."""
  workdir, config, res = bench
  cfg, params, source = _base(workdir)
  d = config.data
  prompts = np.concatenate([b["inputs"] for b in prune_lib.calibration(source, "synthetic", d.prompt_len, d.prompts,
                                                                        d.batch_size, seed=2)])[:, :d.prompt_len]
  full = models.build(cfg)
  seq = prompts
  for _ in range(d.new_tokens):
    nxt = np.asarray(full.apply({"params": params}, seq))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], 1)
  for p in (res["full"], res["families"]["static"]["methods"]["static_sleb"][-1]):
    planned = models.build(importance.with_plan(cfg, plan_lib.parse(p.get("plan", ""), cfg.num_layers)))
    top = np.asarray(planned.apply({"params": params}, seq[:, :-1])).argmax(-1)     # [N, Tp + Tn - 1]
    expected = (top[:, d.prompt_len - 1:] == seq[:, d.prompt_len:]).mean()
    np.testing.assert_allclose(p["agreement"], expected, rtol=1e-6)
