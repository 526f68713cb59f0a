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

Early exit (CALM, Schuster et al. 2022 §3; `skipjax.decode.early_exit`): `--exit=MEASURE` decodes
greedily with per-token exits (`--exit_threshold` λ, `--exit_min_layer`, `--exit_every`,
`--exit_decay_tau`, `--exit_fixed_layer`, `--exit_heads` for `learned`) under the KV policy
`--exit_policy`, and also decodes the same prompt with plain greedy decoding (every position);
decode.json's top-level tokens are the early-exit output and its `exit` entry holds the rule, per
token the exit position, confidence, positions run and recomputed runs, and the agreement with
the full greedy output; `plots/exit_layers.png` shows the layers run per generated token.
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
_EXIT = flags.DEFINE_string("exit", None, "Early exit (CALM §3) by this measure: softmax_max | top2_margin | entropy "
                            "| saturation | learned | fixed; unset = no early exit. Greedy only.")
_EXIT_THRESHOLD = flags.DEFINE_float("exit_threshold", 0.9, "--exit: λ, a token exits where its confidence c ≥ λ "
                                     "(entropy: 1 − H/log V; λ > 1 never exits).")
_EXIT_MIN_LAYER = flags.DEFINE_integer("exit_min_layer", 0, "--exit: the first plan position that may exit.")
_EXIT_EVERY = flags.DEFINE_integer("exit_every", 1, "--exit: only every k-th plan position may exit.")
_EXIT_DECAY_TAU = flags.DEFINE_float("exit_decay_tau", None, "--exit: CALM's position-decaying threshold with "
                                     "temperature τ (unset: constant λ).")
_EXIT_FIXED_LAYER = flags.DEFINE_integer("exit_fixed_layer", None, "--exit=fixed: every token exits after this plan "
                                         "position.")
_EXIT_POLICY = flags.DEFINE_string("exit_policy", "propagate", "--exit: KV cache of the positions a token skipped: "
                                   "propagate (CALM state propagation) | recompute (when a later token runs them) | "
                                   "full (every position runs; only the prediction exits).")
_EXIT_MAX_PENDING = flags.DEFINE_integer("exit_max_pending", 8, "--exit_policy=recompute: earlier tokens one step "
                                         "may complete.")
_EXIT_HEADS = flags.DEFINE_string("exit_heads", None, "--exit=learned: the exit heads .npz "
                                  "(skipjax.depth.exit_heads.save_exit_heads).")
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


_EXIT_OPTIONS = ("exit_threshold", "exit_min_layer", "exit_every", "exit_decay_tau", "exit_fixed_layer",
                 "exit_policy", "exit_max_pending", "exit_heads")


def _check_exit_flags() -> None:
  """Early-exit flag values and combinations, before anything is loaded (one line naming the flag)."""
  from skipjax.decode import early_exit  # pylint: disable=import-outside-toplevel
  if _EXIT.value is None:
    given = [name for name in _EXIT_OPTIONS if flags.FLAGS[name].present]
    if given:
      raise app.UsageError(f"--{given[0]} needs --exit=MEASURE (one of {', '.join(early_exit.MEASURES)})")
    return
  conflicts = (("speculative", _SPECULATIVE.value is not None, "run self-speculative decoding separately"),
               ("decode_plan", _DECODE_PLAN.value is not None, "early exit runs the --plan (or the model's plan) and "
                "the exits choose each token's depth"),
               ("temperature", _TEMPERATURE.value != 0.0, "early-exit decoding is greedy here (compared with full "
                "greedy decoding)"),
               ("top_k", _TOP_K.value != 0, "early-exit decoding is greedy here"))
  for name, given, why in conflicts:
    if given:
      raise app.UsageError(f"--{name} cannot be combined with --exit: {why}")
  measure, policy = _EXIT.value, _EXIT_POLICY.value
  if measure not in early_exit.MEASURES:
    raise ValueError(f"--exit={measure!r} is not one of {', '.join(early_exit.MEASURES)}")
  if policy not in early_exit.POLICIES:
    raise ValueError(f"--exit_policy={policy!r} is not one of {', '.join(early_exit.POLICIES)}")
  for name, value, low in (("exit_min_layer", _EXIT_MIN_LAYER.value, 0), ("exit_every", _EXIT_EVERY.value, 1),
                           ("exit_max_pending", _EXIT_MAX_PENDING.value, 1),
                           ("exit_fixed_layer", _EXIT_FIXED_LAYER.value, 0)):
    if value is not None and value < low:
      raise ValueError(f"--{name}={value} must be ≥ {low}")
  if _EXIT_DECAY_TAU.value is not None and not _EXIT_DECAY_TAU.value >= 0:
    raise ValueError(f"--exit_decay_tau={_EXIT_DECAY_TAU.value} must be ≥ 0")
  if _EXIT_THRESHOLD.value != _EXIT_THRESHOLD.value:  # NaN
    raise ValueError("--exit_threshold=nan is not a number")
  if (measure == "fixed") != (_EXIT_FIXED_LAYER.value is not None):
    raise app.UsageError("--exit=fixed needs --exit_fixed_layer" if measure == "fixed" else
                         f"--exit_fixed_layer needs --exit=fixed (got --exit={measure})")
  if (measure == "learned") != (_EXIT_HEADS.value is not None):
    raise app.UsageError("--exit=learned needs --exit_heads=PATH (skipjax.depth.exit_heads.save_exit_heads)"
                         if measure == "learned" else f"--exit_heads needs --exit=learned (got --exit={measure})")


def _exit_rule(cfg):
  """(ExitRule, exit heads or None) for the model's plan positions; one line naming the flag or file."""
  from skipjax.decode import early_exit  # pylint: disable=import-outside-toplevel
  from skipjax.depth import exit_heads  # pylint: disable=import-outside-toplevel
  num_positions = len(cfg.execution_plan)
  for name, value in (("exit_min_layer", _EXIT_MIN_LAYER.value), ("exit_fixed_layer", _EXIT_FIXED_LAYER.value)):
    if value is not None and value >= num_positions:
      raise ValueError(f"--{name}={value} must be in 0..{num_positions - 1} (the model runs {num_positions} plan "
                       "positions)")
  heads = exit_heads.load_exit_heads(_EXIT_HEADS.value, cfg)[0] if _EXIT_HEADS.value is not None else None
  rule = early_exit.ExitRule(_EXIT.value, threshold=float(_EXIT_THRESHOLD.value), min_layer=_EXIT_MIN_LAYER.value,
                             every=_EXIT_EVERY.value, decay_tau=_EXIT_DECAY_TAU.value,
                             fixed_layer=_EXIT_FIXED_LAYER.value or 0)
  return rule.validate(num_positions, heads), heads


def _early_exit(model, params, prompt: list, rule, heads, full_generated: list, full_fn) -> tuple:
  """`--exit`: early-exit greedy decoding of `prompt` (skipjax.decode.early_exit.generate).

  Returns (result, record): the EarlyExitResult of the one prompt and decode.json's `exit` entry,
  which compares its tokens with `full_generated` (plain greedy decoding, `full_fn` re-runs it warm).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from skipjax.decode import early_exit, speculative  # pylint: disable=import-outside-toplevel
  policy, max_new = _EXIT_POLICY.value, _MAX_NEW_TOKENS.value
  run = lambda: early_exit.generate(model, params, np.asarray([prompt], np.int32), max_new, rule=rule,
                                    policy=policy, exit_heads=heads, max_pending=_EXIT_MAX_PENDING.value)
  result = run()
  exit_seconds, full_seconds = speculative.best_seconds(run, 3), speculative.best_seconds(full_fn, 3)
  num_positions = len(model.config.execution_plan)
  generated = [int(t) for t in np.asarray(result.generated[0])]
  exit_layer = [int(e) for e in np.asarray(result.exit_layer[0])]
  executed = np.asarray(result.executed[:, :, 0], np.float64)                # [N, P]
  agree = [a == b for a, b in zip(generated, full_generated)]
  record = {
      "measure": rule.measure, "threshold": None if rule.measure == "fixed" else rule.threshold,
      "min_layer": rule.min_layer, "every": rule.every, "decay_tau": rule.decay_tau,
      "fixed_layer": rule.fixed_layer if rule.measure == "fixed" else None,
      "heads": None if _EXIT_HEADS.value is None else os.path.abspath(_EXIT_HEADS.value),
      "policy": policy, "max_pending": _EXIT_MAX_PENDING.value if policy == "recompute" else None,
      "num_positions": num_positions,
      "exit_layer": exit_layer, "layers_run": [e + 1 for e in exit_layer],
      "confidence": [float(c) for c in np.asarray(result.confidence[0])],
      "executed_per_token": [float(x) for x in executed.sum(axis=1)],
      "recomputed": [int(r) for r in np.asarray(result.recomputed[0])],
      "mean_exit_layer": float(np.mean(exit_layer)), "mean_layers_run": float(np.mean(exit_layer)) + 1.0,
      "mean_executed_per_token": float(executed.sum(axis=1).mean()),
      "full_greedy_tokens": full_generated, "agreement": float(np.mean(agree)),
      "agreeing_prefix": next((i for i, a in enumerate(agree) if not a), len(agree)),
      "tokens_per_s": max_new / exit_seconds, "full_tokens_per_s": max_new / full_seconds}
  if rule.decay_tau is not None:
    record["threshold_per_token"] = [float(rule.threshold_at(t, max_new)) for t in range(max_new)]
  return result, record


def _token_labels(tokenizer, ids: list):
  """Each token's own text (escaped: newlines and tabs visible) for plot ticks; None without a tokenizer."""
  if tokenizer is None:
    return None
  return [repr(tokenizer.decode([t]))[1:-1] for t in ids]


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
  _check_exit_flags()
  exiting = _EXIT.value is not None
  restored = workdir_lib.load(workdir, _STEP.value)
  model, params = restored.model, restored.params
  if _PLAN.value is not None or _DECODE_PLAN.value is not None or exiting:  # early exit: the loop layout
    model, params = workdir_lib.with_plan(model, params, _PLAN.value)
  cfg = model.config
  rule, heads = _exit_rule(cfg) if exiting else (None, None)
  decoder = generation.decode_model(model, _DECODE_PLAN.value, "--decode_plan") if _DECODE_PLAN.value else None
  if decoder is not None:
    generation.check_params(decoder, params, f"--decode_plan={_DECODE_PLAN.value!r}")
  prompt = _prompt_ids(restored.tokenizer, restored.kind)
  if not prompt:
    raise app.UsageError("the prompt is empty")
  vocab = cfg.vocab_size
  if max(prompt) >= vocab or min(prompt) < 0:
    raise ValueError(f"--prompt_tokens must lie in 0..{vocab - 1} (config.model.vocab_size), got {prompt}")
  # early exit has no stop at EOS: its full greedy reference runs the same N tokens
  eos_id = None if exiting else getattr(restored.tokenizer, "eos_id", None)
  plain = lambda: generation.generate(model, params, np.asarray([prompt], np.int32), _MAX_NEW_TOKENS.value,
                                      temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                      rng=jax.random.key(_SEED.value), eos_id=eos_id, decode_plan=_DECODE_PLAN.value)
  result = plain()
  generated = [int(t) for t in np.asarray(result.generated[0])]
  skipped = [float(s) for s in np.asarray(result.skipped_layers[0])]
  num_layers = cfg.num_layers
  executed = np.asarray(result.executed[:, :, 0])  # [N, R]
  exit_record = None
  if exiting:  # the early-exit output replaces the plain one; the plain one is its reference
    early, exit_record = _early_exit(model, params, prompt, rule, heads, generated, plain)
    generated = [int(t) for t in np.asarray(early.generated[0])]
    executed = np.asarray(early.executed[:, :, 0])  # [N, P]
    skipped = [float(num_layers - row.sum()) for row in executed]
  prefill_plan = plan_lib.to_string(cfg.execution_plan)
  decode_plan = plan_lib.to_string(decoder.config.execution_plan) if decoder is not None else prefill_plan
  # Token 0 comes from the prefill (the last prompt token's step), the others from decode steps;
  # executed rows: layers for an identity plan, else the plan's positions.
  rows = [generation.plan_rows(cfg)] + [generation.plan_rows((decoder or model).config)] * (len(generated) - 1)
  if exiting:  # one row per plan position
    rows = [executed.shape[1]] * len(generated)
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
  if exit_record is not None:
    if restored.tokenizer is not None:
      exit_record["full_greedy_text"] = restored.tokenizer.decode(exit_record["full_greedy_tokens"])
    record["exit"] = exit_record
    e = exit_record
    rule_text = e["measure"] + (f" ≥ {e['threshold']}" if e["threshold"] is not None else f" at {e['fixed_layer']}")
    print(f"early exit ({rule_text}, policy {e['policy']}): mean exit position {e['mean_exit_layer']:.2f} "
          f"({e['mean_layers_run']:.2f} of {e['num_positions']} positions run), agreement with full greedy "
          f"{e['agreement']:.3f} (first {e['agreeing_prefix']} tokens equal), {e['tokens_per_s']:.1f} tokens/s vs "
          f"full {e['full_tokens_per_s']:.1f} tokens/s")
  if _SPECULATIVE.value is not None:
    record["speculative"] = _speculative(model, params, prompt)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "decode.json")
  _write_json(path, record)
  plot = plots.skipped_layers_per_token(skipped, num_layers, os.path.join(out, "plots", "skipped_layers.png"))
  if exit_record is not None:
    plot += " and " + plots.exit_layers_per_token(
        exit_record["layers_run"], exit_record["num_positions"], os.path.join(out, "plots", "exit_layers.png"),
        labels=_token_labels(restored.tokenizer, generated),
        title=f"early exit {rule_text}, policy {exit_record['policy']}: layers run per generated token")
  print(f"wrote {path} and {plot}")


if __name__ == "__main__":
  cli.run(main)
