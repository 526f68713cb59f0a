"""`python -m skipjax.train --config=configs/lm.py:tiny --workdir=DIR [--config.x=y ...] [--traceback]`."""
from absl import app, flags, logging
from ml_collections import config_flags

from skipjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path:preset).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  import jax  # after flag parsing, so --jax_* flags and XLA_FLAGS apply

  from skipjax.train.loop import train_and_evaluate
  logging.info("devices: %s", jax.devices())
  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("final: %s", final)


if __name__ == "__main__":
  cli.run(main)
