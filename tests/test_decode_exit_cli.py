"""`python -m skipjax.decode --exit=...` (issue 14 item 6): early-exit decoding from the CLI.

The CLI's decode.json is checked against `skipjax.decode.early_exit.generate` and plain greedy
`decode.generate` called directly on the in-memory (loop-layout) params of the export, which the
CLI reads back from a scanned export (so it also converts the layout). To keep the file fast, all
CLI runs go through one driver process (`_DRIVER`): `cli.run(main, argv)` per run, exactly what
`python -m skipjax.decode` does, with the flags reset in between; each run's exit status and
stderr are recorded.
"""
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import decode, models
from skipjax.convert import export
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.decode import early_exit as ee
from skipjax.depth import exit_heads
from skipjax.models import layout

L, V, NEW = 4, 280, 16
CFG = models.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=32,
                               position="learned", tie_embeddings=False, scan_layers=True)
LOOP = dataclasses.replace(CFG, scan_layers=False)
PROMPT = "the quick brown"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

_DRIVER = r"""
import contextlib, io, json, sys
from absl import flags
from skipjax import cli
from skipjax.decode.__main__ import main
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  err, out, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      cli.run(main, ["skipjax.decode"] + argv)
    except SystemExit as e:
      code = 0 if e.code is None else e.code
  results.append({"code": code, "stderr": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A scanned 4-layer export with a BPE tokenizer.json, and its loop-layout params in memory."""
  # random weights N(0, g²/fan_in) drawn in numpy from the param shapes (no init compile)
  rng, gain = np.random.default_rng(0), {"block_0": 3.0, "block_1": 2.0, "block_2": 1.5, "lm_head": 8.0}

  def draw(path, leaf):
    keys = [p.key for p in path]
    if keys[-1] in ("scale", "bias"):
      return np.full(leaf.shape, 1.0 if keys[-1] == "scale" else 0.0, np.float32)
    fan_in = 1 if keys[-1] == "embedding" else leaf.shape[0] if keys[-2] in ("query", "key", "value") else int(
        np.prod(leaf.shape[:-1]))
    return rng.normal(0.0, gain.get(keys[0], 1.0) / np.sqrt(fan_in), leaf.shape).astype(np.float32)

  shapes = jax.eval_shape(models.build(LOOP).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))
  tok = tokenizer_lib.BpeTokenizer.train(["the quick brown fox jumps over the lazy dog",
                                          "a stitch in time saves nine"] * 20, V)
  root = tmp_path_factory.mktemp("exit_cli")
  path = export.save(str(root / "export"), CFG, layout.to_scan(params, L),
                     extra={"tokenizer.json": json.loads(tok.to_str())})
  return path, params, tok, root


def _prompt(tok):
  return np.asarray(tok.encode_batch([PROMPT]), np.int32)                   # [1, Tp]


MAIN = ["--exit=learned", "--exit_threshold=0.5", "--exit_min_layer=1", "--exit_decay_tau=2.0",
        "--exit_policy=recompute", "--exit_max_pending=3"]
NEVER = ["--exit=softmax_max", "--exit_threshold=2", "--exit_policy=full"]


def _bad_cases(heads, bad_heads):
  """{expected text of the one-line error: flags}."""
  return {"--exit='foo'": ["--exit=foo"],
          "--exit_threshold needs --exit": ["--exit_threshold=0.3"],
          "--speculative cannot be combined with --exit": ["--exit=softmax_max", "--speculative=2,2"],
          "--decode_plan cannot be combined with --exit": ["--exit=entropy", "--decode_plan=0:2"],
          "--temperature cannot be combined with --exit": ["--exit=softmax_max", "--temperature=0.7"],
          "--exit_policy='lazy'": ["--exit=softmax_max", "--exit_policy=lazy"],
          "--exit_every=0": ["--exit=saturation", "--exit_every=0"],
          "--exit_min_layer=4 must be in 0..3": ["--exit=softmax_max", "--exit_min_layer=4"],
          "--exit=fixed needs --exit_fixed_layer": ["--exit=fixed"],
          "--exit=learned needs --exit_heads": ["--exit=learned"],
          "--exit_heads needs --exit=learned": ["--exit=entropy", f"--exit_heads={heads}"],
          f"exit heads file {bad_heads}": ["--exit=learned", f"--exit_heads={bad_heads}"],
          "config.model.max_len=32": ["--exit=softmax_max", "--max_new_tokens=40"]}


@pytest.fixture(scope="module")
def runs(exported):
  """Every CLI run of this file in one driver process: {name: (out folder, {code, stderr})}."""
  path, _, _, root = exported
  heads, bad_heads = str(root / "heads.npz"), str(root / "heads_bad.npz")
  # random learned heads (CALM §3.5 classifier shape): about half the tokens exit early
  exit_heads.save_exit_heads(heads, exit_heads.init_exit_heads(L, LOOP.d_model, seed=1, scale=0.3),
                             exit_heads.heads_meta(LOOP))
  exit_heads.save_exit_heads(bad_heads, {"w": np.zeros((L, 8), np.float32), "b": np.zeros((L,), np.float32)},
                             {"num_positions": L, "d_model": 8, "plan": "0:4"})
  cases = {"main": MAIN + [f"--exit_heads={heads}"], "never": NEVER, **_bad_cases(heads, bad_heads)}
  outs = {name: root / f"out_{i}" for i, name in enumerate(cases)}
  argvs = [[f"--workdir={path}", f"--prompt={PROMPT}", f"--max_new_tokens={NEW}", f"--out={outs[name]}", *argv]
           for name, argv in cases.items()]
  proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                        timeout=300, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")][-1]
  results = json.loads(line[len("RESULTS "):])
  return {name: (outs[name], res) for name, res in zip(cases, results)}, heads


def _record(runs, name):
  out, res = runs[0][name]
  assert res["code"] == 0, res["stderr"][-2000:]
  return json.load(open(out / "decode.json"))


def test_cli_record_equals_early_exit_generate(exported, runs):
  _, params, tok, _ = exported
  rec = _record(runs, "main")
  ex = rec["exit"]
  heads, _ = exit_heads.load_exit_heads(runs[1])
  model, prompt = models.build(LOOP), _prompt(tok)
  rule = ee.ExitRule("learned", threshold=0.5, min_layer=1, decay_tau=2.0)
  want = ee.generate(model, params, prompt, NEW, rule=rule, policy="recompute", max_pending=3, exit_heads=heads)
  full = decode.generate(model, params, prompt, NEW)
  assert rec["prompt_tokens"] == [int(t) for t in prompt[0]]
  assert rec["generated_tokens"] == [int(t) for t in want.generated[0]]
  assert rec["generated_text"] == tok.decode(want.generated[0])
  assert ex["exit_layer"] == [int(e) for e in want.exit_layer[0]]
  assert ex["layers_run"] == [e + 1 for e in ex["exit_layer"]]
  np.testing.assert_allclose(ex["confidence"], np.asarray(want.confidence[0]), rtol=1e-5, atol=1e-6)
  assert ex["recomputed"] == [int(r) for r in want.recomputed[0]]
  executed = np.asarray(want.executed[:, :, 0])                             # [N, P]
  np.testing.assert_array_equal(rec["executed_positions"], executed)
  np.testing.assert_array_equal(ex["executed_per_token"], executed.sum(axis=1))
  assert ex["full_greedy_tokens"] == [int(t) for t in full.generated[0]]
  same = np.asarray(want.generated[0]) == np.asarray(full.generated[0])
  assert ex["agreement"] == pytest.approx(float(same.mean()))
  assert ex["agreeing_prefix"] == (NEW if same.all() else int(np.argmin(same)))
  assert ex["mean_exit_layer"] == pytest.approx(float(np.mean(want.exit_layer)))
  np.testing.assert_allclose(ex["threshold_per_token"], [rule.threshold_at(t, NEW) for t in range(NEW)], rtol=1e-6)
  assert (ex["measure"], ex["policy"], ex["max_pending"], ex["min_layer"]) == ("learned", "recompute", 3, 1)
  assert ex["num_positions"] == L and ex["heads"] == runs[1]
  assert ex["tokens_per_s"] > 0 and ex["full_tokens_per_s"] > 0
  # not degenerate: mixed exits (never before min_layer), some recomputed K/V
  assert min(ex["exit_layer"]) >= 1 and 0 < np.mean(np.asarray(ex["exit_layer"]) < L - 1) < 1
  assert sum(ex["recomputed"]) > 0


def test_cli_threshold_2_agrees_with_greedy(exported, runs):
  _, params, tok, _ = exported
  ex = _record(runs, "never")["exit"]
  assert ex["agreement"] == 1.0 and ex["agreeing_prefix"] == NEW
  assert ex["exit_layer"] == [L - 1] * NEW and ex["executed_per_token"] == [float(L)] * NEW
  full = decode.generate(models.build(LOOP), params, _prompt(tok), NEW)
  assert ex["full_greedy_tokens"] == [int(t) for t in full.generated[0]]


def test_cli_bad_exit_flags_one_line_errors(runs):
  for name, (out, res) in runs[0].items():
    if name in ("main", "never"):
      continue
    lines = [x for x in res["stderr"].splitlines() if x.strip()]
    assert res["code"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, res["stderr"][-2000:])
    assert name in lines[0] and "Traceback" not in res["stderr"], (name, lines[0])
    assert not out.exists(), f"{name}: left {sorted(os.listdir(out))}"


def test_cli_exit_plot(runs):
  for name in ("main", "never"):
    out, res = runs[0][name]
    assert res["code"] == 0, res["stderr"][-2000:]
    assert (out / "plots" / "exit_layers.png").stat().st_size > 0
