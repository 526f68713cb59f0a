"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""
import json
import os
from typing import Dict, Optional

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Appends one JSON line per `write`; on resume, lines after the restored step are dropped
  (the resumed run writes them again, identically)."""

  def __init__(self, workdir: str, resume_step: Optional[int] = None, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
