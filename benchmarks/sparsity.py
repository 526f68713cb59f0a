"""Block-sparse FFN speed (issue 16, SS §3.2/§4): computing only the active blocks of B neurons
(`skipjax.layers.block_sparse`) vs the dense FFN, at given block sparsities.

    python -m benchmarks.sparsity [--preset cpu|gpu] [--keep 1.0,0.5,0.25,0.1] [--measured WORKDIR/sparsity.json]

Presets (one FFN layer, fp32, random weights; ReLU FFN and SwiGLU FFN):
  cpu  d_model 512, d_ff 2048, B = 64 (32 blocks); decode: 1 token, and 8 tokens with a routing
       group each (per-token blocks); prefill: 8 groups of 128 tokens (blocks per group).
  gpu  d_model 2048, d_ff 8192, B = 128 (64 blocks); decode: 1 token, and 32 tokens with a group
       each; prefill: 32 groups of 256 tokens.
Block sparsity s (SS §3.2: the fraction of neurons inside active blocks) keeps k = round(s·nb)
blocks per group (at least 1); the sweep is `--keep`, plus the mean block sparsity of each pass
of a `python -m skipjax.profile --mode=sparsity` run when `--measured` names its sparsity.json.
The blocks kept are a fixed random choice per group (timing does not depend on which).
Rows: dense FFN time (`MLP.apply`, all F neurons), block-sparse time, their ratio, and the FLOPs
ratio k/nb; `max |Δ|` checks the block-sparse output against the dense FFN with the other
blocks' activations zeroed (all blocks kept: against the dense FFN itself). Each time is the
median of `--repeats` jitted calls after a warm-up (compilation), all rows taking turns (round
robin) so a change of load on a shared CPU hits them alike; `block_until_ready` on every result.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from skipjax.layers import block_sparse
from skipjax.layers.mlp import MLP

PRESETS = {
    "cpu": dict(d_model=512, d_ff=2048, block=64, shapes=(("decode", 1, 1), ("decode", 8, 1), ("prefill", 8, 128))),
    "gpu": dict(d_model=2048, d_ff=8192, block=128, shapes=(("decode", 1, 1), ("decode", 32, 1),
                                                            ("prefill", 32, 256))),
}
KEEP = (1.0, 0.5, 0.25, 0.1)
FFNS = (("ReLU", "relu", False), ("SwiGLU", "silu", True))


def measured_keeps(path: str) -> Dict[str, float]:
  """{label: mean block sparsity} of every model and pass of a profiler sparsity.json."""
  with open(path) as f:
    summary = json.load(f)
  out = {}
  for name, res in summary["models"].items():
    out[f"{name} dense"] = res["dense"]["block_sparsity"]
    for row in res["cats"]:
      out[f"{name} CATS zero {row['target_zero_fraction']:g}"] = row["block_sparsity"]
  return out


def masked_dense(mlp: MLP, params, x, blocks, block_size: int):
  """Dense FFN with the activations outside each group's kept blocks zeroed (the reference)."""
  nb = mlp.hidden // block_size
  keep = jnp.zeros((x.shape[0], nb), bool).at[jnp.arange(x.shape[0])[:, None], blocks].set(True)
  mask = jnp.repeat(keep, block_size, axis=-1)[:, None, :]  # [G, 1, F]
  h = mlp.apply({"params": params}, x, mutable=["activations"])[1]["activations"]["ffn_hidden"][0]
  p = params["wo"]
  return (h * mask) @ p["kernel"] + p.get("bias", 0)


def run(preset: str, keeps: Dict[str, float], repeats: int) -> List[Dict[str, object]]:
  p = PRESETS[preset]
  nb = p["d_ff"] // p["block"]
  rows = []
  fns = {}
  for ffn_name, act, gated in FFNS:
    mlp = MLP(p["d_model"], p["d_ff"], act, gated=gated)
    params = nn.meta.unbox(mlp.init(jax.random.key(0), jnp.zeros((1, 1, p["d_model"]))))["params"]
    params = jax.tree.map(lambda w: w * 10.0, params)  # O(1) activations (the init is N(0, 0.02))
    weights = block_sparse.pack_blocks(params, p["block"])
    dense_fn = jax.jit(lambda x, mlp=mlp, params=params: mlp.apply({"params": params}, x))
    sparse_fn = jax.jit(lambda w, x, b, act=act, gated=gated: block_sparse.block_sparse_ffn(w, x, b, act, gated))
    for shape_name, groups, tokens in p["shapes"]:
      x = jax.random.normal(jax.random.key(1), (groups, tokens, p["d_model"]))
      key = (ffn_name, shape_name, groups)
      fns[key + ("dense",)] = lambda f=dense_fn, x=x: f(x).block_until_ready()
      rng = np.random.default_rng(0)
      for label, keep in keeps.items():
        k = int(min(nb, max(1, round(keep * nb))))
        blocks = jnp.asarray(np.sort(np.stack([rng.choice(nb, k, replace=False) for _ in range(groups)]), axis=1))
        out = sparse_fn(weights, x, blocks)
        ref = dense_fn(x) if k == nb else masked_dense(mlp, params, x, blocks, p["block"])
        err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        fns[key + (label,)] = lambda f=sparse_fn, w=weights, x=x, b=blocks: f(w, x, b).block_until_ready()
        rows.append(dict(ffn=ffn_name, shape=shape_name, groups=groups, tokens=tokens, label=label, keep=keep, k=k,
                         nb=nb, error=err))
  times = timing.round_robin(fns, repeats)
  for r in rows:
    key = (r["ffn"], r["shape"], r["groups"])
    r["dense_ms"] = 1e3 * times[key + ("dense",)]
    r["sparse_ms"] = 1e3 * times[key + (r["label"],)]
  return rows


def report(rows: List[Dict[str, object]]) -> None:
  print("| FFN | shape (groups × tokens) | block sparsity | blocks kept k / nb (FLOPs ratio) | dense ms "
        "| block-sparse ms | time ratio | max rel. |Δ| |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['ffn']} | {r['shape']} {r['groups']}×{r['tokens']} | {r['label']} | {r['k']}/{r['nb']} "
          f"({r['k'] / r['nb']:.3f}) | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
          f"{r['sparse_ms'] / r['dense_ms']:.3f} | {r['error']:.1e} |")


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--keep", default=",".join(map(str, KEEP)), help="comma-separated block sparsities (0, 1]")
  parser.add_argument("--measured", default="", help="a profiler sparsity.json: add its measured block sparsities")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  try:
    keeps = {f"{float(f):g}": float(f) for f in args.keep.split(",") if f.strip()}
  except ValueError:
    parser.error(f"--keep={args.keep!r} is not a comma-separated list of numbers")
  if not keeps or not all(0 < f <= 1 for f in keeps.values()):
    parser.error(f"--keep={args.keep!r}: block sparsities must be in (0, 1]")
  if args.measured:
    if not os.path.exists(args.measured):
      parser.error(f"--measured={args.measured}: no such file")
    keeps.update({f"{k} ({v:.3f})": v for k, v in measured_keeps(args.measured).items()})
  p = PRESETS[args.preset]
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, "
        f"load average at the start {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  print(f"preset {args.preset}: one FFN d_model {p['d_model']}, d_ff {p['d_ff']}, block B = {p['block']}, fp32; "
        f"median of {args.repeats}")
  rows = run(args.preset, keeps, args.repeats)
  report(rows)
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  sys.stdout.flush()
  return rows


if __name__ == "__main__":
  main()
