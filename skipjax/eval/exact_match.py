"""1-shot generative evaluation by exact match of the greedy decode (LtS §3, NLG tasks)."""
import dataclasses
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import numpy as np

from skipjax.decode import generation
from skipjax.eval.scoring import Tokens, one_shot_context


@dataclasses.dataclass(frozen=True)
class GenerationExample:
  """A context and its reference answer (token lists)."""
  context: Tokens
  answer: Tokens

  def demonstration(self) -> List[int]:
    return list(self.context) + list(self.answer)


class ExactMatchResult(NamedTuple):
  accuracy: float
  predictions: List[List[int]]  # decoded tokens, cut at the stop token
  correct: np.ndarray           # [n] bool


def _bucket(n: int) -> int:
  return max(8, 1 << (n - 1).bit_length())


def greedy_continuations(model: nn.Module, params: Any, contexts: Sequence[Tokens], lengths: Sequence[int],
                         batch_size: int = 16) -> List[List[int]]:
  """Greedy decode `lengths[i]` tokens after `contexts[i]` (batched, right-padded prompts).

  A context too long for `config.model.max_len` with its decode keeps its last tokens.
  """
  max_len = model.config.max_len
  out: List[List[int]] = []
  for start in range(0, len(contexts), batch_size):
    ctxs, ns = contexts[start:start + batch_size], lengths[start:start + batch_size]
    new = min(_bucket(max(ns)), max_len - 1)
    if max(ns) > new:
      raise ValueError(f"decoding {max(ns)} tokens does not fit config.model.max_len={max_len}")
    ctxs = [list(c)[-(max_len - new):] for c in ctxs]
    if min(len(c) for c in ctxs) < 1:
      raise ValueError("every context needs at least one token")
    width = min(_bucket(max(len(c) for c in ctxs)), max_len - new)
    prompt = np.zeros((batch_size, width), np.int32)
    prompt_lengths = np.ones((batch_size,), np.int32)  # unused rows: one pad token
    for row, c in enumerate(ctxs):
      prompt[row, :len(c)], prompt_lengths[row] = c, len(c)
    result = generation.generate(model, params, prompt, new, prompt_lengths=prompt_lengths)
    generated = np.asarray(result.generated)
    out.extend(generated[row, :n].tolist() for row, n in enumerate(ns))
  return out


def exact_match(model: nn.Module, params: Any, examples: Sequence[GenerationExample], *,
                demonstration: Optional[Any] = None, separator: Tokens = (), stop_id: Optional[int] = None,
                normalize: Optional[Callable[[Sequence[int]], Any]] = None,
                batch_size: int = 16) -> ExactMatchResult:
  """LtS §3 exact match: greedy-decode up to len(answer) tokens (+1 for `stop_id`), cut at the
  stop token, and compare `normalize(prediction) == normalize(answer)`.

  Args:
    model, params: the LM.
    examples: contexts with reference answers.
    demonstration: the 1-shot demonstration (an example or its tokens), None for 0-shot.
    separator: tokens joining demonstration and query.
    stop_id: the token that ends an answer (e.g. newline or EOS); decoding runs one token past
      the answer length so a correct prediction must also stop.
    normalize: maps a token list to a comparable value (default: the tuple of tokens; e.g.
      detokenize, lowercase and strip for text tasks).

  Returns:
    An `ExactMatchResult`.
  """
  normalize = normalize or tuple
  extra = 0 if stop_id is None else 1
  contexts = [one_shot_context(demonstration, separator, ex.context) for ex in examples]
  decoded = greedy_continuations(model, params, contexts, [len(ex.answer) + extra for ex in examples], batch_size)
  predictions, correct = [], []
  for ex, tokens in zip(examples, decoded):
    if stop_id is not None and stop_id in tokens:
      tokens = tokens[:tokens.index(stop_id)]
    predictions.append(tokens)
    correct.append(normalize(tokens) == normalize(list(ex.answer)))
  correct = np.asarray(correct, bool)
  return ExactMatchResult(float(correct.mean()) if len(correct) else 0.0, predictions, correct)
