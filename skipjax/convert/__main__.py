"""`python -m skipjax.convert --hf=DIR_OR_HUB_ID --out=DIR [--dtype=float32]`.

Writes DIR/config.json (skipjax model config), DIR/hf_config.json (the source config; for a
`.gguf` file also DIR/tokenizer.json from its vocabulary) and
DIR/params (orbax checkpoint), atomically: on any error nothing is left at DIR.
"""
from absl import app, flags, logging

from skipjax import cli

_HF = flags.DEFINE_string("hf", None, "HF checkpoint folder (config.json + safetensors), .gguf file or hub id.")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype.")
flags.mark_flags_as_required(["hf", "out"])


def convert(hf_path: str, out: str, dtype: str = "float32") -> str:
  """Convert and save; returns the output folder."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from skipjax.convert import export, gguf, hf  # pylint: disable=import-outside-toplevel
  directory = hf.resolve(hf_path)
  cfg, params = hf.load(directory, dtype=jnp.dtype(dtype))
  extra = {"hf_config.json": hf.read_hf_config(directory)}
  if gguf.is_gguf(directory):  # a GGUF carries its tokenizer as metadata
    extra["tokenizer.json"] = gguf.tokenizer_json(directory)
  return export.save(out, cfg, params, extra=extra)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("converted %s → %s", _HF.value, convert(_HF.value, _OUT.value, _DTYPE.value))


if __name__ == "__main__":
  cli.run(main)
