"""`python -m skipjax.decode --workdir=DIR (--prompt='text' | --prompt_tokens=1,2,3) --max_new_tokens=N`.

Restores the latest checkpoint of a training workdir, decodes with the KV cache and per-step
routing (LtS Alg. 2), prints the output, and writes `DIR/decode.json` (tokens and layers
skipped per generated token) and `DIR/plots/skipped_layers.png` (LtS Fig. 7).
"""
import json
import os

from absl import app, flags

from skipjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (byte or BPE tokenizer of the workdir).")
_PROMPT_TOKENS = flags.DEFINE_list("prompt_tokens", None, "Prompt as comma-separated token ids.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "With sampling, keep the k most likely tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def parse_token_ids(values) -> list:
  """`--prompt_tokens` entries as ints (ValueError naming the flag and the bad entry)."""
  ids = []
  for value in values:
    try:
      ids.append(int(value.strip()))
    except ValueError:
      raise ValueError(f"--prompt_tokens={','.join(values)!r}: {value!r} is not an integer token id") from None
  return ids


def _prompt_ids(tokenizer) -> list:
  if (_PROMPT.value is None) == (_PROMPT_TOKENS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_tokens")
  if _PROMPT_TOKENS.value is not None:
    return parse_token_ids(_PROMPT_TOKENS.value)
  if tokenizer is None:
    raise app.UsageError("--prompt needs a text tokenizer; this workdir trained on a synthetic task "
                         "(config.data.source), use --prompt_tokens")
  return [int(t) for t in tokenizer.encode_batch([_PROMPT.value])[0]]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  import jax  # after flag parsing, so --jax_* flags and XLA_FLAGS apply
  import numpy as np

  from skipjax import plots
  from skipjax.decode import generation, workdir as workdir_lib

  workdir = _WORKDIR.value
  restored = workdir_lib.restore(workdir, _STEP.value)
  prompt = _prompt_ids(restored.tokenizer)
  if not prompt:
    raise app.UsageError("the prompt is empty")
  vocab = restored.config.model.vocab_size
  if max(prompt) >= vocab or min(prompt) < 0:
    raise ValueError(f"--prompt_tokens must lie in 0..{vocab - 1} (config.model.vocab_size), got {prompt}")
  eos_id = getattr(restored.tokenizer, "eos_id", None)
  result = generation.generate(restored.model, restored.params, np.asarray([prompt], np.int32),
                               _MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                               rng=jax.random.key(_SEED.value), eos_id=eos_id)
  generated = [int(t) for t in np.asarray(result.generated[0])]
  skipped = [float(s) for s in np.asarray(result.skipped_layers[0])]
  num_layers = restored.config.model.num_layers
  record = {"step": restored.step, "prompt_tokens": prompt, "generated_tokens": generated,
            "tokens": prompt + generated, "skipped_layers": skipped, "num_layers": num_layers,
            "mean_skipped_layers": float(np.mean(skipped)), "temperature": _TEMPERATURE.value}
  if restored.tokenizer is not None:
    record["prompt"] = restored.tokenizer.decode(prompt)
    record["generated_text"] = restored.tokenizer.decode(generated)
    print(record["prompt"] + record["generated_text"])
  else:
    print(" ".join(map(str, prompt)), "|", " ".join(map(str, generated)))
  print(f"layers skipped per generated token (of {num_layers}): {skipped}")
  with open(os.path.join(workdir, "decode.json"), "w", encoding="utf-8") as f:
    json.dump(record, f)
  plot = plots.skipped_layers_per_token(skipped, num_layers, os.path.join(workdir, "plots", "skipped_layers.png"))
  print(f"wrote {os.path.join(workdir, 'decode.json')} and {plot}")


if __name__ == "__main__":
  cli.run(main)
