"""Embedded synthetic tasks whose tokens need different amounts of compute.

`synthetic:mixed_difficulty` is the project's test bed for whether a learned
router (LtS) spends depth on hard tokens. Every example is a concatenation of
segments of `SEGMENT_LEN` = 8 tokens, cut to T+1 tokens. A segment starts with
a marker token naming its type, drawn uniformly from the task's types:

  * counting: marker, s, s+1, s+2, ... (mod m) in the *count* alphabet.
    s is uniform ("noise"); every later token is "easy": the previous token
    plus one, i.e. a bigram lookup, no attention and no arithmetic needed.
  * sums: marker, a, b, =, a+b, c, =, (a+b)+c in the *sum* alphabet, with
    the `=` token (id 3) cueing each sum. Operands a, b, c are uniform in
    [0, q) with q = (m + 2) // 3 so that no sum reaches m (no wrap-around),
    and are "noise"; each `=` is "easy" (fixed by the segment position); the
    two sums are "hard": predicting a sum at the `=` input needs the two
    tokens before it (an attention hop) combined by an (x, y) -> x + y lookup
    in the MLP. Whether the next token is hard is thus visible in the current
    token itself, which is what a per-token router (LtS Eq. 3) sees. Sums
    without a modulus keep a first-order signal (the sum grows with either
    operand), so small models learn them in a few hundred steps; a modular sum
    (x + y) mod m has none (it is independent of each operand alone) and
    stayed at chance for all 400-600 steps of our tiny runs.
  * noise: marker, then 7 uniform tokens of the *noise* alphabet ("noise":
    unpredictable whatever the compute).

Vocabulary (V = `synthetic_vocab_size`, m = (V - 4) // 3; V=64 gives m=20,
q=7): ids 0, 1, 2 are the counting/sums/noise markers, id 3 is `=`; ids
[4, 4+m) the count alphabet, [4+m, 4+2m) the sum alphabet, [4+2m, 4+3m) the
noise alphabet; ids >= 4+3m are never used. The alphabets are disjoint, so a token's class is
determined by the task, not by guessing which segment it is in.

Difficulty classes (`DIFFICULTY_CLASSES`, index = class id) label every
TARGET token. Ideal cross-entropy (nats) of a model that knows the rules:

  easy   0              (count continuation, `=`)
  hard   0              (sum, computable from the context)
  noise  log(q)         for operands of a sum;
         log(m)         for other uniform tokens (count starts, noise);
         log(n_types)   for markers: segments have a fixed length so a marker's
                        position is known, only its type is random
                        (log 3 = 1.0986 for mixed_difficulty).

In single-type tasks (`synthetic:counting`, `synthetic:sums`) a marker is
fully predictable and is labelled "easy" (ideal loss 0). `ideal_token_loss`
returns this ideal loss per target token. For any V the expected class shares
of mixed_difficulty targets are easy 8/24 = 33.3%, hard 2/24 = 8.3%, noise
14/24 = 58.3% (noise: 3/14 markers, 3/14 operands, 8/14 other uniform tokens).

Generation is a pure function of (seed, split, example index): example i uses
`np.random.default_rng([seed, split_id, i])`, so batch row r of step s (global
example s*B + r) never depends on batch history. The train split has
split_id 0; the eval split has split_id 1 and ignores the seed, so it is held
out from training and identical for runs with different seeds.
"""

from __future__ import annotations

import math

import numpy as np

DIFFICULTY_CLASSES = ("easy", "hard", "noise")
EASY, HARD, NOISE = range(3)

SEGMENT_LEN = 8
COUNT, SUMS, RANDOM = range(3)  # Segment types; the marker token id = type.
NUM_MARKERS = 3
EQUALS = NUM_MARKERS  # The `=` token that cues a sum.
ALPHABET_START = NUM_MARKERS + 1
TASKS = {
    "mixed_difficulty": (COUNT, SUMS, RANDOM),
    "counting": (COUNT,),
    "sums": (SUMS,),
}
TRAIN_SPLIT_ID, EVAL_SPLIT_ID = 0, 1
EVAL_SEED = 0


# Sums segment: marker, a, b, =, a+b, c, =, a+b+c.
EQUALS_POSITIONS = (3, 6)
SUM_POSITIONS = (4, 7)  # Hard: the sum of the two tokens before the `=` that precedes it.


def alphabet_size(vocab_size: int) -> int:
  """m: the size of each of the three value alphabets."""
  return (vocab_size - ALPHABET_START) // 3


def operand_range(m: int) -> int:
  """q: operands of a sums segment are uniform in [0, q); 3 of them sum to at most m - 1."""
  return (m + 2) // 3


def _segments(types: np.ndarray, values: np.ndarray, operands: np.ndarray,
              m: int, single_type: bool) -> tuple[np.ndarray, np.ndarray]:
  """Builds tokens and token classes for segments.

  Args:
    types: [..., S] segment type ids.
    values: [..., S, SEGMENT_LEN] uniform draws in [0, m).
    operands: [..., S, SEGMENT_LEN] uniform draws in [0, q) (sums operands).
    m: alphabet size.
    single_type: whether the task has one segment type (predictable markers).

  Returns:
    tokens, classes: int32 [..., S, SEGMENT_LEN].
  """
  sums = operands.copy()
  for j in SUM_POSITIONS:
    sums[..., j] = sums[..., j - 2] + sums[..., j - 3]
  offsets = np.arange(SEGMENT_LEN)
  count = (values[..., 1:2] + offsets - 1) % m

  t = types[..., None]
  is_sum, is_equals = np.isin(offsets, SUM_POSITIONS), np.isin(offsets, EQUALS_POSITIONS)
  sums_segment = np.where(is_equals, EQUALS, ALPHABET_START + m + sums)
  tokens = np.where(t == COUNT, ALPHABET_START + count,
                    np.where(t == SUMS, sums_segment,
                             ALPHABET_START + 2 * m + values))
  tokens[..., 0] = types
  sums_classes = np.where(is_sum, HARD, np.where(is_equals, EASY, NOISE))
  classes = np.where(t == COUNT, np.where(offsets >= 2, EASY, NOISE),
                     np.where(t == SUMS, sums_classes, NOISE))
  classes[..., 0] = EASY if single_type else NOISE
  return tokens.astype(np.int32), classes.astype(np.int32)


def generate(task: str, vocab_size: int, length: int, seed: int,
             split_id: int, indices: np.ndarray) -> tuple[np.ndarray,
                                                          np.ndarray]:
  """Generates examples `indices` of a synthetic task.

  Args:
    task: a key of `TASKS`.
    vocab_size: V.
    length: tokens per example (T+1).
    seed: non-negative data seed.
    split_id: `TRAIN_SPLIT_ID` or `EVAL_SPLIT_ID`.
    indices: [B] global example indices.

  Returns:
    tokens, classes: int32 [B, length]; classes[:, k] is the class of token k
    as a target (position 0 is never a target).
  """
  kinds = np.asarray(TASKS[task])
  m = alphabet_size(vocab_size)
  n_seg = math.ceil(length / SEGMENT_LEN)
  types = np.empty((len(indices), n_seg), np.int64)
  values = np.empty((len(indices), n_seg, SEGMENT_LEN), np.int64)
  operands = np.empty_like(values)
  for row, index in enumerate(indices):
    rng = np.random.default_rng([seed, split_id, int(index)])
    types[row] = kinds[rng.integers(0, len(kinds), n_seg)]
    values[row] = rng.integers(0, m, (n_seg, SEGMENT_LEN))
    operands[row] = rng.integers(0, operand_range(m), (n_seg, SEGMENT_LEN))
  tokens, classes = _segments(types, values, operands, m, single_type=len(kinds) == 1)
  flat = (len(indices), n_seg * SEGMENT_LEN)
  return (tokens.reshape(flat)[:, :length], classes.reshape(flat)[:, :length])


def ideal_token_loss(targets: np.ndarray, difficulty: np.ndarray,
                     vocab_size: int,
                     task: str = "mixed_difficulty") -> np.ndarray:
  """Cross-entropy (nats) of the Bayes-optimal predictor for each target.

  Args:
    targets: int [B, T] target tokens of a synthetic batch.
    difficulty: int [B, T] their classes.
    vocab_size: the task's `synthetic_vocab_size`.
    task: the synthetic task name.

  Returns:
    float32 [B, T]: 0 for easy/hard, log(n_types) for marker targets,
    log(q) for sums operands and log(m) for other noise targets (see the
    module docstring).
  """
  m = alphabet_size(vocab_size)
  marker_loss = math.log(len(TASKS[task]))
  is_operand = (targets >= ALPHABET_START + m) & (targets < ALPHABET_START + 2 * m)
  noise_loss = np.where(targets < NUM_MARKERS, marker_loss,
                        np.where(is_operand, math.log(operand_range(m)),
                                 math.log(m)))
  return np.where(difficulty == NOISE, noise_loss, 0.0).astype(np.float32)


class SyntheticDataset:
  """Batches of a synthetic task; `batch(step)` is a pure function of step.

  The train split is infinite (`num_batches` is None); the eval split is a
  fixed set of `num_batches` batches.
  """

  def __init__(self, task: str, *, vocab_size: int, batch_size: int,
               seq_len: int, split: str, seed: int, eval_batches: int):
    self.task = task
    self.vocab_size = vocab_size
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.split = split
    self.tokenizer = None
    self.is_eval = split == "eval"
    self.seed = EVAL_SEED if self.is_eval else seed
    self.split_id = EVAL_SPLIT_ID if self.is_eval else TRAIN_SPLIT_ID
    self.num_batches = eval_batches if self.is_eval else None

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns {'inputs', 'targets', 'difficulty'}: int32 [B, T] each."""
    if step < 0 or (self.is_eval and step >= self.num_batches):
      raise IndexError(f"step {step} is outside the {self.split} split of "
                       f"synthetic:{self.task} ({self.num_batches} batches)")
    first = step * self.batch_size
    indices = np.arange(first, first + self.batch_size)
    tokens, classes = generate(self.task, self.vocab_size, self.seq_len + 1,
                               self.seed, self.split_id, indices)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "difficulty": np.ascontiguousarray(classes[:, 1:]),
    }
