"""Smoke test of benchmarks/decode.py at a tiny size: every kind of row with consistent columns, and
the quantile threshold against a brute-force count."""
import re

import numpy as np

from benchmarks import decode
from skipjax.decode import early_exit as ee

L = 2


def test_quantile_threshold_lets_the_asked_fraction_exit_early():
  conf = np.random.default_rng(0).random((4, 3, 40))                                  # [P, B, T]
  rule = ee.ExitRule("softmax_max", min_layer=1)  # 4 positions: exits after 1 or 2
  lam, early, mean_exit = decode.quantile_threshold(conf, rule, 0.3)
  exit_at = []  # brute force: the first position p ≥ min_layer (not the last) with c_p ≥ λ
  for b in range(3):
    for t in range(40):
      exit_at.append(next((p for p in (1, 2) if conf[p, b, t] >= lam), 3))
  exit_at = np.asarray(exit_at)
  assert abs(np.mean(exit_at < 3) - 0.3) <= 1 / 120 + 1e-9
  assert early == np.mean(exit_at < 3) and mean_exit == exit_at.mean() + 1


def test_decode_benchmark_prints_every_kind_of_row(capsys):
  rows = decode.main([f"--layers={L}", "--d_model=16", "--heads=2", "--d_ff=32", "--vocab=32", "--prompt_len=2",
                      "--new_tokens=3", "--repeats=1", "--batches=1", "--rules=saturation", "--policies=propagate",
                      "--drafts=2", "--calib_tokens=8"])
  out = capsys.readouterr().out
  assert [r["kind"] for r in rows] == ["full", "exit", "speculative", "skiplayer"]
  full, exit_row, spec, skip = rows
  assert full["ratio"] == 1.0 and full["layers"] == L and full["agreement"] == 1.0
  assert spec["agreement"] == 1.0  # self-speculative decoding is exact
  assert 1 <= exit_row["exit_layer"] <= L and 0 <= exit_row["early"] <= 1 and 0 <= exit_row["agreement"] <= 1
  assert abs(exit_row["layers"] - exit_row["exit_layer"]) < 1e-6  # propagate runs exactly the positions up to the exit
  routed = float(re.search(r"routed (\d\.\d\d)", skip["note"]).group(1))
  assert 0 < skip["layers"] <= 2 * L and abs(skip["layers"] / (2 * L) - routed) <= 0.005
  assert skip["agreement"] is None and "analytic FLOPs floor" in skip["note"]
  assert re.search(r"saturation: λ = \S+, the 0\.50 quantile", out)
  for r in rows:
    assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["ratio"] > 0
    line = next(l for l in out.splitlines() if l.startswith(f"| 1 | {r['name']} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 9 and float(cells[2].replace(",", "")) > 0 and float(cells[3]) > 0
