"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""
import json
import os
from typing import Dict, List

import numpy as np
from absl import logging

from skipjax.train import tensorboard


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def _parse_lines(path: str) -> List[dict]:
  """Records of a metrics file; a line that does not parse (a run killed mid-write leaves a
  torn last line) is dropped with a warning."""
  records = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      int(record["step"])
    except (ValueError, KeyError, TypeError):
      logging.warning("dropping unreadable line %d of %s (a run killed mid-write): %.80r", number, path, line)
      continue
    records.append(record)
  return records


class MetricWriter:
  """Appends one JSON line per `write`. At start, lines after `resume_step` (0 for a fresh start
  in a workdir a killed run left without a checkpoint) and torn lines are dropped: the run
  writes those steps again, identically."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard_events: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = tensorboard.EventWriter(os.path.join(workdir, "tensorboard")) if tensorboard_events else None

  def _truncate_after(self, step: int) -> None:
    kept = [r for r in _parse_lines(self.path) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.scalars(step, {k: v for k, v in record.items()
                              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list:
  return _parse_lines(os.path.join(workdir, "metrics.jsonl"))
