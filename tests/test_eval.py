"""LtS §3 1-shot evaluation: option log-probs, multiple choice, exact match, perplexity."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import eval as eval_lib
from skipjax import models

CFG = models.TransformerConfig(vocab_size=61, d_model=32, num_heads=4, num_layers=3, d_ff=64, max_len=32,
                               skip=models.SkipConfig(router="top1", target_density=0.5))
SEP = [59, 59]  # "two newlines"


@pytest.fixture(scope="module")
def lm():
  model = models.build(CFG)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])

  def perturb(path, x):  # mixed routing decisions, as in tests/test_skiplayer.py
    name = jax.tree_util.keystr(path)
    if "router" not in name:
      return x
    return jnp.zeros_like(x) if name.endswith("['bias']") else jax.random.normal(jax.random.key(len(name)), x.shape)
  return model, jax.tree_util.tree_map_with_path(perturb, params)


def _full_logp(model, params, seq):
  """log softmax of the unpadded full-sequence logits, [T, V] (the independent reference)."""
  logits = model.apply({"params": params}, jnp.asarray([seq], jnp.int32))[0]
  return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def _brute_logprob(model, params, context, option):
  logp = _full_logp(model, params, list(context) + list(option))
  return sum(logp[len(context) - 1 + j, tok] for j, tok in enumerate(option))


def _random_tokens(rng, n):
  return [int(t) for t in rng.integers(0, 58, n)]


def test_option_logprob_matches_brute_force_and_normalises(lm):
  model, params = lm
  rng = np.random.default_rng(0)
  for context_len, option_len in [(1, 1), (5, 3), (12, 4)]:
    context, option = _random_tokens(rng, context_len), _random_tokens(rng, option_len)
    score = eval_lib.option_logprob(model, params, context, option)
    expected = _brute_logprob(model, params, context, option)
    np.testing.assert_allclose(score.logprob, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score.normalized, expected / option_len, rtol=1e-5, atol=1e-5)


def test_multiple_choice_batched_with_padding_matches_brute_force(lm):
  model, params = lm
  rng = np.random.default_rng(1)
  examples = [eval_lib.MultipleChoiceExample(
      _random_tokens(rng, int(rng.integers(1, 8))),
      [_random_tokens(rng, int(rng.integers(1, 5))) for _ in range(3)], int(rng.integers(3))) for _ in range(5)]
  demo = eval_lib.MultipleChoiceExample([1, 2, 3], [[4], [5, 6]], answer=[5, 6])
  for normalize in (True, False):
    result = eval_lib.score_multiple_choice(model, params, examples, demonstration=demo, separator=SEP,
                                            length_normalize=normalize, batch_size=4)
    expected_pred = []
    for ex, raw, norm in zip(examples, result.logprobs, result.normalized):
      context = [1, 2, 3, 5, 6] + SEP + ex.context
      brute = np.asarray([_brute_logprob(model, params, context, o) for o in ex.options])
      lengths = np.asarray([len(o) for o in ex.options])
      np.testing.assert_allclose(raw, brute, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(norm, brute / lengths, rtol=1e-5, atol=1e-5)
      expected_pred.append(int(np.argmax(brute / lengths if normalize else brute)))
    np.testing.assert_array_equal(result.predictions, expected_pred)
    assert result.accuracy == pytest.approx(np.mean([p == ex.answer for p, ex in zip(expected_pred, examples)]))


def test_multiple_choice_on_a_model_that_prefers_one_token(lm):
  """ln_final scale 0, bias ∥ embedding[k] with a large norm: every position predicts token k."""
  model, params = lm
  k = 7
  u = np.zeros(CFG.d_model, np.float32)
  u[0] = 1.0
  params = jax.tree.map(lambda x: x, params)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[k].set(10 * u)
  params["ln_final"] = {"scale": jnp.zeros(CFG.d_model), "bias": jnp.asarray(u)}
  examples = [eval_lib.MultipleChoiceExample([3, 4], [[1], [k, k], [k, 2]], answer=1),
              eval_lib.MultipleChoiceExample([5], [[k], [2, k], [3]], answer=0)]
  result = eval_lib.score_multiple_choice(model, params, examples, separator=SEP)
  assert result.accuracy == 1.0 and list(result.predictions) == [1, 0]
  gen = eval_lib.exact_match(model, params, [eval_lib.GenerationExample([3], [k, k, k]),
                                             eval_lib.GenerationExample([4], [k, 1])])
  assert gen.predictions == [[k, k, k], [k, k]] and list(gen.correct) == [True, False]


def _naive_greedy(model, params, context, n):
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  seq = np.zeros((1, model.config.max_len), np.int32)
  seq[0, :len(context)] = context
  for t in range(len(context), len(context) + n):
    seq[0, t] = int(np.argmax(np.asarray(forward(params, seq))[0, t - 1]))
  return seq[0, len(context):len(context) + n].tolist()


def test_exact_match_against_naive_greedy(lm):
  model, params = lm
  rng = np.random.default_rng(2)
  contexts = [_random_tokens(rng, n) for n in (3, 6, 2, 9)]
  demo = eval_lib.GenerationExample([8, 9], [10])
  full = [[8, 9, 10] + SEP + c for c in contexts]
  greedy = [_naive_greedy(model, params, c, 6) for c in full]
  # Without a stop token: half the answers are the greedy continuation, half are corrupted.
  answers = [greedy[0][:3], greedy[1][:1], [(t + 1) % 58 for t in greedy[2][:2]], greedy[3][:4][::-1]]
  if answers[3] == greedy[3][:4]:
    answers[3] = [(t + 1) % 58 for t in answers[3]]
  examples = [eval_lib.GenerationExample(c, a) for c, a in zip(contexts, answers)]
  result = eval_lib.exact_match(model, params, examples, demonstration=demo, separator=SEP, batch_size=3)
  assert result.predictions == [g[:len(a)] for g, a in zip(greedy, answers)]
  assert list(result.correct) == [True, True, False, False] and result.accuracy == 0.5
  # With a stop token the decode runs one token further and must stop there.
  i = next(i for i in range(1, 5) if greedy[0][i] not in greedy[0][:i])
  stop = greedy[0][i]
  result = eval_lib.exact_match(model, params, [eval_lib.GenerationExample(contexts[0], greedy[0][:i]),
                                                eval_lib.GenerationExample(contexts[0], greedy[0][:i - 1])],
                                demonstration=demo, separator=SEP, stop_id=stop)
  assert result.predictions[0] == greedy[0][:i] and list(result.correct) == [True, stop == greedy[0][i - 1]]


class _Batches:
  num_batches = 2

  def __init__(self):
    rng = np.random.default_rng(3)
    self.data = [rng.integers(0, 61, (2, 9)).astype(np.int32) for _ in range(3)]

  def batch(self, i):
    return {"inputs": self.data[i][:, :-1], "targets": self.data[i][:, 1:]}


def test_perplexity_matches_brute_force(lm):
  model, params = lm
  ds = _Batches()
  out = eval_lib.perplexity(model, params, ds, num_batches=5)  # capped at ds.num_batches
  nll = [-_full_logp(model, params, row[:-1])[np.arange(8), row[1:]] for b in ds.data[:2] for row in b]
  loss = float(np.mean(np.concatenate(nll)))
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(out["perplexity"], np.exp(loss), rtol=1e-5)
  assert out["tokens"] == 32
