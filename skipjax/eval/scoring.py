"""1-shot multiple-choice scoring (LtS §3, following Radford et al. 2018).

One demonstration (a training example with its answer) is joined to the query with a separator
("two newlines" in the paper); each option is scored by log P(option | context), normalised by
the option's token length, and the highest-scoring option is the prediction.

Scoring is batched: every (context, option) sequence is right-padded to a shared length and the
log-probabilities of the option tokens are gathered at their positions. The model is causal, so
right padding does not change the logits of earlier positions, and the padding is passed as the
attention mask, so routing never routes it and `capacity` dispatch counts only the real tokens
(a sequence scores the same alone and in a padded batch). Routing is deterministic (argmax, as
at decoding) since `apply` runs with `deterministic=True`.
"""
import dataclasses
import functools
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Tokens = Sequence[int]


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
  """context, candidate options (token lists) and the answer: an option index or its tokens."""
  context: Tokens
  options: Sequence[Tokens]
  answer: Union[int, Tokens]

  def answer_index(self) -> int:
    if isinstance(self.answer, (int, np.integer)):
      return int(self.answer)
    matches = [i for i, o in enumerate(self.options) if list(o) == list(self.answer)]
    if not matches:
      raise ValueError(f"answer {list(self.answer)} is not one of the options")
    return matches[0]

  def demonstration(self) -> List[int]:
    """The example as a 1-shot demonstration: context followed by its correct option."""
    return list(self.context) + list(self.options[self.answer_index()])


class OptionScore(NamedTuple):
  logprob: float     # Σ_i log P(option_i | context, option_<i)
  normalized: float  # logprob / len(option) (LtS §3)


class MultipleChoiceResult(NamedTuple):
  accuracy: float
  predictions: np.ndarray   # [n] predicted option index
  correct: np.ndarray       # [n] bool
  logprobs: List[np.ndarray]     # per example, Σ log P(option | context) per option
  normalized: List[np.ndarray]   # per example, length-normalised


def one_shot_context(demonstration: Optional[Any], separator: Tokens, context: Tokens) -> List[int]:
  """LtS §3: demonstration ⊕ separator ⊕ context (just `context` without a demonstration).

  `demonstration` is a token list or an example with a `demonstration()` method.
  """
  if demonstration is None:
    return list(context)
  demo = demonstration.demonstration() if hasattr(demonstration, "demonstration") else demonstration
  return list(demo) + list(separator) + list(context)


def _bucket(n: int, cap: int) -> int:
  """Padded length: the next power of two ≥ n (≥ 8), at most `cap` (bounds recompilations)."""
  return min(max(8, 1 << (n - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=("model",))
def _weighted_logprob_sums(params, inputs, targets, weights, valid, *, model: nn.Module) -> jnp.ndarray:
  """Σ_t weights[b, t] · log softmax(logits[b, t])[targets[b, t]] per row; valid [B, T]: real tokens."""
  logits = model.apply({"params": params}, inputs, attention_mask=valid,
                       rngs={"gate": jax.random.key(0)})  # `random` router baseline
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(picked * weights, axis=-1)


def _layout(context: Tokens, continuation: Tokens, max_len: int) -> Tuple[List[int], int]:
  """(sequence, context length) with the context cut from the left to fit max_len inputs."""
  if not continuation:
    raise ValueError("an option/continuation must have at least one token")
  if not context:
    raise ValueError("the context must have at least one token (nothing predicts the first token)")
  keep = max_len + 1 - len(continuation)
  if keep < 1:
    raise ValueError(f"continuation of {len(continuation)} tokens does not fit config.model.max_len={max_len}")
  context = list(context)[-keep:]
  return context + list(continuation), len(context)


def continuation_logprobs(model: nn.Module, params: Any, pairs: Sequence[Tuple[Tokens, Tokens]],
                          batch_size: int = 16) -> np.ndarray:
  """log P(continuation | context) summed over the continuation tokens, for each pair, [n]."""
  max_len = model.config.max_len
  laid_out = [_layout(c, o, max_len) for c, o in pairs]
  out = np.zeros(len(laid_out), np.float64)
  for start in range(0, len(laid_out), batch_size):
    chunk = laid_out[start:start + batch_size]
    length = _bucket(max(len(seq) - 1 for seq, _ in chunk), max_len)
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    valid = np.zeros((batch_size, length), bool)
    for row, (seq, ctx_len) in enumerate(chunk):
      n = len(seq) - 1
      inputs[row, :n], targets[row, :n], valid[row, :n] = seq[:-1], seq[1:], True
      weights[row, ctx_len - 1:n] = 1.0  # target seq[t + 1] is an option token for t ≥ ctx_len − 1
    sums = _weighted_logprob_sums(params, inputs, targets, weights, valid, model=model)
    out[start:start + len(chunk)] = np.asarray(sums)[:len(chunk)]
  return out


def option_logprob(model: nn.Module, params: Any, context_tokens: Tokens, option_tokens: Tokens) -> OptionScore:
  """log P(option | context) and its length-normalised version (LtS §3)."""
  logprob = float(continuation_logprobs(model, params, [(context_tokens, option_tokens)], batch_size=1)[0])
  return OptionScore(logprob, logprob / len(option_tokens))


def score_multiple_choice(model: nn.Module, params: Any, examples: Sequence[MultipleChoiceExample], *,
                          demonstration: Optional[Any] = None, separator: Tokens = (),
                          length_normalize: bool = True, batch_size: int = 16) -> MultipleChoiceResult:
  """LtS §3 1-shot multiple choice: predict argmax_option log P(option | demo ⊕ sep ⊕ context) / |option|.

  Args:
    model, params: the LM.
    examples: the evaluation examples.
    demonstration: the one demonstration (an example, or its tokens), e.g. drawn at random from
      the task's training set (`pick_demonstration`); None for 0-shot.
    separator: tokens joining demonstration and query (the paper: two newlines).
    length_normalize: normalise by option length (the paper's choice) or use the raw sum.
    batch_size: sequences scored per model call.

  Returns:
    A `MultipleChoiceResult` (ties go to the first option).
  """
  pairs, owners = [], []
  for i, ex in enumerate(examples):
    context = one_shot_context(demonstration, separator, ex.context)
    for option in ex.options:
      pairs.append((context, option))
      owners.append(i)
  sums = continuation_logprobs(model, params, pairs, batch_size)
  owners = np.asarray(owners)
  logprobs, normalized, predictions, correct = [], [], [], []
  for i, ex in enumerate(examples):
    raw = sums[owners == i]
    norm = raw / np.asarray([len(o) for o in ex.options], np.float64)
    logprobs.append(raw)
    normalized.append(norm)
    predictions.append(int(np.argmax(norm if length_normalize else raw)))
    correct.append(predictions[-1] == ex.answer_index())
  correct = np.asarray(correct, bool)
  return MultipleChoiceResult(float(correct.mean()) if len(correct) else 0.0, np.asarray(predictions, np.int32),
                              correct, logprobs, normalized)


def pick_demonstration(train_examples: Sequence[Any], seed: int = 0) -> Any:
  """LtS §3: one example drawn at random from the task's training set."""
  return train_examples[int(np.random.default_rng(seed).integers(len(train_examples)))]
