"""Restore a trained model from a training workdir (`config.json` + orbax `checkpoints/`)."""
import json
import os
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from skipjax import models
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.train import checkpoint as checkpoint_lib
from skipjax.train import optim
from skipjax.train import state as state_lib


class Restored(NamedTuple):
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  step: int
  tokenizer: Optional[Any]  # None for synthetic tasks (token ids only)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json (not a training workdir)")
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Byte tokenizer, the workdir's BPE (`tokenizer.json`), or None for synthetic sources."""
  if config.data.source.startswith("synthetic:"):
    return None
  if config.data.tokenizer == "byte":
    return tokenizer_lib.ByteTokenizer()
  path = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.tokenizer='bpe' but {path} is missing")
  return tokenizer_lib.load_or_train_bpe(config.data.bpe_vocab_size, lambda: [], workdir)


def restore(workdir: str, step: Optional[int] = None) -> Restored:
  """Params of the latest (or `step`) checkpoint, restored onto the first local device."""
  config = load_config(workdir)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config.train)
  example = jnp.zeros((1, config.data.seq_len), jnp.int32)

  def init_fn(rng):
    params = nn.meta.unbox(model.init(state_lib.init_rngs(rng), example)["params"])
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        jax.eval_shape(init_fn, jax.random.key(0)))
  if not checkpoint_lib.Checkpointer.committed_steps_in(workdir):
    raise FileNotFoundError(f"--workdir={workdir!r} has no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1_000_000)
  try:
    steps = ckpt.all_steps()
    step = steps[-1] if step is None else step
    if step not in steps:
      raise checkpoint_lib.CheckpointError(f"--step={step}: no such checkpoint in {ckpt.directory} "
                                           f"(steps: {', '.join(map(str, steps))})")
    state = ckpt.restore(target, step)
  finally:
    ckpt.close()
  return Restored(config, model, state.params, int(step), load_tokenizer(config, workdir))
