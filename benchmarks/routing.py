"""SkipLayer speed (LtS §2.2, Fig. 4c/d): train-step time vs the dense stack, and decode time.

    python -m benchmarks.routing --preset cpu     # small shapes, minutes on a 2-core CPU
    python -m benchmarks.routing --preset gpu     # FFN-dominated LtS-like shapes, one accelerator

1. Forward+backward step time of a SkipLayer stack vs the dense stack of the same depth, at
   P ∈ {0.5, 0.25, 0.125}, for each dispatch (masked | capacity | grouped). Routing decisions come
   from the random-gating router (Bernoulli(P)), so every dispatch computes the same tokens and
   timing does not depend on training; the learned routers cost one [d, 2] matmul more.
2. Batch-1 decode time per token of SkipLayer(2L, 50%) vs dense(L) with the KV cache (LtS Fig. 4c):
   random-gating routers (Bernoulli(0.5) per token and layer, a fresh key per step) decide, so
   half of the token-layers run; each layer's Q/attention/FFN sit in a `lax.cond`. The routed
   fraction is printed.
3. Mixture-of-Depths (Raposo et al. 2024; `--parts mod`): train-step time of an MoD stack (expert-choice
   top-k, C = ⌊P·T⌋ per sequence, gathered by `routing.topk_dispatch`; every layer or every other
   layer routed) vs the dense stack, at P ∈ {0.5, 0.125}.
All ratios are measured in one run, on one device.
"""
import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models, routing

PRESETS = {
    # LtS §3 shapes (FFN 8×d, head dim 64) scaled to one accelerator.
    "gpu": dict(d_model=1024, heads=16, d_ff=8192, layers=8, batch=8, seq=1024, gsize=128, dtype="bfloat16"),
    "cpu": dict(d_model=128, heads=4, d_ff=1024, layers=4, batch=4, seq=256, gsize=32, dtype="float32"),
}


def _config(p, layers, router="none", dispatch="masked", density=1.0):
  return models.TransformerConfig(
      vocab_size=1024, d_model=p["d_model"], num_heads=p["heads"], num_layers=layers, d_ff=p["d_ff"],
      max_len=p["seq"], dtype=p["dtype"],
      skip=models.SkipConfig(router=router, dispatch=dispatch, target_density=density, gsize=p["gsize"],
                             capacity_factor=1.25))


def _time(fn, *args, iters):
  jax.block_until_ready(fn(*args))  # compile + warm up
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def step_time(cfg, tokens, iters):
  fn, args = step_fn(cfg, tokens)
  return _time(fn, *args, iters=iters)


def step_fn(cfg, tokens):
  """(jitted forward+backward step, its args) of the model `cfg` on `tokens` (timed by `step_time`)."""
  model = models.build(cfg)
  params = nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, tokens[:1])["params"])

  @jax.jit
  def grad_step(params, tokens, rng):
    def loss(p):
      logits, _ = model.apply({"params": p}, tokens, deterministic=False, rngs={"gate": rng},
                              mutable=["gates", "aux_loss"])
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return jax.grad(loss)(params)

  return grad_step, (params, tokens, jax.random.key(2))


def decode_time(cfg, steps, iters):
  model = models.build(cfg)
  zeros = jnp.zeros((1, cfg.max_len), jnp.int32)
  params = nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, zeros)["params"])
  cache = model.init(jax.random.key(0), zeros, decode=True)["cache"]

  @jax.jit
  def generate(params, cache):
    def body(carry, step):
      cache, tok = carry
      logits, state = model.apply({"params": params, "cache": cache}, tok, decode=True, mutable=["cache", "gates"],
                                  rngs={"gate": jax.random.fold_in(jax.random.key(2), step)})
      executed = sum((jnp.sum(m) for m in jax.tree.leaves(state.get("gates", {}))), jnp.zeros(()))
      return (state["cache"], jnp.argmax(logits, -1).astype(jnp.int32)), executed
    (_, last), executed = jax.lax.scan(body, (cache, jnp.zeros((1, 1), jnp.int32)), jnp.arange(steps))
    return executed, last  # `last` depends on every step, so nothing is dead code

  seconds = _time(generate, params, cache, iters=iters)
  executed = np.asarray(generate(params, cache)[0])
  routed = float(executed.mean() / cfg.num_layers) if cfg.skip.router != "none" else 1.0
  return seconds / steps, routed


def flops_ratio(p, density):
  """Analytic forward FLOPs of the SkipLayer stack / dense stack (routing.flops_per_token)."""
  kw = dict(d_model=p["d_model"], d_ff=p["d_ff"], seq_len=p["seq"], num_heads=p["heads"], causal=True)
  skip = routing.flops_per_token([density] * p["layers"], router=True, **kw)
  return float(skip / routing.flops_per_token([1.0] * p["layers"], router=False, **kw))


def train_table(p, tokens, iters):
  dense = step_time(_config(p, p["layers"]), tokens, iters)
  print(f"\n## train step (fwd+bwd), L={p['layers']}: dense {dense * 1e3:.1f} ms")
  print("| P | FLOPs ratio (ideal) | masked | capacity | grouped |\n|---|---|---|---|---|")
  # P = 1 isolates the dispatch overhead (gather/scatter, routing) from the saved compute.
  for density in (1.0, 0.5, 0.25, 0.125):
    row = []
    for dispatch in ("masked", "capacity", "grouped"):
      t = step_time(_config(p, p["layers"], "random", dispatch, density), tokens, iters)
      row.append(f"{t * 1e3:.1f} ms ({t / dense:.2f}×)")
    print(f"| {density} | {flops_ratio(p, density):.2f}× | " + " | ".join(row) + " |")



def decode_row(p, steps, iters):
  half = max(p["layers"] // 2, 1)
  t_dense, _ = decode_time(_config(p, half), steps, iters)
  t_skip, routed = decode_time(_config(p, 2 * half, "random", "masked", 0.5), steps, iters)
  print(f"\n## batch-1 decode per token: dense(L={half}) {t_dense * 1e3:.3f} ms, "
        f"SkipLayer(L={2 * half}, routed {routed:.2f}) {t_skip * 1e3:.3f} ms, ratio {t_skip / t_dense:.2f}×")


# -- Mixture-of-Depths --------------------------------------------------------------------------

MOD_DENSITIES = (0.5, 0.125)
MOD_EVERY = (1, 2)


def mod_config(p, density, every):
  """MoD stack: router='mod', capacity ⌊P·T⌋, every `every`-th layer routed (training: top-k gather)."""
  return dataclasses.replace(_config(p, p["layers"]), skip=models.SkipConfig(
      router="mod", target_density=density, mod_every=every))


def mod_flops_ratio(p, density, every):
  """Analytic forward FLOPs of the MoD stack / dense (routing.flops_per_token; K/V for every token)."""
  kw = dict(d_model=p["d_model"], d_ff=p["d_ff"], seq_len=p["seq"], num_heads=p["heads"], causal=True)
  densities = [density if i % every == every - 1 else 1.0 for i in range(p["layers"])]
  mod = routing.flops_per_token(densities, router=False, **kw)
  return float(mod / routing.flops_per_token([1.0] * p["layers"], router=False, **kw))


def mod_table(p, tokens, iters, rounds=5):
  """MoD vs dense step time, measured round robin (`rounds` × `iters` steps of each model, dense
  included): the median per-round time and per-round ratio to dense, robust to a shared machine."""
  cases = {"dense": _config(p, p["layers"])}
  cases.update({(every, density): mod_config(p, density, every) for every in MOD_EVERY for density in MOD_DENSITIES})
  fns = {k: step_fn(cfg, tokens) for k, cfg in cases.items()}
  times = {k: [] for k in fns}
  for k, (fn, args) in fns.items():
    _time(fn, *args, iters=1)  # compile + warm up
  for _ in range(rounds):
    for k, (fn, args) in fns.items():
      times[k].append(_time(fn, *args, iters=iters))
  dense = np.asarray(times["dense"])
  print(f"\n## Mixture-of-Depths train step (fwd+bwd), L={p['layers']}, median of {rounds} rounds × {iters} steps: "
        f"dense {np.median(dense) * 1e3:.1f} ms")
  print("| P | routed layers | FLOPs ratio (ideal) | MoD top-k gather (ratio to dense) |\n|---|---|---|---|")
  for every in MOD_EVERY:
    for density in MOD_DENSITIES:
      t = np.asarray(times[(every, density)])
      routed = "all" if every == 1 else f"1 in {every}"
      print(f"| {density} | {routed} | {mod_flops_ratio(p, density, every):.2f}× | "
            f"{np.median(t) * 1e3:.1f} ms ({np.median(t / dense):.2f}×) |")


def lts_groups_table():
  """The routing groups of the `configs/skiplayer.py:lts_L*_P*` presets (issue 15 P2): groups per
  batch, tokens and gsize chunks per group, and the expected compute fraction at P
  (`routing.effective_groups`), beside the one-row groups the presets used before."""
  from configs import skiplayer  # the configs package sits beside benchmarks/
  print("\n## routing groups of the lts presets (expected compute fraction, grouped dispatch)")
  print("| preset | groups/batch | tokens/group | gsize | chunks/group | FFN fraction | attention fraction |"
        " one-row groups (before) |\n|---|---|---|---|---|---|---|---|")
  for density in skiplayer.LTS_DENSITIES[1:]:
    c = skiplayer.get_config(f"lts_L24_P{density:g}")
    d, s = c.data, c.model.skip
    g = routing.effective_groups(d.batch_size, d.seq_len, group_size=s.group_size, gsize=s.gsize,
                                 target_density=density, method=s.dispatch)
    old = routing.effective_groups(d.batch_size, d.seq_len, group_size=0, gsize=s.gsize, target_density=density,
                                   method=s.dispatch)
    print(f"| lts_L24_P{density:g} | {g.groups_per_batch} | {g.tokens_per_group} | {g.gsize} | {g.chunks_per_group} "
          f"| {g.compute_fraction:.3f} | {g.row_compute_fraction:.3f} | {old.compute_fraction:.3f} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--decode_steps", type=int, default=128)
  parser.add_argument("--parts", default="groups,train,decode,mod", help="comma list of: groups, train, decode, mod")
  args = parser.parse_args()
  p = PRESETS[args.preset]
  print(f"device={jax.devices()[0].device_kind} preset={args.preset} {p}")
  tokens = jax.random.randint(jax.random.key(0), (p["batch"], p["seq"]), 0, 1024)

  if "groups" in args.parts:
    lts_groups_table()
  if "train" in args.parts:
    train_table(p, tokens, args.iters)
  if "decode" in args.parts:
    decode_row(p, args.decode_steps, args.iters)
  if "mod" in args.parts:
    mod_table(p, tokens, args.iters)


if __name__ == "__main__":
  main()
