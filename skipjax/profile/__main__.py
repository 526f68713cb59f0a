"""`python -m skipjax.profile --config=configs/profile.py:<preset> --config.model=DIR[,DIR2] \
   --config.data=text:GLOB --workdir=DIR`: residual ratios, oracles and figures (see run.py);
`--mode=sparsity`: FF activation sparsity statistics and CATS thresholds (see sparsity.py)."""
from absl import app, flags, logging
from ml_collections import config_flags

from skipjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Profiling config file (path:preset).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where summary.json, ratios.npz and plots/ go.")
_MODE = flags.DEFINE_enum("mode", "ratios", ["ratios", "sparsity"],
                          "ratios: residual ratios and oracles; sparsity: FF activation sparsity "
                          "(sparsity.json, sparsity.npz, plots/).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value == "sparsity":
    from skipjax.profile import sparsity  # pylint: disable=import-outside-toplevel
    summary = sparsity.run(_CONFIG.value, _WORKDIR.value)
    for name, res in summary["models"].items():
      logging.info("%s: sparsity %.4f, block sparsity %.4f; figures: %s", name, res["dense"]["sparsity"],
                   res["dense"]["block_sparsity"], summary["figures"])
    return
  from skipjax.profile.run import run  # after flag parsing, so --jax_* flags apply
  summary = run(_CONFIG.value, _WORKDIR.value)
  for name, res in summary["models"].items():
    logging.info("%s: median ratio %.4f; figures: %s", name, res["ratios"]["all"]["median"], summary["figures"])


if __name__ == "__main__":
  cli.run(main)
