"""`python -m skipjax.train --config=configs/lm.py:tiny --workdir=DIR [--config.x=y ...]`."""
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path:preset).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO chatter from orbax/jax internals; their warnings and errors still show."""

  def filter(self, record):
    noisy = any(name in record.pathname for name in ("/orbax/", "/jax/_src/"))
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  import jax  # after flag parsing, so --jax_* flags and XLA_FLAGS apply

  from skipjax.train.loop import train_and_evaluate
  logging.info("devices: %s", jax.devices())
  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("final: %s", final)


if __name__ == "__main__":
  app.run(main)
