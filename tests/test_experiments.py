"""Experiment scripts run end to end (tiny step counts; the figures in README come from full runs)."""
import argparse
import json

from _helpers import builtin_text

from experiments import learned_vs_random


def test_learned_vs_random_smoke(tmp_path):
  """Routed methods train and are evaluated (learned: argmax and sampled; MoD: causal and top-k) and
  timed; the summary's means are those of the per-seed runs."""
  import numpy as np
  learned_vs_random.main([f"--workdir={tmp_path}", "--steps=1", "--seeds=0", "--densities=0.25",
                          "--methods=learned_residual,mod", "--num_layers=1", "--d_model=32", "--batch_size=8",
                          "--seq_len=32", "--eval_batches=1", "--timing_repeats=0", f"--wikitext={tmp_path / 'absent'}"])
  result = json.loads((tmp_path / "learned_vs_random.json").read_text())
  summary = result["summary"]["synthetic_P0.25"]
  assert set(summary) == {"learned_residual", "mod"}
  assert set(summary["learned_residual"]) == {"argmax", "sampled"} and set(summary["mod"]) == {"causal", "top-k"}
  for method, kind in (("learned_residual", "argmax"), ("mod", "causal"), ("mod", "top-k")):
    fields = summary[method][kind]
    assert 0 < fields["eval_loss"]["mean"] < 10 and 0 <= fields["eval_executed_depth"]["mean"] <= 1
    per_seed = [r["eval_loss"] for r in result["runs"][f"synthetic_P0.25|{method}|{kind}"]]
    assert len(per_seed) == 1 and fields["eval_loss"]["mean"] == round(float(np.mean(per_seed)), 4)
  assert result["step_time"] == {}  # --timing_repeats=0; timed below on one method
  args = argparse.Namespace(methods=["mod"], num_layers=1, d_model=32, batch_size=8, seq_len=32, steps=1,
                            warmup_fraction=0.0, eval_batches=1, timing_repeats=1)
  times = learned_vs_random.step_times([0.25], args)
  assert set(times) == {"dense_full", "mod_P0.25"} and times["dense_full"]["vs_dense_full"] == 1.0
  assert all(t["ms"] > 0 for t in times.values())
  assert "| synthetic_P0.25 | MoD (top-k), r | causal |" in (tmp_path / "learned_vs_random.md").read_text()
  assert (tmp_path / "learned_vs_random.png").stat().st_size > 0


def test_record_keeps_every_seed_of_every_evaluation():
  """Each seed adds one entry per evaluation kind (the MoD causal rows once kept only the last seed)."""
  runs = {}
  for seed in range(3):
    for method in learned_vs_random.METHODS:
      evaluate = lambda seed=seed, **kw: {"eval_loss": float(seed), **{k: str(v) for k, v in kw.items()}}
      learned_vs_random.record(runs, "c", method, {"eval_loss": float(seed)}, evaluate)
  kinds = {"learned_paper": {"argmax", "sampled"}, "learned_residual": {"argmax", "sampled"},
           "mod": {"causal", "top-k"}, "mod_sigmoid": {"causal", "top-k"}, "random": {"argmax"}, "dense": {"dense"}}
  assert set(runs) == {("c", m, k) for m, ks in kinds.items() for k in ks}
  assert all([r["eval_loss"] for r in v] == [0.0, 1.0, 2.0] for v in runs.values())
  assert {r.get("mod_eval") for r in runs["c", "mod", "top-k"]} == {"topk"}
  assert {r.get("deterministic") for r in runs["c", "learned_paper", "sampled"]} == {"False"}


def test_static_pruning_smoke(tmp_path):
  """experiments/static_pruning.py end to end on a tiny random model: every stage runs, the
  plan runner's NLLs equal the model's own forward (direct NLL, importance.calibration_nll), its
  SLEB order / drop-one NLLs equal importance.sleb / ppl_drop_one, the pruned export equals its plan."""
  import numpy as np
  from experiments import static_pruning
  from skipjax import models
  from skipjax.convert import export
  from skipjax.depth import importance
  from skipjax.depth import plan as plan_lib
  from skipjax.profile import inputs
  data = tmp_path / "data"
  data.mkdir()
  (data / "valid.txt").write_text(builtin_text(0, 120))
  (data / "test.txt").write_text(builtin_text(1, 40))
  work = tmp_path / "work"
  static_pruning.main(["--model=tiny", f"--workdir={work}", f"--data_dir={data}", "--calib_sequences=4",
                       "--calib_len=32", "--test_sequences=4", "--test_len=32", "--batch_size=4",
                       "--fractions=0,0.25,0.5", "--heal=sleb:2", "--heal_batch=8",
                       "--heal_len=32", f"--copy_figures={tmp_path / 'figs'}"])
  res = json.loads((work / "results.json").read_text())
  for name in ("ppl_vs_removed", "removed_heatmap", "painters", "scores"):
    assert (work / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "figs" / f"static_pruning_tiny_{name}.png").stat().st_size > 0
  assert "| sleb |" in (work / "results.md").read_text()

  # Independent reference: the model's own forward on the same packed test tokens, NLL in numpy.
  cfg, params = export.restore(str(work / "tiny_model_4l"))
  tok = inputs.tokenizer_for(str(work / "tiny_model_4l"), cfg.vocab_size)
  test = inputs.text_batch(f"text:{data / 'test.txt'}", tok, 32, 4, encoder=False)
  calib = inputs.text_batch(f"text:{data / 'valid.txt'}", tok, 32, 4, encoder=False)
  logits = np.asarray(models.build(cfg).apply({"params": params}, test["inputs"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  direct = -np.take_along_axis(logp, test["targets"][..., None], -1).mean()
  np.testing.assert_allclose(res["base"]["test_nll"], direct, rtol=1e-5)
  assert res["curve"]["bi"][0]["n"] == 0 and res["curve"]["bi"][0]["nll"] == res["base"]["test_nll"]
  np.testing.assert_allclose(res["curve"]["bi"][0]["calib_nll"], res["base"]["calib_nll_model"], rtol=1e-5)
  np.testing.assert_allclose(res["base"]["calib_nll_runner_drop_mid"], res["base"]["calib_nll_model_drop_mid"],
                             rtol=1e-5)
  row = res["curve"]["bi"][-1]
  np.testing.assert_allclose(row["nll"], importance.calibration_nll(cfg, params, test, row["plan"], jit=False), rtol=1e-5)
  assert len(row["removed"]) == 2 and row["plan"] == plan_lib.to_string(plan_lib.drop(4, row["removed"]))

  # The fast SLEB / drop-one equal the library's (which compile one forward per plan).
  sleb = importance.sleb(cfg, params, calib, 2, jit=False)  # eager: tiny, no compile per plan
  assert res["scores"]["sleb"]["order"] == sleb.raw["order"]
  np.testing.assert_allclose(res["scores"]["sleb"]["nll"], sleb.raw["nll"], rtol=1e-5)
  np.testing.assert_allclose(res["scores"]["ppl"]["layer"], importance.ppl_drop_one(cfg, params, calib, jit=False).layer,
                             rtol=1e-5)

  heal = res["heal"]["sleb_2steps"]
  assert heal["removed"] == res["scores"]["sleb"]["order"][:1]
  np.testing.assert_allclose(heal["before_nll_export"], heal["before_nll"], rtol=1e-5)  # export == its plan
  assert np.isfinite(heal["after_nll"]) and heal["after_nll"] != heal["before_nll"] and len(heal["train_loss"]) == 2
  full = next(r for r in res["painters"] if r["name"] == "full")
  assert full["nll"] == res["base"]["test_nll"] and len(res["painters"]) >= 5


def test_gate_form_toy_prints_the_residual_form_with_the_relaxation_sign(capsys):
  """experiments/gate_form_toy.py (README's P1 table): the residual form's routed gradients all have the
  relaxation's sign; the paper form's do not."""
  from experiments import gate_form_toy
  gate_form_toy.main()
  out = capsys.readouterr().out
  assert "residual: right sign routed 1.000" in out and "paper: right sign routed 1.000" not in out
