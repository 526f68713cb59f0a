"""Paper figures as matplotlib PNGs (Agg backend: no display needed)."""
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(records: Sequence[dict], path: str) -> str:
  """Training loss (and eval loss where logged) against step."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
