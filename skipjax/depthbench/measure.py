"""What the bench measures for every point: quality (NLL on the eval text, top-1 agreement with the
full model's greedy continuation), executed depth, analytic FLOPs per token, and wall time
(prefill, batch-1 decoding), all on this machine in this run."""
import functools
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax import routing
from skipjax.decode import speculative
from skipjax.models import executed as executed_lib
from skipjax.models import layout

Batch = Dict[str, np.ndarray]


# -- quality -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _score_fn(model):
  """jit: (NLL sum, agreement sum, weight sum, executed-depth sum) of one batch, with optional
  `gate_override` masks and the 'gate' rng (random routers)."""
  def fn(params, inputs, targets, weights, overrides, rng):
    variables = {"params": params}
    if overrides is not None:
      variables["gate_override"] = overrides
    logits, state = model.apply(variables, inputs, mutable=["gates"], rngs={"gate": rng})   # [B, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]                  # [B, T]
    agree = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    depth = executed_lib.executed_depth(state.get("gates", {}), model.config.execution_plan)
    if depth is None:  # nothing routed: every position of the plan runs its branches
      depth = jnp.full(targets.shape, sum((e.attn + e.ffn) / 2 for e in model.config.execution_plan))
    return (jnp.sum(nll * weights), jnp.sum(agree * weights), jnp.sum(weights),
            jnp.sum(depth.astype(jnp.float32) * weights))
  return jax.jit(fn)


def score(model, params, batches: Sequence[Batch], overrides: Optional[Callable[[int], Any]] = None,
          seed: int = 0) -> Dict[str, float]:
  """Mean NLL, top-1 agreement (argmax == target) and executed layers per token over the tokens
  where 'weights' is 1. `overrides(i)`: the `gate_override` collection (loop layout) of batch i."""
  fn = _score_fn(model)
  totals = np.zeros(4)
  for i, b in enumerate(batches):
    w = b.get("weights", np.ones(b["targets"].shape, np.float32))
    ov = None if overrides is None else overrides(i)
    out = fn(params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), jnp.asarray(w), ov,
             jax.random.fold_in(jax.random.key(seed), i))
    totals += np.asarray([float(x) for x in out])
  return {"nll": totals[0] / totals[2], "agreement": totals[1] / totals[2], "depth": totals[3] / totals[2]}


def quality(eval_score: Dict[str, float], agree_score: Dict[str, float]) -> Dict[str, float]:
  """A point's quality fields from its eval-text and continuation scores."""
  return {"nll": float(eval_score["nll"]), "ppl": float(np.exp(eval_score["nll"])),
          "agreement": float(agree_score["agreement"]), "depth": float(eval_score["depth"])}


def keep_overrides(keep: np.ndarray):
  """[L, 2, B, T] keep decisions (attention, FFN) → the loop-layout `gate_override` collection."""
  stacked = {name: jnp.asarray(keep[:, b], jnp.float32) for b, name in enumerate(("attn", "ffn"))}
  return layout.to_loop({layout.SCAN_KEY: {layout.SCAN_BLOCK: stacked}})


# -- FLOPs -------------------------------------------------------------------------------------

def flops_per_token(cfg: models.TransformerConfig, attn: Sequence[float], ffn: Sequence[float], seq_len: int,
                    heads: float = 1.0, router: bool = False) -> float:
  """Analytic forward FLOPs per token (`routing.flops_per_token`, causal attention over `seq_len`):
  `attn`/`ffn` [P] the executed fraction of each position's attention / FFN (a per-token average:
  a routed-off branch costs nothing, attention keeps its K/V projections only where the policy
  computes them, which this count folds into `attn`), plus `heads` evaluations of the LM head."""
  d_ff = cfg.ffn.hidden(cfg.d_model, cfg.d_ff)
  body = routing.flops_per_token(np.ones(len(attn)), d_model=cfg.d_model, d_ff=d_ff, seq_len=seq_len,
                                 num_heads=cfg.num_heads, head_dim=cfg.head_dim or None,
                                 ffn_matrices=3 if cfg.mlp_gated else 2, causal=True, router=router,
                                 attn=np.asarray(attn, np.float32), ffn=np.asarray(ffn, np.float32))
  return float(body) + heads * 2 * cfg.d_model * cfg.vocab_size


# -- wall time ---------------------------------------------------------------------------------

class Timer:
  """Prefill and batch-1 decode times, shared by points whose programs have the same shape
  (`key`: e.g. a plan's per-position branches; the parameters differ, the computation does not)."""

  def __init__(self, repeats: int, cache: Optional[Dict[str, float]] = None):
    self.repeats = repeats
    self.cache = {} if cache is None else cache

  def __call__(self, key: str, fn: Callable[[], Any]) -> float:
    if key not in self.cache:
      self.cache[key] = speculative.best_seconds(fn, self.repeats)  # warm: a first call compiles
    return self.cache[key]


@functools.lru_cache(maxsize=64)
def _forward_fn(model):
  def fn(params, tokens, overrides, rng):
    variables = {"params": params}
    if overrides is not None:
      variables["gate_override"] = overrides
    return model.apply(variables, tokens, rngs={"gate": rng})
  return jax.jit(fn)


def prefill(model, params, tokens: np.ndarray, overrides=None) -> Callable[[], Any]:
  """A forward of [1, T] prompt tokens (what prefill computes; the KV cache write is the same for
  every method that runs the position)."""
  fn = _forward_fn(model)
  tokens = jnp.asarray(tokens)
  return lambda: fn(params, tokens, overrides, jax.random.key(0))
