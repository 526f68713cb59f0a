"""Smoke test of benchmarks/depth.py at a tiny size: every row is printed with positive ratios."""
import re

from benchmarks import depth


def test_depth_benchmark_prints_its_rows_and_ratios(capsys):
  rows = depth.main(["--layers=4", "--d_model=32", "--heads=2", "--d_ff=64", "--vocab=64", "--batch=2", "--seq=16",
                     "--new_tokens=4", "--repeats=1", "--kept=1,0.5"])
  out = capsys.readouterr().out
  assert [r["name"] for r in rows] == ["full", "pruned model (2 of 4 layers)", "plan 0,3", "plan 0,1,2a,3a (FFN off)"]
  assert [round(r["kept"], 6) for r in rows[:3]] == [1.0, 0.5, 0.5]
  assert 0.5 < rows[3]["kept"] < 1.0  # FFN off in two of four layers: between half and all of the layer FLOPs
  assert rows[0]["prefill_ratio"] == rows[0]["decode_ratio"] == 1.0
  for r in rows:
    assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["prefill_ratio"] > 0 and r["decode_ratio"] > 0
    line = next(l for l in out.splitlines() if l.startswith(f"| {r['name']} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 10 and re.fullmatch(r"(yes|no), (yes|no)", cells[-1])
    assert all(float(c.replace(",", "")) > 0 for c in cells[1:9])
  assert "pruned model ÷ plan (2 of 4 layers), time: prefill" in out
