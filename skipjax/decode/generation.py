"""KV-cache generation with per-step gating (LtS §2.3, Algorithm 2) and a shallow decoder.

Every step feeds one token per sequence through `Transformer(..., decode=True)`: in each layer
the router decides with argmax; K/V of the token are always written to the cache, the query,
attention and FFN run only where it is routed (at batch 1 inside a `lax.cond`, see
`Block.decode`). The prompt is prefilled token by token through the same step, and the whole
prefill + generation runs under one `jax.jit` (`lax.scan` over the steps).

Prefill and decode plans (issue 13; "shallow decoder" of the Aussie AI layer-pruning survey):
the prompt runs the model's own execution plan (`model.config.plan`), every generated token
that is fed back runs `decode_plan` — a second model instance built from the same config with
that plan, sharing the params and the cache tree. The KV cache belongs to a plan position
(`block_{slot}/attn/cached_key`, the k-th repetition of a slot `cached_key_k`), so the decode
plan may only run the attention of (slot, repetition) pairs whose attention the prefill plan
ran (their cache holds the prompt); anything else is refused. Positions the decode plan leaves
out stop updating their caches: flax returns a mutable collection's variables that a model does
not touch unchanged, and nobody reads them again. The first generated token comes from the
prefill (the step of the last prompt token), the following ones from decode-plan steps.

For each generated token we record which layers executed in the step that produced it (the
compute spent to decode it), the data of LtS Fig. 7.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import plan as plan_lib
from skipjax.models import executed as executed_lib
from skipjax.models import layout

Params = Any
Cache = Any


class GenerationResult(NamedTuple):
  """Output of `generate`.

  tokens: [B, Tp+N] int32, each row its prompt then its N generated tokens (positions after
    row b's `prompt_length + N` hold `pad_id`).
  generated: [B, N] int32, the generated tokens only.
  executed: [N, L, B] float32, per generated token and layer whether the layer executed in the
    step that produced the token (the fraction of its residual blocks that ran, `executed_layers`);
    under a non-identity `config.plan` one row per plan position, [N, P, B]. With a
    `decode_plan`, token 0 has the rows of the prefill plan and tokens 1… those of the decode
    plan, zero-padded to the longer of the two ([N, max(P_prefill, P_decode), B]).
  skipped_layers: [B, N] float32, L − Σ_l executed: layers each generated token skipped (a plan
    that repeats layers can make it negative).
  """
  tokens: jnp.ndarray
  generated: jnp.ndarray
  executed: jnp.ndarray
  skipped_layers: jnp.ndarray


def executed_layers(gates: Mapping[str, Any], num_layers: int, batch_size: int, plan=None) -> jnp.ndarray:
  """[L, B] float32: how much of each layer executed for the current token (one decoding step).

  LtS Alg. 2, counted as in training and evaluation (`models.executed`): a layer counts as the
  fraction of its residual blocks that ran, an un-routed block counting as run — the layer gate
  m with layer routing, (m_attn + m_ffn)/2 with block routing, (1 + m_ffn)/2 with FFN-only
  routing, 1 for a dense layer. Under a non-identity execution `plan` one row per plan position
  (a branch the plan turns off counts as not executed: a position running only attention is 1/2).
  """
  identity = plan is None or plan_lib.is_identity(plan, num_layers)
  plan = None if identity else plan
  rows = num_layers if identity else len(plan)
  fractions = executed_lib.layer_fractions(gates, plan)
  if fractions is None:
    runs = jnp.ones((rows,), jnp.float32) if identity else jnp.asarray([(e.attn + e.ffn) / 2 for e in plan],
                                                                        jnp.float32)  # [P]
    return jnp.broadcast_to(runs[:, None], (rows, batch_size))
  return fractions.reshape(rows, batch_size)


def plan_rows(cfg) -> int:
  """Rows of `executed_layers` for a model: L for the identity plan, else its positions P."""
  plan = cfg.execution_plan
  return cfg.num_layers if plan_lib.is_identity(plan, cfg.num_layers) else len(plan)


def attention_caches(plan: plan_lib.Plan) -> dict:
  """{(slot, repetition): position} of the plan positions that run attention (own KV cache)."""
  return {(e.slot, k): p for p, (e, k) in enumerate(zip(plan, plan_lib.occurrences(plan))) if e.attn}


def check_params(model: nn.Module, params: Params, field: str) -> None:
  """One-line ValueError naming `field` when `model` runs a parameter that `params` lacks
  (e.g. a plan turning on a branch that a block-pruned export removed)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  abstract = jax.eval_shape(lambda: model.init({"params": key, "gate": key}, jnp.zeros((1, 1), jnp.int32)))
  want = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
  have = traverse_util.flatten_dict(nn.meta.unbox(params))
  missing = sorted("/".join(k) for k in set(want) - set(have))
  if missing:
    raise ValueError(f"{field}: the model under this plan needs parameter {missing[0]}, which the checkpoint "
                     "does not have (a pruned branch or layer cannot run)")


def decode_model(model: nn.Module, decode_plan: plan_lib.PlanLike, field: str = "decode_plan") -> nn.Module:
  """The shallow decoder: `model` rebuilt under `decode_plan` (same params, same cache tree).

  Raises a one-line ValueError naming `field` when the plan is malformed, when the model is
  scanned (scanned layers serve only the identity plan), or when a position of the decode plan
  runs attention whose KV cache the prefill plan (`model.config.plan`) does not fill.
  """
  cfg = model.config
  try:
    plan = plan_lib.resolve(decode_plan, cfg.num_layers)
  except ValueError as e:
    raise ValueError(f"{field}={decode_plan!r}: {str(e).replace(plan_lib.FIELD + ': ', '')}") from None
  text = decode_plan if isinstance(decode_plan, str) else plan_lib.to_string(plan)
  if cfg.scan_layers and not plan_lib.is_identity(plan, cfg.num_layers):
    raise ValueError(f"{field}={text!r} needs scan_layers=False: scanned layers serve only the identity plan "
                     "(convert params with skipjax.models.layout.to_loop)")
  prefill = cfg.execution_plan
  have = attention_caches(prefill)
  for (slot, k), p in attention_caches(plan).items():
    if (slot, k) not in have:
      cache = f"{layout.block_name(slot)}/attn/cached_key{f'_{k}' if k else ''}"
      raise ValueError(f"{field}={text!r}: position {p} runs the attention of slot {slot} (repetition {k}), whose "
                       f"KV cache {cache} the prefill plan {plan_lib.to_string(prefill)!r} never fills; a decode "
                       "plan may only run attention at (slot, repetition) pairs where the prefill plan runs it")
  return models.build(dataclasses.replace(cfg, plan=plan_lib.to_string(plan)))


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


def _pad_rows(executed: jnp.ndarray, rows: int) -> jnp.ndarray:
  return jnp.pad(executed, ((0, rows - executed.shape[0]), (0, 0)))  # [R, B]


def _select_rows(prompt_row: jnp.ndarray, a, b):
  """Per batch row: a where prompt_row [B] else b (leaves [B, …]; the scalar cache index is shared)."""
  def pick(x, y):
    if x.ndim == 0:
      return x
    return jnp.where(prompt_row.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(pick, a, b)


@functools.partial(jax.jit, static_argnames=("model", "decoder", "phases", "max_new_tokens", "temperature",
                                             "top_k", "eos_id", "pad_id"))
def _generate(params, prompt, lengths, rng, *, model, decoder, phases, max_new_tokens, temperature, top_k, eos_id,
              pad_id):
  """`phases` (lo, hi): steps t < lo feed prompt tokens of every row (prefill plan), lo ≤ t < hi
  prompt tokens of some rows (both plans, chosen per row), t ≥ hi generated tokens (decoder)."""
  batch, prompt_len = prompt.shape
  steps = prompt_len + max_new_tokens - 1
  buf = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)
  rows = max(plan_rows(model.config), plan_rows(decoder.config)) if decoder is not None else plan_rows(model.config)

  def prefill_run(cache, token, gate_rng, t):
    logits, cache, executed = decode_step(model, params, cache, token, gate_rng)
    return logits, cache, _pad_rows(executed, rows)

  def decode_run(cache, token, gate_rng, t):
    logits, cache, executed = decode_step(decoder, params, cache, token, gate_rng)
    return logits, cache, _pad_rows(executed, rows)

  def mixed_run(cache, token, gate_rng, t):
    prompt_row = t < lengths  # [B]
    first = prefill_run(cache, token, gate_rng, t)
    second = decode_run(cache, token, gate_rng, t)
    logits, cache = _select_rows(prompt_row, first[:2], second[:2])
    executed = jnp.where(prompt_row[None, :], first[2], second[2])  # [R, B]
    return logits, cache, executed

  def make_step(run):
    def step(carry, t):
      cache, buf, done = carry
      sample_rng, gate_rng = jax.random.split(jax.random.fold_in(rng, t))
      token = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
      logits, cache, executed = run(cache, token, gate_rng, t)
      nxt = sample_next(logits, sample_rng, temperature, top_k)
      generating = t + 1 >= lengths
      if eos_id is not None:
        nxt = jnp.where(done, eos_id, nxt)
        done = done | (generating & (nxt == eos_id))
      given = jax.lax.dynamic_slice_in_dim(buf, t + 1, 1, axis=1)[:, 0]
      buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(generating, nxt, given)[:, None], t + 1, axis=1)
      return (cache, buf, done), executed
    return step

  if decoder is None:
    schedule = [(0, steps, prefill_run)]
  else:
    lo, hi = phases
    schedule = [(0, lo, prefill_run), (lo, hi, mixed_run), (hi, steps, decode_run)]
  carry = (init_cache(model, batch), buf, jnp.zeros((batch,), bool))
  per_phase = []
  for begin, stop, run in schedule:
    if stop > begin:
      carry, ex = jax.lax.scan(make_step(run), carry, jnp.arange(begin, stop))  # [S_phase, R, B]
      per_phase.append(ex)
  buf = carry[1]
  executed = jnp.concatenate(per_phase, axis=0)  # [S, R, B]
  offsets = jnp.arange(max_new_tokens)
  # Generated token i of row b is produced by the step whose input sits at lengths[b] - 1 + i.
  step_of = lengths[None, :] - 1 + offsets[:, None]  # [N, B]
  executed = jnp.take_along_axis(executed.transpose(0, 2, 1), step_of[:, :, None], axis=0)  # [N, B, R]
  executed = executed.transpose(0, 2, 1)
  generated = jnp.take_along_axis(buf, lengths[:, None] + offsets[None, :], axis=1)
  valid = jnp.arange(buf.shape[1])[None, :] < (lengths + max_new_tokens)[:, None]
  tokens = jnp.where(valid, buf, pad_id)
  skipped = model.config.num_layers - jnp.sum(executed, axis=1).T
  return GenerationResult(tokens, generated, executed, skipped)


def generate(model: nn.Module, params: Params, prompt_tokens, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, rng: Optional[jax.Array] = None,
             eos_id: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None,
             pad_id: int = 0, decode_plan: Optional[plan_lib.PlanLike] = None) -> GenerationResult:
  """Greedy (temperature 0) or sampled generation with the KV cache and per-step routing.

  The prompt runs `model.config.plan`; with `decode_plan` every generated token fed back runs
  that plan instead (shallow decoder, see the module docstring and `decode_model`).

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
    decode_plan: None (every step runs the model's plan) or a plan (string, PlanEntries or slot
      indices, `skipjax.depth.plan.resolve`) for the steps that feed generated tokens; its
      attention positions must be (slot, repetition) pairs the model's plan runs.

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
  decoder, phases = None, None
  if decode_plan is not None:
    decoder = decode_model(model, decode_plan)
    if model.config.scan_layers:  # (only the identity decode plan passes): the model itself
      decoder = None
    else:
      check_params(decoder, params, f"decode_plan={decoder.config.plan!r}")
      known = np.asarray(lengths)
      phases = (int(known.min()), int(known.max()))
  rng = jax.random.key(0) if rng is None else rng
  return _generate(params, prompt, lengths, rng, model=model, decoder=decoder, phases=phases,
                   max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=int(top_k),
                   eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id))
