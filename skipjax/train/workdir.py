"""Workdir safety: one run per workdir (lock file), and a resume that cannot clobber a workdir.

A resumed run compares its config with the stored `config.json` before anything is written or
restored; only the fields in `RESUME_MAY_CHANGE` may differ (README "When things go wrong").
"""
import errno
import fcntl
import json
import os
import socket
from typing import Any, Dict, List, Tuple

from absl import logging

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"

# Fields a resumed run may change: how long to train, how often to log / evaluate / save, and the
# learning-rate schedule (the optimizer state does not depend on them). num_steps also sets the
# length of the cosine decay, so extending a run re-stretches its remaining schedule.
RESUME_MAY_CHANGE = (
    "train.num_steps", "train.log_every_steps", "train.eval_every_steps", "train.eval_batches",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.progress_bar",
    "train.learning_rate", "train.warmup_steps", "train.min_lr_ratio",
    "init_from",  # only read by a fresh run; a resumed run continues from its own checkpoint
)

# Fields added after runs were written: a stored config without one ran as with this value.
ADDED_FIELDS = {
    "model.plan": "",
    "model.layerdrop.rate": 0.0, "model.layerdrop.schedule": "constant", "model.layerdrop.rates": "",
    "model.layerdrop.unit": "example", "model.layerdrop.at_inference": False,
    "train.early_exit.enabled": False, "train.early_exit.weights": "layerskip", "train.early_exit.e_scale": 1.0,
    "train.early_exit.curriculum": "none", "train.early_exit.rotation": 2, "train.early_exit.every": 1,
    "model.skip.gate_form": "paper", "model.skip.router_bias_init": "warmup", "model.skip.router_input": "stream",
    "train.router_lr_multiplier": 1.0,
    "model.ffn.expansion": 0, "model.ffn.tied": False, "model.ffn.block_sparsity_weight": 0.0,
    "model.ffn.block_size": 64, "model.ffn.exempt": 0,
    "model.skip.group_size": 0, "model.skip.mod_every": 1, "model.skip.mod_causal": "aux_loss",
    "model.skip.mod_aux_weight": 0.1, "model.skip.mod_eval": "causal", "model.skip.mod_weight": "linear",
    "model.skip.density_warmup_steps": 0, "model.oracle_threshold": 0.0, "init_from": "", "train.trainable": "",
}


class WorkdirError(OSError):
  """The workdir cannot be used as asked (in use by another run, or a config mismatch)."""


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/run.lock`, which also records the holder's pid.

  The kernel drops the lock when its process dies (also by SIGKILL), so a stale lock file never
  blocks a later run; a second live run in the same workdir is refused.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}; "
                           f"lock file {self.path}); wait for it or use another --workdir") from None
      raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _normalize(config) -> Dict[str, Any]:
  """A ConfigDict / dict as flat JSON values (tuples become lists, as in config.json)."""
  tree = json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))
  return _flatten(tree)


def read_config(workdir: str):
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise WorkdirError(f"{path} is not valid JSON ({e}); restore it or use another --workdir") from None


def config_changes(stored: Dict[str, Any], config, ignore: Tuple[str, ...] = ()) -> List[Tuple[str, Any, Any]]:
  """(field, stored value, new value) for every field that differs, sorted by field."""
  old, new = _normalize(stored), _normalize(config)
  if any(field.startswith("model.") for field in old):  # (a training config, not a bare model block)
    old = {**{f: v for f, v in ADDED_FIELDS.items() if f in new}, **old}
  missing = object()
  changes = []
  for field in sorted(set(old) | set(new)):
    if field in ignore:
      continue
    a, b = old.get(field, missing), new.get(field, missing)
    if a != b:
      changes.append((field, None if a is missing else a, None if b is missing else b))
  return changes


def check_resume(workdir: str, stored: Dict[str, Any], config, ignore: Tuple[str, ...] = ()) -> None:
  """Refuse (one line listing the fields) a resume whose config differs in a field that must not
  change; log the allowed changes."""
  changes = config_changes(stored, config, ignore)
  refused = [c for c in changes if c[0] not in RESUME_MAY_CHANGE]
  if refused:
    listed = ", ".join(f"config.{f}: {a!r} -> {b!r}" for f, a, b in refused)
    raise WorkdirError(
        f"workdir {workdir} holds a run with a different config ({listed}); resuming may only change "
        f"{', '.join(RESUME_MAY_CHANGE)}. Use a new --workdir, or --config.init_from={workdir} to start "
        f"a new run from its weights")
  for field, a, b in changes:
    logging.info("resuming with config.%s changed: %r -> %r", field, a, b)


def write_config(workdir: str, config) -> None:
  """config.json, written to a temporary name and renamed (never half-written)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)
