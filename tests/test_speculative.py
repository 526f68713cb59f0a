"""Self-speculative decoding (skipjax/decode/speculative.py) and the multi-token cached forward.

References: plain greedy `decode.generate` (the output must be identical), a full forward without
cache (the chunked cached forward), and an independent numpy simulation of the rounds that drafts
with full forwards of the model under the plan '0:E' (the acceptance counts).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import decode, models
from skipjax.decode import speculative

L, V, TP, NEW = 4, 64, 5, 14
# Learned positions with N(0, 1) rows and layers of different strength: varied greedy tokens, and
# early exits that agree with the full model on some tokens only.
LEARNED = models.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=24,
                                   position="learned", tie_embeddings=False)
ROPE = models.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, num_layers=3, d_ff=64,
                                max_len=24, position="rope")


@functools.lru_cache(maxsize=None)
def _setup(cfg):
  model = models.build(cfg)
  params = nn.meta.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))["params"])
  for i, s in enumerate((6.0, 3.0, 8.0, 4.0)[:cfg.num_layers]):
    params[f"block_{i}"] = jax.tree.map(lambda a, s=s: a * s if a.ndim >= 2 else a, params[f"block_{i}"])
  if "pos_embed" in params:
    params["pos_embed"] = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), a.shape), params["pos_embed"])
  return model, params


def _prompts(batch):
  """The first `batch` of three fixed prompts."""
  return np.asarray(jax.random.randint(jax.random.key(7), (3, TP), 0, V), np.int32)[:batch]


@functools.lru_cache(maxsize=None)
def _greedy(cfg):
  """Plain greedy decoding of the three prompts, NEW + 4 tokens (the last round compares drafts
  past NEW); rows are independent, so row 0 is also the batch-1 reference."""
  model, params = _setup(cfg)
  return np.asarray(decode.generate(model, params, _prompts(3), NEW + 4).generated)


@functools.lru_cache(maxsize=None)
def _forward(cfg, plan):
  """Full forward (no cache) of the model under `plan` on [B, max_len] tokens → logits."""
  model, params = _setup(cfg)
  sub = decode.decode_model(model, plan) if plan else model
  return jax.jit(lambda t: sub.apply({"params": params}, t))


def _reference_rounds(cfg, prompts, full_tokens, exit_layer, d):
  """Independent count: rounds in lockstep, drafts from full forwards of the plan '0:E'; a_b = the
  leading drafts equal to the full model's greedy tokens (known from plain greedy decoding)."""
  forward = _forward(cfg, f"0:{exit_layer}")
  batch = prompts.shape[0]
  seq = np.concatenate([prompts, full_tokens], axis=1)  # the committed tokens, as they will be
  per_round, n = [], TP - 1  # n: position of the last committed token
  while n + 1 - TP < NEW:
    draft = np.zeros((batch, cfg.max_len), np.int32)
    draft[:, :n + 1] = seq[:, :n + 1]
    for i in range(d):  # x_{i+1} from the draft's logits at position n + i
      draft[:, n + i + 1] = np.argmax(np.asarray(forward(draft))[:, n + i], axis=-1)
    agree = np.cumprod(draft[:, n + 1:n + 1 + d] == seq[:, n + 1:n + 1 + d], axis=1)
    a = int(agree.sum(axis=1).min())
    per_round.append(a)
    n += min(a + 1, d)
  return per_round


# (config, E, d, batch): E = 1 and E = L, d = 1, 2, 4; batch 3 runs the prompts in lockstep.
CASES = [(LEARNED, 1, 1, 3), (LEARNED, 2, 4, 1), (LEARNED, L, 4, 3), (ROPE, 2, 2, 1)]


@pytest.mark.parametrize("cfg,exit_layer,d,batch", CASES, ids=lambda v: getattr(v, "position", v))
def test_equals_greedy_and_independent_count(cfg, exit_layer, d, batch):
  """Each row equals plain greedy decoding; the acceptance counts equal the independent simulation."""
  model, params = _setup(cfg)
  prompts = _prompts(batch)
  result = speculative.self_speculative_generate(model, params, prompts, NEW, exit_layer=exit_layer, num_draft=d)
  greedy = _greedy(cfg)[:batch]
  np.testing.assert_array_equal(np.asarray(result.generated), greedy[:, :NEW])
  np.testing.assert_array_equal(np.asarray(result.tokens), np.concatenate([prompts, greedy[:, :NEW]], axis=1))
  want = _reference_rounds(cfg, prompts, greedy, exit_layer, d)
  rounds = int(result.rounds)
  assert rounds == len(want)
  np.testing.assert_array_equal(np.asarray(result.accepted_per_round)[:rounds], want)
  assert int(result.accepted) == sum(want) and int(result.drafted) == rounds * d
  assert int(result.emitted) == sum(min(a + 1, d) for a in want) >= NEW
  if exit_layer == cfg.num_layers:
    assert result.acceptance_rate == 1.0 and rounds == -(-NEW // d)
  if d == 1:
    assert rounds == NEW
  if (cfg, exit_layer, d, batch) == (LEARNED, 2, 4, 1):  # the rollback path runs: some drafts rejected
    assert 0.0 < result.acceptance_rate < 1.0 and 1.0 < result.tokens_per_round < d
  print(f"E={exit_layer} d={d} B={batch}: acceptance {result.acceptance_rate:.3f}, "
        f"{result.tokens_per_round:.2f} tokens/round")


def test_chunked_cached_forward_equals_full_forward():
  """Chunks of 6, 1 and 6 tokens through the KV cache (RoPE, GQA) = one full forward."""
  model, params = _setup(ROPE)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 13), 0, V), np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  cache = decode.init_cache(model, 2)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True, mutable=["cache"]))
  outs, start = [], 0
  for size in (6, 1, 6):
    logits, state = step(cache, tokens[:, start:start + size])
    cache, start = state["cache"], start + size
    outs.append(np.asarray(logits))
    assert int(cache["index"]) == start
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)


def test_verify_from_hidden_equals_full_forward():
  """`verify` (positions E… from given layer-E hidden states, cache of layers < E) = full forward."""
  model, params = _setup(LEARNED)
  draft, verifier = speculative.split(model, 2)
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (1, 9), 0, V), np.int32)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens))

  @jax.jit
  def draft_then_verify(tokens):
    # The draft over the whole chunk fills the cache of layers < 2; its block_1 output is h_2.
    _, state = draft.apply({"params": params, "cache": decode.init_cache(model, 1)}, tokens, decode=True,
                           mutable=["cache", "intermediates"],
                           capture_intermediates=lambda m, name: name == "decode" and m.name == "block_1")
    hidden = state["intermediates"]["block_1"]["decode"][-1]
    cache = {**state["cache"], "index": jnp.zeros((), jnp.int32)}
    return speculative.verify(verifier, params, cache, tokens, hidden)
  logits, cache = draft_then_verify(tokens)
  np.testing.assert_allclose(np.asarray(logits), full, rtol=1e-4, atol=1e-4)
  assert "cached_key" in cache["block_3"]["attn"]


def test_bad_arguments_name_the_field():
  model, params = _setup(LEARNED)
  prompt = _prompts(1)
  with pytest.raises(ValueError, match="exit_layer=5"):
    speculative.self_speculative_generate(model, params, prompt, 4, exit_layer=5, num_draft=2)
  with pytest.raises(ValueError, match="num_draft=0"):
    speculative.self_speculative_generate(model, params, prompt, 4, exit_layer=2, num_draft=0)
  with pytest.raises(ValueError, match="max_len=24"):
    speculative.self_speculative_generate(model, params, prompt, 18, exit_layer=2, num_draft=4)
