"""Robust runs (issue 12): NaN stop, workdir safety, one-line errors, no torch, fine-tuning.

Subprocess runs use `configs/lm.py:tiny` shrunk to a 2-layer d=32 model on one CPU device, so
each takes seconds; several are started at once where they do not depend on each other.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lm
from skipjax import data, models
from skipjax.convert import export
from skipjax.data import pipeline, tokenizer as tokenizer_lib
from skipjax.train import init_from, loop, optim, state as state_lib, tensorboard, workdir as workdir_lib
from skipjax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
       "TF_CPP_MIN_LOG_LEVEL": "3"}
SMALL = dict(model=dict(d_model=32, num_heads=2, num_layers=2, d_ff=64), data=dict(seq_len=32, batch_size=8),
             train=dict(num_steps=4, log_every_steps=1, eval_every_steps=4, eval_batches=1, checkpoint_every_steps=2,
                        keep_checkpoints=3, warmup_steps=2, progress_bar=False))
SMALL_FLAGS = [f"--config.{block}.{k}={v}" for block, fields in SMALL.items() for k, v in fields.items()]


def _config(**train):
  config = lm.get_config("tiny")
  for block, fields in SMALL.items():
    config[block].update(fields)
  config.train.update(train)
  return config


def _train_cmd(workdir, *flags):
  return [sys.executable, "-m", "skipjax.train", "--config=configs/lm.py:tiny", f"--workdir={workdir}",
          *SMALL_FLAGS, *flags]


def _start(cmd):
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out, err


def _run(cmd):
  return _finish(_start(cmd))


def _error_line(rc, err):
  """The one-line error of a failed entry point: exit status 1, no traceback."""
  assert rc == 1, err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, err[-2000:]
  return lines[0]


def _committed(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


_TRAIN_SCRIPT = """
import sys
from configs import lm
from skipjax.train import loop
config = lm.get_config("tiny")
for block, fields in {small}.items():
  config[block].update(fields)
loop.train_and_evaluate(config, sys.argv[1])
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("torch not imported")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4), trained in a fresh interpreter."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT.format(small=repr(SMALL)), str(workdir)], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout


def _copy(trained_dir, tmp_path, name="copy"):
  dst = tmp_path / name
  shutil.copytree(trained_dir, dst)
  return dst


# -- 4. no torch; TensorBoard events readable --------------------------------------------------

def test_training_never_imports_torch_and_writes_readable_events(trained):
  workdir, stdout = trained
  assert "torch not imported" in stdout
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
  (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
  ours = {(step, tag): value for step, tag, value in tensorboard.read_scalars(str(events))}
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4]
  for step, loss in losses.items():
    assert ours[(step, "loss")] == pytest.approx(loss, rel=1e-6)
  # An independent protobuf parser (tensorboardX's compiled tensorflow Event proto).
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  records = list(tensorboard.read_records(str(events)))
  first = event_pb2.Event.FromString(records[0])
  assert first.file_version == "brain.Event:2"
  parsed = {}
  for record in records[1:]:
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      parsed[(event.step, value.tag)] = value.simple_value
  assert parsed == ours
  assert parsed[(4, "eval_loss")] > 0


# -- 1. NaN/inf stop keeps a good checkpoint ---------------------------------------------------

def test_update_that_makes_weights_non_finite_is_never_saved(tmp_path):
  """Step 2's loss is finite but its update overflows (weight decay 1e38 · lr 10): step 2 must
  not be saved, the message must name step 1, which really committed, and it restores finite."""
  workdir = tmp_path / "nan"
  rc, _, err = _run(_train_cmd(workdir, "--config.train.num_steps=6", "--config.train.checkpoint_every_steps=1",
                               "--config.train.weight_decay=1e38", "--config.train.learning_rate=10",
                               "--config.train.warmup_steps=1"))
  line = _error_line(rc, err)
  assert "non-finite parameters after the update at step 2" in line
  assert f"last good checkpoint is step 1 in {workdir / 'checkpoints'}" in line
  assert _committed(workdir) == [1]
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]  # nothing in flight was lost
  restored = ocp.CheckpointManager(str(workdir / "checkpoints")).restore(1)
  leaves = jax.tree.leaves(restored["params"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


# -- 3. one-line errors at every entry point ---------------------------------------------------

def test_entry_points_print_one_line_errors(trained, tmp_path):
  workdir, _ = trained
  cases = {
      "lr=1e6": (_train_cmd(tmp_path / "a", "--config.train.learning_rate=1e6"),
                 "config.train.learning_rate=1000000.0 must be in (0.0, 10.0]"),
      "lr=1e39": (_train_cmd(tmp_path / "b", "--config.train.learning_rate=1e39"), "config.train.learning_rate=1e+39"),
      "eval_batches=0": (_train_cmd(tmp_path / "c", "--config.train.eval_batches=0"),
                         "config.train.eval_batches=0 must be >= 1"),
      "preset": (_train_cmd(tmp_path / "d")[:3] + ["--config=configs/lm.py:huge", f"--workdir={tmp_path / 'd'}"],
                 "unknown preset 'huge'"),
      "field": (_train_cmd(tmp_path / "e", "--config.train.lerning_rate=1"), "--config.train.lerning_rate"),
      "step": ([sys.executable, "-m", "skipjax.decode", f"--workdir={workdir}", "--step=3", "--prompt_tokens=1,2"],
               "--step=3: no such checkpoint"),
      "prompt": ([sys.executable, "-m", "skipjax.decode", f"--workdir={workdir}", "--prompt_tokens=1,x,3"],
                 "--prompt_tokens='1,x,3': 'x' is not an integer token id"),
      "workdir": ([sys.executable, "-m", "skipjax.decode", f"--workdir={tmp_path / 'none'}", "--prompt_tokens=1"],
                  "is not a folder"),
      "convert": ([sys.executable, "-m", "skipjax.convert", f"--hf={tmp_path / 'none'}", f"--out={tmp_path / 'o'}"],
                  str(tmp_path / "none")),
      "profile": ([sys.executable, "-m", "skipjax.profile", "--config=configs/profile.py:tiny",
                   "--config.num_sequences=0x", f"--workdir={tmp_path / 'p'}"], "--config.num_sequences"),
  }
  procs = {name: _start(cmd) for name, (cmd, _) in cases.items()}
  for name, proc in procs.items():
    line = _error_line(*_finish(proc)[::2])
    assert cases[name][1] in line, (name, line)
  assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "config.json").exists()
  assert not (tmp_path / "o").exists()
  # --traceback shows the traceback instead.
  rc, _, err = _run(_train_cmd(tmp_path / "a", "--config.train.learning_rate=1e6", "--traceback"))
  assert rc != 0 and "Traceback (most recent call last)" in err and "ValueError" in err


# -- 2. workdir safety ------------------------------------------------------------------------

def test_changed_config_is_refused_before_anything_is_touched(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "tensorboard" not in str(p)}
  rc, _, err = _run(_train_cmd(workdir, "--config.model.num_layers=3", "--config.train.b2=0.99"))
  line = _error_line(rc, err)
  assert "config.model.num_layers: 2 -> 3" in line and "config.train.b2: 0.95 -> 0.99" in line
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "tensorboard" not in str(p)}
  before.pop(workdir / "run.lock", None), after.pop(workdir / "run.lock", None)
  assert after == before  # config.json, metrics and checkpoints untouched


def test_corrupt_latest_checkpoint_falls_back_and_allowed_change_resumes(trained, tmp_path):
  """Step 4 is corrupted: the resumed run says so, moves it aside, restarts from step 2 and
  logs steps 3–4 again identically (no duplicate lines); num_steps may change on resume."""
  reference = _losses(trained[0])
  workdir = _copy(trained[0], tmp_path)
  for f in (workdir / "checkpoints" / "4").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
      f.write_bytes(b"\0garbage" * 8)
  rc, _, err = _run(_train_cmd(workdir, "--config.train.num_steps=5"))
  assert rc == 0, err[-3000:]
  assert "cannot restore checkpoint step 4" in err and "falling back to step 2" in err
  assert list((workdir / "corrupt_checkpoints").iterdir())  # moved aside, not deleted
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5]
  # Steps 3-4 replayed from step 2 give the same losses (they use learning rates of steps 1-3,
  # which num_steps=5 does not change: warm-up, then the cosine's start).
  np.testing.assert_array_equal([losses[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)])
  assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 5


def test_second_run_in_a_workdir_is_refused_and_a_killed_runs_lock_is_not(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  with workdir_lib.WorkdirLock(str(workdir)):
    rc, _, err = _run(_train_cmd(workdir))
  line = _error_line(rc, err)
  assert f"is in use by another run (pid {os.getpid()}" in line
  # A run SIGKILLed while holding the lock leaves the file (with its pid) but not the lock.
  killed = subprocess.run([sys.executable, "-c", "import os, sys; from skipjax.train.workdir import WorkdirLock; "
                           "WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)", str(workdir)],
                          cwd=ROOT, env=ENV)
  assert killed.returncode == -signal.SIGKILL
  assert (workdir / "run.lock").read_text().startswith("pid ")
  with workdir_lib.WorkdirLock(str(workdir)):
    pass


def test_kill_before_first_checkpoint_then_rerun_logs_each_step_once(trained, tmp_path):
  """SIGKILL after 3+ logged steps and before any save, plus a torn last line: the rerun (with
  fewer steps, an allowed change) logs steps 1..4 once each, equal to an uninterrupted run."""
  workdir = tmp_path / "killed"
  long_run = ("--config.train.num_steps=4000", "--config.train.checkpoint_every_steps=4000",
              "--config.train.eval_every_steps=4000")
  proc = subprocess.Popen(_train_cmd(workdir, *long_run),
                          cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 200
  while proc.poll() is None and time.time() < deadline and (
      not metrics.exists() or metrics.read_text().count("\n") < 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert metrics.read_text().count("\n") >= 3 and _committed(workdir) == []
  with open(metrics, "a", encoding="utf-8") as f:
    f.write('{"step": 6, "lo')  # what a kill in the middle of a write leaves
  rc, _, err = _run(_train_cmd(workdir))
  assert rc == 0, err[-3000:]
  losses, reference = _losses(workdir), _losses(trained[0])
  assert [r["step"] for r in read_metrics(str(workdir))] == [1, 2, 3, 4]
  np.testing.assert_array_equal([losses[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)])


def test_stale_bpe_tokenizer_from_another_source_is_refused(tmp_path):
  corpus_a, corpus_b = tmp_path / "a.txt", tmp_path / "b.txt"
  corpus_a.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
  corpus_b.write_text("lorem ipsum dolor sit amet consectetur\n" * 50, encoding="utf-8")
  config = data.default_config()
  config.update(source=f"text:{corpus_a}", tokenizer="bpe", bpe_vocab_size=300, seq_len=16, batch_size=2)
  workdir = tmp_path / "w"
  first = data.get_dataset(config, "train", workdir=str(workdir))
  assert json.loads((workdir / tokenizer_lib.SOURCE_FILE).read_text())["source"] == f"text:{corpus_a}"
  pipeline._streams.clear(), pipeline._tokenizers.clear()  # pylint: disable=protected-access
  assert data.get_dataset(config, "train", workdir=str(workdir)).tokenizer.fingerprint == first.tokenizer.fingerprint
  config.source = f"text:{corpus_b}"
  with pytest.raises(ValueError, match=r"tokenizer.json' was trained on other data \(config.data: source: ") as e:
    data.get_dataset(config, "train", workdir=str(workdir))
  assert "\n" not in str(e.value)
  (workdir / tokenizer_lib.SOURCE_FILE).unlink()  # a tokenizer.json whose source is unknown
  with pytest.raises(ValueError, match=r"has no tokenizer_source.json"):
    data.get_dataset(config, "train", workdir=str(workdir))


# -- 5. fine-tuning from a checkpoint ---------------------------------------------------------

def _export(tmp_path):
  """A random 2-layer decoder exported as `python -m skipjax.convert` does."""
  cfg = models.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=64,
                                 tie_embeddings=False)
  model = models.build(cfg)

  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  rng = np.random.default_rng(3)  # random biases and norms too, so copying every parameter matters
  params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes["params"])
  return export.save(str(tmp_path / "export"), cfg, params), cfg, params


def _fresh_state(config):
  """The state a new run starts from (what train_and_evaluate builds before step 1)."""
  init_from.apply_model_config(config)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  state, shardings = state_lib.create_train_state(model, tx, jax.random.split(jax.random.key(config.seed))[0],
                                                  jnp.zeros((1, config.data.seq_len), jnp.int32), mesh)
  return model, state.replace(params=init_from.overlay_params(config.init_from, state.params, shardings.params))


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_init_from_export_reproduces_its_logits_at_step_0(tmp_path):
  path, cfg, params = _export(tmp_path)
  config = _config()
  config.init_from = path
  model, state = _fresh_state(config)
  assert config.model.d_model == 32 and config.model.tie_embeddings is False  # taken from the source
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  np.testing.assert_array_equal(jax.jit(model.apply)({"params": state.params}, tokens),
                                jax.jit(models.build(cfg).apply)({"params": params}, tokens))


def test_fine_tune_routers_only_keeps_the_rest_bit_identical(tmp_path):
  path, _, params = _export(tmp_path)
  config = _config(num_steps=3, checkpoint_every_steps=3, trainable=".*router.*", learning_rate=0.01)
  config.init_from = path
  config.model.skip.update(router="gumbel", target_density=0.5)
  workdir = tmp_path / "ft"
  loop.train_and_evaluate(config, str(workdir))
  manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
  assert manager.all_steps() == [1, 3]  # orbax saves the first step, then every third
  step1, got = _flat(manager.restore(1)["params"]), _flat(manager.restore(3)["params"])
  want = _flat(params)
  routers = sorted(set(got) - set(want))
  assert routers and all("router" in n for n in routers)
  for name, value in want.items():  # frozen: bit-identical to the export after 3 steps
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  for name in routers:  # trained: every router parameter moved between steps 1 and 3
    assert not np.array_equal(np.asarray(got[name]), np.asarray(step1[name])), name
  first = read_metrics(str(workdir))[0]
  assert 0 < first["num_trainable_params"] < first["num_params"]
  assert first["num_trainable_params"] == sum(int(np.prod(np.shape(got[n]))) for n in routers)
  assert json.loads((workdir / "config.json").read_text())["init_from"] == path


def test_init_from_workdir_and_bad_sources(trained, tmp_path):
  workdir = trained[0]
  config = _config()
  config.init_from = str(workdir)
  assert init_from.source_kind(str(workdir)) == "workdir"
  _, state = _fresh_state(config)
  saved = ocp.CheckpointManager(str(workdir / "checkpoints")).restore(4)["params"]
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = _config()
  config.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=r"config.init_from=.*missing' does not exist"):
    loop.train_and_evaluate(config, str(tmp_path / "w1"))
  config = _config(trainable="nothing.*")
  with pytest.raises(ValueError, match=r"config.train.trainable='nothing.\*' matches no parameter"):
    loop.train_and_evaluate(config, str(tmp_path / "w2"))
  config = _config(trainable="(")
  with pytest.raises(ValueError, match=r"config.train.trainable='\(' is not a valid regex"):
    loop.train_and_evaluate(config, str(tmp_path / "w3"))


def test_resume_reads_fields_added_since_the_run_as_their_old_behaviour():
  """A config.json written before plans / LayerDrop / early-exit training existed resumes unchanged."""
  config = lm.get_config("tiny")
  stored = json.loads(config.to_json())
  del stored["model"]["plan"], stored["model"]["layerdrop"], stored["train"]["early_exit"]
  assert workdir_lib.config_changes(stored, config) == []
  with config.unlocked():
    config.train.early_exit.enabled = True
  assert workdir_lib.config_changes(stored, config) == [("train.early_exit.enabled", False, True)]


def test_a_config_json_of_an_older_commit_resumes_unchanged():
  """The tiny preset's config.json as written by commit 776335c (before routing groups and
  Mixture-of-Depths): every field added since is read as its old behaviour, so no change is reported."""
  stored = json.loads((pathlib.Path(__file__).parent / "data" / "lm_tiny_config_776335c.json").read_text())
  assert "group_size" not in stored["model"]["skip"] and "mod_every" not in stored["model"]["skip"]
  config = lm.get_config("tiny")
  assert workdir_lib.config_changes(stored, config) == []
  config.model.skip.mod_weight = "sigmoid"
  assert workdir_lib.config_changes(stored, config) == [("model.skip.mod_weight", "linear", "sigmoid")]
