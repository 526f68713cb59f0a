"""`python -m skipjax.depthbench --config=configs/depthbench.py:default --workdir=DIR [--config.methods=...]`."""
from absl import app, flags
from ml_collections import config_flags

from skipjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Bench config file (path:preset).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models, results.json, results.md and plots/ go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  from skipjax import depthbench  # after flag parsing, so --jax_* flags and XLA_FLAGS apply
  depthbench.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
