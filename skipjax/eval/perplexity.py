"""Held-out perplexity exp(mean token NLL) of a dataset (the LM quality metric of LtS §4)."""
import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model",))
def _nll_sum(params, inputs, targets, weights, *, model: nn.Module):
  logits = model.apply({"params": params}, inputs, rngs={"gate": jax.random.key(0)})  # `random` router baseline
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights)


def perplexity(model: nn.Module, params: Any, dataset: Any, num_batches: int) -> Dict[str, float]:
  """Mean NLL and perplexity over the first `num_batches` batches of `dataset` (a
  `skipjax.data.Dataset`: `batch(i)` → {'inputs', 'targets'[, 'weights']} [B, T])."""
  if getattr(dataset, "num_batches", None):
    num_batches = min(num_batches, dataset.num_batches)
  total, count = 0.0, 0.0
  for i in range(num_batches):
    batch = dataset.batch(i)
    weights = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
    s, c = _nll_sum(params, jnp.asarray(batch["inputs"], jnp.int32), jnp.asarray(batch["targets"], jnp.int32),
                    jnp.asarray(weights, jnp.float32), model=model)
    total, count = total + float(s), count + float(c)
  if count == 0:
    raise ValueError("perplexity: no tokens were evaluated (num_batches=0 or an empty dataset)")
  loss = total / count
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": count}
