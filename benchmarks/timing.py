"""Timing shared by the benchmarks."""
import time
from typing import Callable, Dict

import numpy as np


def round_robin(fns: Dict[str, Callable], repeats: int) -> Dict[str, float]:
  """Median seconds per call of each function after one warm-up call (compilation for jax).

  The functions take turns (round robin), and the median is kept, so that on a shared CPU a
  change of the load hits them alike and one slowed call does not count."""
  times = {k: [] for k in fns}
  for fn in fns.values():
    fn()
  for _ in range(repeats):
    for k, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - start)
  return {k: float(np.median(v)) for k, v in times.items()}
