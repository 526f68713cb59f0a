"""Early-exit decoding (skipjax/decode/early_exit.py): KV policies against from-scratch references.

References, all full forwards without a cache:
  * `propagate`: the model with `gate_override` masks m_l = [l ≤ exit] on every block (the Block's
    own gated path: exited tokens keep their state, K/V of every token from its current state);
  * `recompute` / `full`: the full model's per-layer logits (`depth.exits.layer_outputs`) at each
    token's exit position;
  * per-example exits: each row decoded alone; never exiting: plain `decode.generate`.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import decode, models
from skipjax.decode import early_exit as ee
from skipjax.depth import exits
from skipjax.routing import exit as exit_lib

L, V, TP, NEW = 4, 64, 5, 12
CFG = models.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=24,
                               position="learned", tie_embeddings=False)


@functools.lru_cache(maxsize=None)
def _setup():
  model = models.build(CFG)
  params = nn.meta.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))["params"])
  # layers of different strength and a sharp head: confidences spread over (0, 1), exits at every position
  for i, s in enumerate((6.0, 3.0, 8.0, 4.0)):
    params[f"block_{i}"] = jax.tree.map(lambda a, s=s: a * s if a.ndim >= 2 else a, params[f"block_{i}"])
  params["lm_head"] = jax.tree.map(lambda a: a * 40, params["lm_head"])
  params["embed"] = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape), params["embed"])
  prompts = np.asarray(jax.random.randint(jax.random.key(7), (3, TP), 0, V), np.int32)
  return model, params, prompts


def _threshold(measure):
  model, params, prompts = _setup()
  out = exits.layer_outputs(CFG, params, prompts)
  if measure == "saturation":
    c = exit_lib.saturation(out.hidden)
  elif measure == "entropy":
    c = exit_lib.entropy(out.logits, normalized=True)
  else:
    c = exit_lib.confidence(measure, logits=out.logits)
  # the middle of the widest gap between the 30th and 70th percentiles: no confidence sits near λ,
  # so float differences between the cached and the full forward cannot flip a decision
  values = np.sort(np.asarray(c)[0].ravel())  # position 0: about half the tokens exit there
  mid = values[int(0.3 * len(values)):int(0.7 * len(values))]
  gap = int(np.argmax(np.diff(mid)))
  return float((mid[gap] + mid[gap + 1]) / 2)


def _rule(measure="softmax_max", **kw):
  return ee.ExitRule(measure, threshold=_threshold(measure), **kw)


@pytest.mark.parametrize("policy", ["propagate", "recompute"])  # (`full` runs every position regardless)
def test_never_exiting_equals_greedy_decoding(policy):
  model, params, prompts = _setup()
  want = decode.generate(model, params, prompts, NEW)
  got = ee.generate(model, params, prompts, NEW, rule=ee.ExitRule(threshold=2.0), policy=policy)
  np.testing.assert_array_equal(got.generated, want.generated)
  assert (np.asarray(got.exit_layer) == L - 1).all()


def _exit_logits_of_full_model(tokens, layer):
  """The full model's shared-head logits after position layer[b, i] for generated token i: [B, N, V]."""
  out = np.asarray(exits.layer_outputs(CFG, _setup()[1], tokens[:, :-1]).logits)[:, :, TP - 1:]  # [P, B, N, V]
  return np.take_along_axis(out, np.asarray(layer)[None, :, :, None], axis=0)[0]


@pytest.mark.parametrize("measure", ["softmax_max", "saturation"])  # (top2_margin, entropy: same code path)
def test_propagate_equals_gated_forward(measure):
  model, params, prompts = _setup()
  got = ee.generate(model, params, prompts, NEW, rule=_rule(measure), policy="propagate", return_logits=True)
  layer = np.asarray(got.exit_layer)
  assert (layer < L - 1).any() and len(np.unique(layer)) > 1, "tokens should exit early, at several positions"
  tokens = np.asarray(got.tokens)[:, :-1]
  exit_at = np.full(tokens.shape, L - 1)
  exit_at[:, TP - 1:] = layer
  masks = {f"block_{l}": {b: (l <= exit_at).astype(np.float32) for b in ("attn", "ffn")} for l in range(L)}
  want = model.apply({"params": params, "gate_override": masks}, tokens)[:, TP - 1:]
  np.testing.assert_allclose(got.logits, want, atol=2e-4, rtol=1e-4)
  # the teacher-forced evaluator takes the same decisions over the same tokens
  forward = ee.exit_forward(model, params, tokens, rule=_rule(measure), allow=np.arange(tokens.shape[1]) >= TP - 1)
  np.testing.assert_array_equal(np.asarray(forward.exit_layer)[:, TP - 1:], layer)
  np.testing.assert_allclose(np.asarray(forward.logits)[:, TP - 1:], got.logits, atol=2e-4, rtol=1e-4)


# (recompute with a window as long as the generation is compared with `full` below)
@pytest.mark.parametrize("max_pending", [16, 2])
def test_full_model_cache_policies_equal_layer_logits(max_pending):
  model, params, prompts = _setup()
  got = ee.generate(model, params, prompts, NEW, rule=_rule(), policy="recompute", max_pending=max_pending,
                    return_logits=True)
  layer = np.asarray(got.exit_layer)
  assert (layer < L - 1).any() and len(np.unique(layer)) > 1
  want = _exit_logits_of_full_model(np.asarray(got.tokens), layer)
  np.testing.assert_allclose(got.logits, want, atol=2e-4, rtol=1e-4)
  assert np.asarray(got.recomputed).sum() > 0  # some missing K/V were filled in later
  # recompute with a window as long as the generation never forces a token deeper: the same run as `full`
  if max_pending >= NEW:
    full = ee.generate(model, params, prompts, NEW, rule=_rule(), policy="full", return_logits=True)
    np.testing.assert_array_equal(got.generated, full.generated)
    np.testing.assert_array_equal(got.exit_layer, full.exit_layer)
    np.testing.assert_allclose(full.logits, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ee.POLICIES)
def test_per_example_exits_equal_each_example_alone(policy):
  model, params, prompts = _setup()
  rule = _rule()
  together = ee.generate(model, params, prompts, NEW, rule=rule, policy=policy, max_pending=3, return_logits=True)
  layer = np.asarray(together.exit_layer)
  assert len({tuple(r) for r in layer}) > 1, "rows should exit at different positions"
  for b in range(prompts.shape[0]):
    alone = ee.generate(model, params, prompts[b:b + 1], NEW, rule=rule, policy=policy, max_pending=3,
                        return_logits=True)
    np.testing.assert_array_equal(alone.generated[0], together.generated[b])
    np.testing.assert_array_equal(alone.exit_layer[0], together.exit_layer[b])
    np.testing.assert_allclose(alone.logits[0], together.logits[b], atol=2e-4, rtol=1e-4)


def test_rule_options_and_bookkeeping():
  model, params, prompts = _setup()
  # only every 2nd position from min_layer 1 may exit: exits land on position 1 (or the last)
  got = ee.generate(model, params, prompts, NEW, rule=_rule(min_layer=1, every=2), policy="propagate")
  assert set(np.unique(got.exit_layer)) <= {1, L - 1} and (np.asarray(got.exit_layer) == 1).any()
  # executed positions per token = exit + 1 (propagate), every position (full)
  np.testing.assert_array_equal(np.asarray(got.executed).sum(axis=1).T, np.asarray(got.exit_layer) + 1)
  full = ee.generate(model, params, prompts, NEW, rule=_rule(), policy="full")
  assert (np.asarray(full.executed) == 1).all()
  # CALM's decaying threshold: λ_t → 0.9 λ as t grows, so later tokens exit at least as easily
  rule = ee.ExitRule("softmax_max", 0.5, decay_tau=4.0)
  lam = np.asarray([rule.threshold_at(t, NEW) for t in range(NEW)])
  np.testing.assert_allclose(lam, 0.9 * 0.5 + 0.1 * np.exp(-4.0 * np.arange(NEW) / NEW), rtol=1e-6)
  # learned heads: w = 0, b = ±10 exit everything at min_layer / nothing
  d = CFG.d_model
  for b, want in ((10.0, 0), (-10.0, L - 1)):
    heads = {"w": np.zeros((L, d), np.float32), "b": np.full((L,), b, np.float32)}
    got = ee.generate(model, params, prompts, 4, rule=ee.ExitRule("learned", 0.5), exit_heads=heads)
    assert (np.asarray(got.exit_layer) == want).all()


def test_bad_options_one_line_errors():
  model, params, prompts = _setup()
  with pytest.raises(ValueError, match="exit policy='lazy'"):
    ee.generate(model, params, prompts, 4, rule=ee.ExitRule(), policy="lazy")
  with pytest.raises(ValueError, match="exit min_layer=9"):
    ee.generate(model, params, prompts, 4, rule=ee.ExitRule(min_layer=9))
  with pytest.raises(ValueError, match="needs exit_heads"):
    ee.generate(model, params, prompts, 4, rule=ee.ExitRule("learned"))
  with pytest.raises(ValueError, match="max_len=24"):
    ee.generate(model, params, prompts, 40, rule=ee.ExitRule())
