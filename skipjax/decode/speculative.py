"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024 §5), greedy, static shapes.

One round, from `n` committed positions whose KV cache is complete and the last committed token
`cur` (not yet fed):
  * draft (§5.1): the first E plan positions and the shared head (final norm + LM head on the
    layer-E hidden state) — the model under the plan `plan[:E]` (`generation.decode_model`) —
    feed cur, x₁, …, x_{d−1} one token at a time at cache slots n … n+d−1 and propose x₁ … x_d
    greedily; each step writes the K/V of layers < E and keeps its layer-E hidden state h_E;
  * verify (§5.2): ONE forward of the remaining positions `plan[E:]` over those d slots, a
    chunk of d tokens with the KV cache (causal within the chunk, `MultiHeadAttention.decode_step`),
    starting from the d hidden states h_E and attending to the draft's layer-< E cache — nothing
    of layers < E is recomputed. It gives the full model's greedy tokens y₁ … y_d;
  * accept the longest prefix a with x_i = y_i, and the full model's next token y_{a+1} (the
    "bonus"; when a = d there is none within this round: y_d = x_d is the last token): the round
    commits m = min(a + 1, d) tokens y₁ … y_m, every one the full model's greedy choice, so the
    output equals plain greedy decoding. Rollback: the cache index is set to n + m; the slots
    past it hold K/V of rejected tokens that nothing reads (attention masks slots > the query's
    own) and that the next round overwrites.

The verifier is the model under `plan[E:]`, applied to the d draft tokens; a method interceptor
(`flax.linen.intercept_methods`) hands its first block the layer-E hidden states instead of the
embedding of those tokens, so the model's own code runs every layer. E = P (the whole plan)
drafts with the full model: every draft is accepted and no verification runs.

Batches run in lockstep: every row commits min_b m_b tokens per round (still exact, since each
row's first a_b ≥ min a_b drafts are right); all rows share one prompt length; no EOS stopping.
"""
import functools
import time
from typing import Any, NamedTuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax.decode import generation
from skipjax.depth import plan as plan_lib
from skipjax.models import layout

Params = Any


class SpeculativeResult(NamedTuple):
  """Output of `self_speculative_generate`.

  tokens: [B, Tp+N] int32, prompt then the N generated tokens.
  generated: [B, N] int32.
  rounds: [] int32, draft + verify rounds run.
  accepted: [] int32, draft tokens accepted (Σ over rounds of a; with B > 1 the lockstep min_b a_b).
  drafted: [] int32, draft tokens proposed (rounds · d).
  emitted: [] int32, tokens committed (Σ m ≥ N: the last round may overshoot, cut to N).
  accepted_per_round: [N] int32, a of round r (−1 after the last round).
  """
  tokens: jnp.ndarray
  generated: jnp.ndarray
  rounds: jnp.ndarray
  accepted: jnp.ndarray
  drafted: jnp.ndarray
  emitted: jnp.ndarray
  accepted_per_round: jnp.ndarray

  @property
  def acceptance_rate(self) -> float:
    """Accepted draft tokens / drafted tokens."""
    return float(self.accepted) / max(float(self.drafted), 1.0)

  @property
  def tokens_per_round(self) -> float:
    """Committed tokens per verification round."""
    return float(self.emitted) / max(float(self.rounds), 1.0)


def split(model: nn.Module, exit_layer: int, field: str = "exit_layer"):
  """(draft, verifier) models: `model` under its plan's first E positions and under the rest
  (None when E is the whole plan). One-line ValueError naming `field` for a bad E or a plan whose
  remaining positions re-run a slot of the draft (their KV cache would be another repetition's)."""
  plan = model.config.execution_plan
  if not isinstance(exit_layer, (int, np.integer)) or not 1 <= exit_layer <= len(plan):
    raise ValueError(f"{field}={exit_layer!r} must be an integer in 1..{len(plan)} (positions of the plan "
                     f"{plan_lib.to_string(plan)!r})")
  head, tail = plan[:exit_layer], plan[exit_layer:]
  shared = sorted({e.slot for e in head} & {e.slot for e in tail})
  if shared:
    raise ValueError(f"{field}={exit_layer}: the plan {plan_lib.to_string(plan)!r} runs slot {shared[0]} both "
                     "before and after the exit, which self-speculative decoding does not support")
  draft = generation.decode_model(model, head, field)
  verifier = generation.decode_model(model, tail, field) if tail else None
  return draft, verifier


@functools.lru_cache(maxsize=64)
def _checked_split(model: nn.Module, exit_layer: int, param_paths: frozenset):
  """`split`, both models checked (`generation.check_params`) against params with these key paths;
  cached, since the check traces the model."""
  draft, verifier = split(model, exit_layer)
  params = traverse_util.unflatten_dict({path: 0 for path in param_paths})
  for sub in (draft, verifier):
    if sub is not None:
      generation.check_params(sub, params, f"exit_layer={exit_layer}")
  return draft, verifier


def _with_index(cache, index):
  return {**cache, "index": jnp.asarray(index, jnp.int32)}


def _draft_step(draft: nn.Module, params: Params, cache, token: jnp.ndarray, exit_block: str, capture: bool):
  """Token [B, 1] through the draft → (logits [B, V], cache, layer-E hidden state [B, d_model] or None)."""
  if not capture:
    logits, state = draft.apply({"params": params, "cache": cache}, token, decode=True, mutable=["cache"])
    return logits[:, -1], state["cache"], None
  # The output of the last draft position (its block's `decode`) is the layer-E hidden state.
  keep = lambda mdl, method: method == "decode" and mdl.name == exit_block
  logits, state = draft.apply({"params": params, "cache": cache}, token, decode=True,
                              mutable=["cache", "intermediates"], capture_intermediates=keep)
  hidden = state["intermediates"][exit_block]["decode"][-1]  # [B, 1, d_model]
  return logits[:, -1], state["cache"], hidden[:, 0]


def verify(verifier: nn.Module, params: Params, cache, tokens: jnp.ndarray, hidden: jnp.ndarray):
  """LayerSkip §5.2: the positions of `verifier`'s plan over a chunk of tokens [B, T] at cache slots
  index … index+T−1, starting from their hidden states `hidden` [B, T, d_model] (the output of
  the positions before) → (logits [B, T, V], cache with those slots written)."""
  first = layout.block_name(verifier.config.execution_plan[0].slot)
  swapped = []

  def start_from_hidden(next_fun, args, kwargs, context):
    if not swapped and context.method_name == "decode" and context.module.name == first:
      swapped.append(first)
      return next_fun(hidden.astype(args[0].dtype), *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(start_from_hidden):
    logits, state = verifier.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
  if not swapped:
    raise RuntimeError(f"the verifier never ran {first}.decode (cannot start it from the hidden states)")
  return logits, state["cache"]


@functools.partial(jax.jit, static_argnames=("model", "draft", "verifier", "num_draft", "max_new_tokens"))
def _speculate(params, prompt, *, model, draft, verifier, num_draft, max_new_tokens):
  batch, prompt_len = prompt.shape
  d, n_new = num_draft, max_new_tokens
  exit_block = layout.block_name(draft.config.execution_plan[-1].slot)
  capture = verifier is not None
  cache = generation.init_cache(model, batch)
  if prompt_len > 1:  # prefill all but the last prompt token in one cached chunk of the full model
    _, state = model.apply({"params": params, "cache": cache}, prompt[:, :-1], decode=True, mutable=["cache"])
    cache = state["cache"]
  buf = jnp.concatenate([prompt, jnp.zeros((batch, n_new + d), jnp.int32)], axis=1)  # room for overshoot

  def draft_body(carry, _):
    cache, token = carry
    logits, cache, hidden = _draft_step(draft, params, cache, token, exit_block, capture)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    return (cache, nxt[:, None]), (nxt, token[:, 0], hidden)

  def round_fn(carry):
    cache, buf, n, cur, rounds, accepted, per_round = carry
    (cache, _), (drafts, inputs, hidden) = jax.lax.scan(draft_body, (cache, cur[:, None]), None, length=d)
    drafts, inputs = drafts.T, inputs.T  # [B, d]: x₁…x_d, and the tokens fed (cur, x₁…x_{d−1})
    if verifier is None:
      full = drafts  # E = P: the draft is the full model
    else:
      logits, cache = verify(verifier, params, _with_index(cache, n), inputs, jnp.swapaxes(hidden, 0, 1))
      full = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, d]: y₁…y_d
    agree = jnp.cumprod((drafts == full).astype(jnp.int32), axis=1)  # [B, d]
    a = jnp.min(jnp.sum(agree, axis=1))  # lockstep over the batch
    m = jnp.minimum(a + 1, d)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, full, n + 1, axis=1)  # y₁…y_m kept, the rest overwritten
    cur = jax.lax.dynamic_index_in_dim(full, m - 1, axis=1, keepdims=False)  # [B]
    per_round = per_round.at[rounds].set(a)
    return _with_index(cache, n + m), buf, n + m, cur, rounds + 1, accepted + a, per_round

  def not_done(carry):
    n = carry[2]
    return n + 1 - prompt_len < n_new

  n0 = jnp.asarray(prompt_len - 1, jnp.int32)
  carry = (_with_index(cache, n0), buf, n0, prompt[:, -1], jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
           jnp.full((n_new,), -1, jnp.int32))
  _, buf, n, _, rounds, accepted, per_round = jax.lax.while_loop(not_done, round_fn, carry)
  tokens = buf[:, :prompt_len + n_new]
  return SpeculativeResult(tokens, tokens[:, prompt_len:], rounds, accepted, rounds * d, n + 1 - prompt_len,
                           per_round)


def self_speculative_generate(model: nn.Module, params: Params, prompt_tokens, max_new_tokens: int, *,
                              exit_layer: int, num_draft: int) -> SpeculativeResult:
  """Greedy self-speculative decoding (LayerSkip §5): output equal to `generation.generate`
  (temperature 0) of `model`, drafted by its first `exit_layer` plan positions.

  Args:
    model: a decoder `Transformer` with the loop layout (scan_layers=False unless E is the whole
      plan); its `config.max_len` must hold Tp + N + d − 2 cache slots.
    params: its parameters.
    prompt_tokens: [B, Tp] int32 (one prompt length for all rows).
    max_new_tokens: N ≥ 1.
    exit_layer: E, the draft's positions 1 … len(plan) (E = len(plan): no verification).
    num_draft: d ≥ 1 tokens drafted per round.

  Returns:
    A `SpeculativeResult` (tokens, acceptance counts).
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be [batch, prompt_len ≥ 1], got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 1")
  if not isinstance(num_draft, (int, np.integer)) or num_draft < 1:
    raise ValueError(f"num_draft={num_draft!r} must be an integer ≥ 1")
  need = prompt.shape[1] + max_new_tokens + num_draft - 2
  if need > model.config.max_len:
    raise ValueError(f"config.model.max_len={model.config.max_len} is smaller than prompt length {prompt.shape[1]} "
                     f"+ max_new_tokens {max_new_tokens} + num_draft {num_draft} − 2 = {need} (the last round "
                     "drafts past the end)")
  paths = frozenset(traverse_util.flatten_dict(nn.meta.unbox(params)))
  draft, verifier = _checked_split(model, int(exit_layer), paths)
  return _speculate(params, prompt, model=model, draft=draft, verifier=verifier, num_draft=int(num_draft),
                    max_new_tokens=int(max_new_tokens))


def best_seconds(fn, repeats: int) -> float:
  """Fastest of `repeats` warm calls of fn (a first call compiles)."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure(model: nn.Module, params: Params, prompt_tokens, max_new_tokens: int, *, exit_layer: int,
            num_draft: int, repeats: int = 3) -> dict:
  """Acceptance and wall-clock speed of self-speculative vs plain greedy decoding (all jitted, warm,
  best of `repeats`, prefill included), and whether their tokens equal `generation.generate`'s.

  `speedup` is against greedy decoding with the same one-chunk prefill and round loop (this module
  with E = the whole plan, d = 1: one full-model token per round), so it measures decoding only;
  `speedup_vs_generate` is against `generation.generate`, which feeds the prompt token by token.
  """
  spec = lambda: self_speculative_generate(model, params, prompt_tokens, max_new_tokens, exit_layer=exit_layer,
                                           num_draft=num_draft)
  greedy = lambda: self_speculative_generate(model, params, prompt_tokens, max_new_tokens,
                                             exit_layer=len(model.config.execution_plan), num_draft=1)
  plain = lambda: generation.generate(model, params, prompt_tokens, max_new_tokens)
  result, reference = spec(), plain()
  spec_s, greedy_s, plain_s = (best_seconds(f, repeats) for f in (spec, greedy, plain))
  tokens = int(np.prod(result.generated.shape))
  return {"exit_layer": int(exit_layer), "num_draft": int(num_draft), "rounds": int(result.rounds),
          "accepted": int(result.accepted), "drafted": int(result.drafted),
          "acceptance_rate": result.acceptance_rate, "tokens_per_round": result.tokens_per_round,
          "identical_to_greedy": bool(np.array_equal(np.asarray(result.generated), np.asarray(reference.generated))),
          "tokens_per_s": tokens / spec_s, "greedy_tokens_per_s": tokens / greedy_s, "speedup": greedy_s / spec_s,
          "generate_tokens_per_s": tokens / plain_s, "speedup_vs_generate": plain_s / spec_s,
          "generated_tokens": [[int(t) for t in row] for row in np.asarray(result.generated)]}
