"""End-to-end training: resume after SIGKILL replays the same losses; NaN stops cleanly."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import lm
from skipjax.train import loop
from skipjax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_layers=2",
         "--config.model.d_ff=64", "--config.data.seq_len=32", "--config.data.batch_size=8",
         "--config.train.log_every_steps=1", "--config.train.eval_every_steps=1000",
         "--config.train.checkpoint_every_steps=10", "--config.train.keep_checkpoints=3",
         "--config.train.warmup_steps=5", "--config.train.progress_bar=False"]


def _train_cmd(workdir, num_steps):
  return [sys.executable, "-m", "skipjax.train", "--config=configs/lm.py:tiny", f"--workdir={workdir}",
          f"--config.train.num_steps={num_steps}", *SMALL]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def _finished_checkpoints(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() else []


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_with_identical_losses(tmp_path):
  steps = 400
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  reference = tmp_path / "uninterrupted"
  subprocess.run(_train_cmd(reference, steps), cwd=ROOT, env=env, check=True, capture_output=True)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(killed, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not _finished_checkpoints(killed) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = _finished_checkpoints(killed)
  assert saved and saved[-1] < steps, f"the run must be killed mid-way after a checkpoint (saw {saved})"

  rerun = subprocess.run(_train_cmd(killed, steps), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  assert f"resumed from checkpoint step {saved[-1]}" in rerun.stderr
  expected, got = _losses(reference), _losses(killed)
  assert sorted(got) == list(range(1, steps + 1))  # no gaps, no duplicates
  # Same program, same restored state, same (seed, step) batches and rngs: bitwise on CPU.
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)])
  assert expected[steps] < expected[1]


def _tiny_config(**train):
  config = lm.get_config("tiny")
  config.model.update(d_model=32, num_heads=2, num_layers=2, d_ff=64)
  config.data.update(seq_len=32, batch_size=8)
  config.train.update(dict(num_steps=30, log_every_steps=10, eval_every_steps=15, eval_batches=2,
                           checkpoint_every_steps=10, progress_bar=False), **train)
  return config


def test_training_writes_metrics_checkpoints_plot_and_per_class_eval(tmp_path):
  final = loop.train_and_evaluate(_tiny_config(), str(tmp_path))
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [10, 15, 20, 30]
  assert records[-1]["loss"] < records[0]["loss"]
  assert {"eval_loss", "eval_perplexity", "eval_loss_easy", "eval_loss_hard", "eval_loss_noise"} <= set(final)
  assert math.isclose(final["eval_perplexity"], math.exp(final["eval_loss"]), rel_tol=1e-6)
  assert _finished_checkpoints(tmp_path) == [20, 30]
  assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["vocab_size"] == 64  # resolved from the data's vocabulary
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_text_source_training(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
  config = _tiny_config(num_steps=10, eval_every_steps=10)
  config.data.source = f"text:{corpus}"
  final = loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert final["eval_loss"] < math.log(257)


def test_non_finite_loss_stops_naming_the_committed_checkpoint(tmp_path):
  # Update 2 overflows (weight decay 1e38 · lr 10), so step 3's loss is NaN; orbax saves the
  # first step, then every third. (A non-finite update at a save step: tests/test_robust.py.)
  config = _tiny_config(num_steps=6, log_every_steps=1, checkpoint_every_steps=3, weight_decay=1e38,
                        learning_rate=10.0, warmup_steps=1)
  with pytest.raises(FloatingPointError, match=r"non-finite training loss \(loss=nan.* at step 3; stopped, "
                                               r"the last good checkpoint is step 1 in "):
    loop.train_and_evaluate(config, str(tmp_path))
  assert _finished_checkpoints(tmp_path) == [1]
  assert sorted(_losses(tmp_path)) == [1, 2]
  import orbax.checkpoint as ocp
  restored = ocp.CheckpointManager(str(tmp_path / "checkpoints")).restore(1)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))
