"""Orbax checkpointing of the train state: every N steps, keep K, resume from the latest."""
import os
from typing import Optional

import orbax.checkpoint as ocp

from skipjax.train.state import TrainState


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class Checkpointer:
  """Thin wrapper around `ocp.CheckpointManager` under `<workdir>/checkpoints`.

  Saves are atomic (orbax writes to a temporary folder and renames it when complete), so a
  run killed mid-save leaves the previous checkpoint as the latest one.
  """

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: TrainState, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)

  def restore(self, target: TrainState, step: Optional[int] = None) -> TrainState:
    """Restore into `target` (abstract arrays with shardings, see state.abstract_like)."""
    step = self.latest_step() if step is None else step
    tree = self.manager.restore(step, args=ocp.args.StandardRestore(_as_tree(target)))
    return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
