"""Train-step throughput of the decoder LM: python-loop vs nn.scan layers, with/without remat.

    python -m benchmarks.train_step [--layers 8] [--steps 20]

Prints tokens/s for each variant and its ratio to the python-loop baseline, measured in one run
on whatever backend jax picks (CPU here; run it on a TPU/GPU VM for accelerator numbers).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import lm
from skipjax import models
from skipjax.train import optim, sharding, state as state_lib, step as step_lib


def bench(overrides, layers, steps, batch, seq):
  config = lm.get_config("tiny")
  config.model.update(vocab_size=256, num_layers=layers, **overrides)
  config.data.update(batch_size=batch, seq_len=seq)
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, seq), jnp.int32), mesh)
  train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx),
                  in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
  data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, sharding.batch_sharding(mesh))
  t = time.perf_counter()
  state, m = train(state, data, jax.random.key(1))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    state, m = train(state, data, jax.random.key(1))
  jax.block_until_ready(m)
  return batch * seq * steps / (time.perf_counter() - t), compile_s


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  args = parser.parse_args()
  variants = {"loop": {}, "scan": {"scan_layers": True}, "scan+remat": {"scan_layers": True, "remat": True}}
  print(f"backend={jax.default_backend()} layers={args.layers} batch={args.batch}x{args.seq}")
  base = None
  for name, overrides in variants.items():
    tps, compile_s = bench(overrides, args.layers, args.steps, args.batch, args.seq)
    base = base or tps
    print(f"{name:12s} {tps:10.0f} tokens/s  ratio {tps / base:5.2f}x  compile {compile_s:5.1f}s")


if __name__ == "__main__":
  main()
