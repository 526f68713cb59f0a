"""`python -m skipjax.decode --workdir=DIR (--prompt='text' | --prompt_tokens=1,2,3) --max_new_tokens=N`.

DIR is a training workdir (the latest or `--step` checkpoint, the run's tokenizer) or a
`skipjax.convert` / `skipjax.depth.prune` export (`config.json` + `params/`, its `tokenizer.json`
when present, otherwise give `--prompt_tokens`). Decodes with the KV cache and per-step routing
(LtS Alg. 2), prints the output, and writes `decode.json` (tokens, plans, positions executed and
layers skipped per generated token) and `plots/skipped_layers.png` (LtS Fig. 7) to `--out`
(default: DIR itself).

Plans (skipjax/depth/plan.py string form): `--plan` replaces the model's execution plan for the
whole run (the prompt and, without `--decode_plan`, every generated token); `--decode_plan` runs
the generated tokens under another plan (shallow decoder). A scanned model given either flag is
converted to the loop layout first.
"""
import json
import os
import tempfile

from absl import app, flags

from skipjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/) or a "
                               "skipjax.convert / skipjax.depth.prune export (config.json + params/).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (the workdir's tokenizer or the export's tokenizer.json).")
_PROMPT_TOKENS = flags.DEFINE_list("prompt_tokens", None, "Prompt as comma-separated token ids.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "With sampling, keep the k most likely tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
_PLAN = flags.DEFINE_string("plan", None, "Execution plan of the whole run (prefill plan with --decode_plan), "
                            "e.g. '0:3,5:8'; default: the model's own config.model.plan.")
_DECODE_PLAN = flags.DEFINE_string("decode_plan", None, "Plan for the generated tokens (shallow decoder), e.g. "
                                   "'0:6'; its attention positions must be ones the prefill plan runs.")
_SPECULATIVE = flags.DEFINE_list("speculative", None, "E,d: also decode greedily with self-speculative decoding "
                                  "(LayerSkip §5: draft d tokens with the first E plan positions, verify with the "
                                  "rest) and record acceptance and tokens/s vs plain greedy in decode.json.")
_OUT = flags.DEFINE_string("out", None, "Folder for decode.json and plots/ (default: --workdir).")
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


def _prompt_ids(tokenizer, kind: str) -> list:
  if (_PROMPT.value is None) == (_PROMPT_TOKENS.value is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_tokens")
  if _PROMPT_TOKENS.value is not None:
    return parse_token_ids(_PROMPT_TOKENS.value)
  if tokenizer is None:
    why = ("this export has no tokenizer.json" if kind == "export" else
           "this workdir trained on a synthetic task (config.data.source)")
    raise app.UsageError(f"--prompt needs a text tokenizer; {why}, use --prompt_tokens")
  return [int(t) for t in tokenizer.encode_batch([_PROMPT.value])[0]]


def _write_json(path: str, record: dict) -> None:
  """Atomically: a temporary sibling renamed over `path`."""
  fd, tmp = tempfile.mkstemp(prefix=".decode.json.", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(record, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _speculative(model, params, prompt: list) -> dict:
  """`--speculative=E,d`: self-speculative vs plain greedy decoding (skipjax.decode.speculative.measure)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from skipjax.decode import speculative  # pylint: disable=import-outside-toplevel
  values = _SPECULATIVE.value
  try:
    exit_layer, num_draft = (int(v.strip()) for v in values)
  except ValueError:
    raise ValueError(f"--speculative={','.join(values)!r} must be two integers E,d (exit layer, drafted tokens)"
                     ) from None
  if _TEMPERATURE.value != 0.0 or _DECODE_PLAN.value is not None:
    raise app.UsageError("--speculative is greedy decoding of the full plan: use it without --temperature > 0 "
                         "and without --decode_plan")
  stats = speculative.measure(model, params, np.asarray([prompt], np.int32), _MAX_NEW_TOKENS.value,
                              exit_layer=exit_layer, num_draft=num_draft)
  print(f"self-speculative E={exit_layer} d={num_draft}: acceptance {stats['acceptance_rate']:.3f}, "
        f"{stats['tokens_per_round']:.2f} tokens/round, {stats['tokens_per_s']:.1f} tokens/s vs greedy "
        f"{stats['greedy_tokens_per_s']:.1f} tokens/s, identical to greedy: {stats['identical_to_greedy']}")
  return stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  import jax  # after flag parsing, so --jax_* flags and XLA_FLAGS apply
  import numpy as np

  from skipjax import plots
  from skipjax.decode import generation, workdir as workdir_lib
  from skipjax.depth import plan as plan_lib

  workdir = _WORKDIR.value
  out = _OUT.value or workdir
  restored = workdir_lib.load(workdir, _STEP.value)
  model, params = restored.model, restored.params
  if _PLAN.value is not None or _DECODE_PLAN.value is not None:
    model, params = workdir_lib.with_plan(model, params, _PLAN.value)
  cfg = model.config
  decoder = generation.decode_model(model, _DECODE_PLAN.value, "--decode_plan") if _DECODE_PLAN.value else None
  if decoder is not None:
    generation.check_params(decoder, params, f"--decode_plan={_DECODE_PLAN.value!r}")
  prompt = _prompt_ids(restored.tokenizer, restored.kind)
  if not prompt:
    raise app.UsageError("the prompt is empty")
  vocab = cfg.vocab_size
  if max(prompt) >= vocab or min(prompt) < 0:
    raise ValueError(f"--prompt_tokens must lie in 0..{vocab - 1} (config.model.vocab_size), got {prompt}")
  eos_id = getattr(restored.tokenizer, "eos_id", None)
  result = generation.generate(model, params, np.asarray([prompt], np.int32), _MAX_NEW_TOKENS.value,
                               temperature=_TEMPERATURE.value, top_k=_TOP_K.value, rng=jax.random.key(_SEED.value),
                               eos_id=eos_id, decode_plan=_DECODE_PLAN.value)
  generated = [int(t) for t in np.asarray(result.generated[0])]
  skipped = [float(s) for s in np.asarray(result.skipped_layers[0])]
  num_layers = cfg.num_layers
  prefill_plan = plan_lib.to_string(cfg.execution_plan)
  decode_plan = plan_lib.to_string(decoder.config.execution_plan) if decoder is not None else prefill_plan
  # Token 0 comes from the prefill (the last prompt token's step), the others from decode steps;
  # executed rows: layers for an identity plan, else the plan's positions.
  rows = [generation.plan_rows(cfg)] + [generation.plan_rows((decoder or model).config)] * (len(generated) - 1)
  executed = np.asarray(result.executed[:, :, 0])  # [N, R]
  record = {"source": os.path.abspath(workdir), "kind": restored.kind, "step": restored.step,
            "prompt_tokens": prompt, "generated_tokens": generated, "tokens": prompt + generated,
            "plan": prefill_plan, "decode_plan": decode_plan,
            "token_plans": ["prefill"] + ["decode"] * (len(generated) - 1),
            "executed_positions": [[float(x) for x in executed[i, :r]] for i, r in enumerate(rows)],
            "skipped_layers": skipped, "num_layers": num_layers,
            "mean_skipped_layers": float(np.mean(skipped)), "temperature": _TEMPERATURE.value}
  if restored.info is not None and "source_plan" in restored.info:
    record["prune"] = {k: restored.info.get(k) for k in ("source", "source_plan", "measure", "removed")}
  if restored.tokenizer is not None:
    record["prompt"] = restored.tokenizer.decode(prompt)
    record["generated_text"] = restored.tokenizer.decode(generated)
    print(record["prompt"] + record["generated_text"])
  else:
    print(" ".join(map(str, prompt)), "|", " ".join(map(str, generated)))
  print(f"plans: prefill {prefill_plan!r}, decode {decode_plan!r}; layers skipped per generated token "
        f"(of {num_layers}): {skipped}")
  if _SPECULATIVE.value is not None:
    record["speculative"] = _speculative(model, params, prompt)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "decode.json")
  _write_json(path, record)
  plot = plots.skipped_layers_per_token(skipped, num_layers, os.path.join(out, "plots", "skipped_layers.png"))
  print(f"wrote {path} and {plot}")


if __name__ == "__main__":
  cli.run(main)
