"""Orbax checkpointing of the train state: every N steps, keep K, resume from the latest intact one."""
import os
import shutil
import time
from typing import List, Optional

import orbax.checkpoint as ocp
from absl import logging

from skipjax.train.state import TrainState

CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored (one line naming the step and folder)."""


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


class Checkpointer:
  """Thin wrapper around `ocp.CheckpointManager` under `<workdir>/checkpoints`.

  Saves are atomic (orbax writes to a temporary folder and renames it when complete), so a
  run killed mid-save leaves the previous checkpoint as the latest one. Saves are asynchronous:
  `close()` (idempotent; call it in a `finally`) waits for the one in flight to commit.
  """

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, create=True))
    self._closed = False

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def committed_steps(self) -> List[int]:
    """Steps whose folder is complete on disk (orbax renames the temporary folder last)."""
    return self.committed_steps_in(self.workdir)

  @staticmethod
  def committed_steps_in(workdir: str) -> List[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
      return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: TrainState, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, target: TrainState, step: Optional[int] = None) -> TrainState:
    """Restore `step` into `target` (abstract arrays with shardings, see state.abstract_like)."""
    step = self.latest_step() if step is None else step
    try:
      tree = self.manager.restore(step, args=ocp.args.StandardRestore(_as_tree(target)))
    except Exception as e:  # orbax raises many types for unreadable or mismatching files
      raise CheckpointError(f"cannot restore checkpoint step {step} in {self.directory} ({_first_line(e)})") from e
    return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])

  def restore_latest_intact(self, target: TrainState) -> Optional[TrainState]:
    """The newest checkpoint that restores (None if there is none). Unreadable newer ones are
    moved (not deleted) to `<workdir>/corrupt_checkpoints/<step>-<time>`, with a warning; if no
    checkpoint restores, nothing is moved and the newest one's error is raised."""
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        state = self.restore(target, step)
      except CheckpointError as e:
        errors.append((step, e))
        continue
      for bad, error in errors:
        aside = os.path.join(self.workdir, CORRUPT_DIR, f"{bad}-{int(time.time())}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(bad)), aside)
        logging.warning("%s; moved it to %s and falling back to step %d", error, aside, step)
      if errors:
        self.manager.reload()
      return state
    if errors:
      raise errors[0][1]
    return None

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
