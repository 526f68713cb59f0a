"""Self-speculative decoding speed (LayerSkip §5): acceptance and tokens/s against plain greedy
decoding, several exit layers E and draft lengths d, in one run.

    python -m benchmarks.speculative [--new_tokens 64 --repeats 3]

Model: a random decoder (8 layers, d=256, 8 heads, FFN 1024, vocab 1024, RoPE, fp32), with its
default init and with every block matrix scaled ×4 (later layers then change the prediction more,
so acceptance falls). Neither is trained with an early-exit loss: this is the regime in which
LayerSkip reports slow-downs. Batch 1, a 16-token random prompt. Each figure comes from
`skipjax.decode.speculative.measure` (both decoders jitted and warm, best of `--repeats`, prefill
included) and states whether the output is identical to greedy decoding.
"""
import argparse
import platform
from typing import List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.decode import speculative

SETTINGS = ((8, 4), (6, 4), (4, 4), (4, 2), (2, 4))  # (E, d)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  cfg = models.TransformerConfig(vocab_size=1024, d_model=256, num_heads=8, num_layers=8, d_ff=1024,
                                 max_len=32 + args.new_tokens, position="rope")
  model = models.build(cfg)
  base = nn.meta.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))["params"])
  scaled = {k: jax.tree.map(lambda a: a * 4.0 if a.ndim >= 2 else a, v) if k.startswith("block_") else v
            for k, v in base.items()}
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.vocab_size), np.int32)
  print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or platform.machine()}; "
        f"random decoder L={cfg.num_layers}, d={cfg.d_model}, V={cfg.vocab_size}, RoPE; batch 1, prompt 16, "
        f"{args.new_tokens} new tokens")
  print("| params | E | d | acceptance | tokens/round | tokens/s | greedy tokens/s | vs greedy | identical |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for name, params in (("default init", base), ("blocks ×4", scaled)):
    for exit_layer, num_draft in SETTINGS:
      r = speculative.measure(model, params, prompt, args.new_tokens, exit_layer=exit_layer, num_draft=num_draft,
                              repeats=args.repeats)
      r.pop("generated_tokens")
      rows.append({"params": name, **r})
      print(f"| {name} | {exit_layer} | {num_draft} | {r['acceptance_rate']:.2f} | {r['tokens_per_round']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['greedy_tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
            f"{'yes' if r['identical_to_greedy'] else 'NO'} |", flush=True)
  return rows


if __name__ == "__main__":
  main()
