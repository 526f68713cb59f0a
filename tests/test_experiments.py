"""Experiment scripts run end to end (tiny step counts; the figures in README come from full runs)."""
import json
import sys

from experiments import learned_vs_random


def test_learned_vs_random_smoke(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["learned_vs_random", f"--workdir={tmp_path}", "--steps=2",
                                    "--densities=0.25", f"--wikitext={tmp_path / 'absent'}"])
  learned_vs_random.main()
  summary = json.loads((tmp_path / "learned_vs_random.json").read_text())["final_eval"]
  assert set(summary) == {"synthetic_P0.25"}
  assert set(summary["synthetic_P0.25"]) == {"gumbel", "gumbel_sampled", "random", "none"}
  for router in ("gumbel", "gumbel_sampled", "random"):
    result = summary["synthetic_P0.25"][router]
    assert 0 < result["eval_loss"] < 10 and 0 <= result["eval_depth"] <= 8
  assert "eval_depth" not in summary["synthetic_P0.25"]["none"]  # dense: 2 layers, no routing
  assert (tmp_path / "learned_vs_random.png").stat().st_size > 0
