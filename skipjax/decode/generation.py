"""KV-cache generation with per-step gating (LtS §2.3, Algorithm 2).

Every step feeds one token per sequence through `Transformer(..., decode=True)`: in each layer
the router decides with argmax; K/V of the token are always written to the cache, the query,
attention and FFN run only where it is routed (at batch 1 inside a `lax.cond`, see
`Block.decode`). The prompt is prefilled token by token through the same step, and the whole
prefill + generation is one `lax.scan` under one `jax.jit`.

For each generated token we record which layers executed in the step that produced it (the
compute spent to decode it), the data of LtS Fig. 7.
"""
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import plan as plan_lib
from skipjax.models import layout

Params = Any
Cache = Any


class GenerationResult(NamedTuple):
  """Output of `generate`.

  tokens: [B, Tp+N] int32, each row its prompt then its N generated tokens (positions after
    row b's `prompt_length + N` hold `pad_id`).
  generated: [B, N] int32, the generated tokens only.
  executed: [N, L, B] float32, per generated token and layer whether the layer executed in the
    step that produced the token (layer gate; with per-block gates the mean of the block gates);
    under a non-identity `config.plan` one row per plan position, [N, P, B].
  skipped_layers: [B, N] float32, L − Σ_l executed: layers each generated token skipped (a plan
    that repeats layers can make it negative).
  """
  tokens: jnp.ndarray
  generated: jnp.ndarray
  executed: jnp.ndarray
  skipped_layers: jnp.ndarray


def executed_layers(gates: Mapping[str, Any], num_layers: int, batch_size: int, plan=None) -> jnp.ndarray:
  """[L, B] float32: whether each layer executed for the current token (one decoding step).

  LtS Alg. 2: with layer routing (`layer_mask`) 1 where the router activated the layer; with
  per-block routing the mean of the sown block gates (attention/FFN), as in the training
  metric `executed_depth`; a dense model executes every layer. Under a non-identity execution
  `plan` one row per plan position (a branch the plan turns off counts as not executed).
  """
  names = set(layout.sown_names(gates))
  if plan is not None and not plan_lib.is_identity(plan, num_layers):
    if "layer_mask" in names:
      return layout.per_layer(gates, "layer_mask", plan, 0.0).reshape(len(plan), batch_size).astype(jnp.float32)
    rows = [layout.per_layer(gates, n, plan, 0.0).reshape(len(plan), batch_size).astype(jnp.float32)
            for n in ("attn_mask", "ffn_mask") if n in names]
    if rows:
      return sum(rows) / len(rows)
    runs = jnp.asarray([(e.attn + e.ffn) / 2 for e in plan], jnp.float32)  # [P]
    return jnp.broadcast_to(runs[:, None], (len(plan), batch_size))
  if "layer_mask" in names:
    return models.per_layer(gates, "layer_mask").reshape(num_layers, batch_size).astype(jnp.float32)
  blocks = [models.per_layer(gates, n).reshape(num_layers, batch_size).astype(jnp.float32)
            for n in ("attn_mask", "ffn_mask") if n in names]
  if not blocks:
    return jnp.ones((num_layers, batch_size), jnp.float32)
  return sum(blocks) / len(blocks)


def init_cache(model: nn.Module, batch_size: int) -> Cache:
  """An empty KV cache of `model.config.max_len` slots (all zeros, index 0), without params."""
  tokens = jnp.zeros((batch_size, model.config.max_len), jnp.int32)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: model.init({"params": key, "gate": key}, tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model: nn.Module, params: Params, cache: Cache, token: jnp.ndarray,
                gate_rng: Optional[jax.Array] = None):
  """One LtS Alg. 2 step: token [B, 1] → (last logits [B, V], new cache, executed [L, B])."""
  rngs = {"gate": gate_rng if gate_rng is not None else jax.random.key(0)}
  logits, state = model.apply({"params": params, "cache": cache}, token, decode=True,
                              mutable=["cache", "gates"], rngs=rngs)
  cfg = model.config
  executed = executed_layers(state.get("gates", {}), cfg.num_layers, token.shape[0], cfg.execution_plan)
  return logits[:, -1], state["cache"], executed


def make_step_fn(model: nn.Module) -> Callable:
  """`decode_step` jitted once for `model`, cache donated: (params, cache, token, rng) → ..."""
  return jax.jit(functools.partial(decode_step, model), donate_argnums=(1,))


def sample_next(logits: jnp.ndarray, rng: jax.Array, temperature: float = 0.0,
                top_k: int = 0) -> jnp.ndarray:
  """Next token [B] from logits [B, V]: argmax when temperature = 0 (greedy, LtS §3), else a
  sample from softmax(logits / temperature), restricted to the `top_k` largest when top_k > 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "eos_id",
                                             "pad_id"))
def _generate(params, prompt, lengths, rng, *, model, max_new_tokens, temperature, top_k, eos_id, pad_id):
  batch, prompt_len = prompt.shape
  steps = prompt_len + max_new_tokens - 1
  buf = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)

  def step(carry, t):
    cache, buf, done = carry
    sample_rng, gate_rng = jax.random.split(jax.random.fold_in(rng, t))
    token = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
    logits, cache, executed = decode_step(model, params, cache, token, gate_rng)
    nxt = sample_next(logits, sample_rng, temperature, top_k)
    generating = t + 1 >= lengths
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (generating & (nxt == eos_id))
    given = jax.lax.dynamic_slice_in_dim(buf, t + 1, 1, axis=1)[:, 0]
    buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(generating, nxt, given)[:, None], t + 1, axis=1)
    return (cache, buf, done), executed

  carry = (init_cache(model, batch), buf, jnp.zeros((batch,), bool))
  (_, buf, _), executed = jax.lax.scan(step, carry, jnp.arange(steps))  # [S, L, B]
  offsets = jnp.arange(max_new_tokens)
  # Generated token i of row b is produced by the step whose input sits at lengths[b] - 1 + i.
  step_of = lengths[None, :] - 1 + offsets[:, None]  # [N, B]
  executed = jnp.take_along_axis(executed.transpose(0, 2, 1), step_of[:, :, None], axis=0)  # [N, B, L]
  executed = executed.transpose(0, 2, 1)
  generated = jnp.take_along_axis(buf, lengths[:, None] + offsets[None, :], axis=1)
  valid = jnp.arange(buf.shape[1])[None, :] < (lengths + max_new_tokens)[:, None]
  tokens = jnp.where(valid, buf, pad_id)
  skipped = model.config.num_layers - jnp.sum(executed, axis=1).T
  return GenerationResult(tokens, generated, executed, skipped)


def generate(model: nn.Module, params: Params, prompt_tokens, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None,
             pad_id: int = 0) -> GenerationResult:
  """Greedy (temperature 0) or sampled generation with the KV cache and per-step routing.

  Args:
    model: a decoder `Transformer` (its `config.max_len` is the cache length).
    params: its parameters.
    prompt_tokens: [B, Tp] int32; rows may be right-padded when `prompt_lengths` is given.
    max_new_tokens: N ≥ 1 tokens generated per row.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: with sampling, keep only the k most likely tokens (0 = all).
    rng: key for sampling (and random-gating routers); required when temperature > 0.
    eos_id: when given, a row that generated it keeps emitting it.
    prompt_lengths: [B] true prompt lengths (≥ 1); default Tp for every row.
    pad_id: fills `tokens` after each row's prompt_length + N.

  Returns:
    A `GenerationResult`.
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be [batch, prompt_len ≥ 1], got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 1")
  max_len = model.config.max_len
  if prompt.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"config.model.max_len={max_len} is smaller than prompt length {prompt.shape[1]} + "
                     f"max_new_tokens {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be ≥ 0")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng")
  if prompt_lengths is None:
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
  else:
    lengths_np = np.asarray(prompt_lengths, np.int32)
    if lengths_np.shape != (prompt.shape[0],) or lengths_np.min() < 1 or lengths_np.max() > prompt.shape[1]:
      raise ValueError(f"prompt_lengths must be [{prompt.shape[0]}] values in 1..{prompt.shape[1]}")
    lengths = jnp.asarray(lengths_np)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(params, prompt, lengths, rng, model=model, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=int(top_k),
                   eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id))
