"""Packing documents into fixed-length examples, and deterministic batching.

Packing: every document is tokenized, followed by the tokenizer's EOS (the
document separator), and all documents are concatenated in source order into
one token stream. The stream is cut into consecutive chunks of T+1 tokens;
an example is a chunk, with inputs = chunk[:-1] and targets = chunk[1:]. No
padding, no attention reset between documents. The final incomplete chunk
(fewer than T+1 tokens) is the only data dropped.

Batching (`PackedDataset.batch(step)`) is a pure function of (seed, step):
row i of step s is global example g = s*B + i; in the train split
g maps to chunk `permutation(seed, g // N)[g % N]` where N is the number of
chunks and `permutation(seed, epoch) = np.random.default_rng([seed,
epoch]).permutation(N)`, so every epoch reshuffles and a resumed run sees
exactly the batches it would have seen. The eval split is read in order.
"""

from __future__ import annotations

import collections
import threading
from typing import Sequence

import numpy as np

from skipjax.data.records import Record
from skipjax.data.tokenizer import AnyTokenizer

ENCODE_BATCH = 4096


def pack_records(records: Sequence[Record],
                 tokenizer: AnyTokenizer) -> np.ndarray:
  """Token stream of all documents, each followed by EOS.

  Records are encoded independently (a text-file line never shares a BPE
  token with the next line) and concatenated per document. A document with
  no tokens contributes nothing, not even a separator.

  Args:
    records: texts with document-end flags, in order.
    tokenizer: a `ByteTokenizer` or `BpeTokenizer`.

  Returns:
    A 1-D read-only array (uint16 when the vocabulary fits, else int32).
  """
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  eos = np.array([tokenizer.eos_id], dtype)
  pieces, doc_tokens = [], 0
  for start in range(0, len(records), ENCODE_BATCH):
    group = records[start:start + ENCODE_BATCH]
    encoded = tokenizer.encode_batch([r.text for r in group])
    for record, ids in zip(group, encoded):
      pieces.append(ids.astype(dtype, copy=False))
      doc_tokens += len(ids)
      if record.ends_document and doc_tokens:
        pieces.append(eos)
        doc_tokens = 0
  stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  stream.flags.writeable = False
  return stream


def chunk_stream(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """[N, seq_len+1] view of the stream's consecutive full chunks."""
  width = seq_len + 1
  n = len(stream) // width
  return stream[:n * width].reshape(n, width)


def num_holdout(num_chunks: int, eval_fraction: float) -> int:
  """Chunks held out for eval: round(N * fraction), >= 1 if fraction > 0."""
  if eval_fraction <= 0:
    return 0
  return min(num_chunks, max(1, int(num_chunks * eval_fraction + 0.5)))


class PackedDataset:
  """Batches of packed chunks; `batch(step)` is a pure function of step.

  Attributes:
    vocab_size: tokenizer vocabulary size.
    num_batches: full batches in one pass over the split's chunks (a partial
      last batch is never served; in the train split examples continue into
      the next, reshuffled, epoch instead).
    num_examples: chunks (examples) in this split.
    num_tokens: tokens of the packed stream this split was cut from.
    tokenizer: the tokenizer (for decoding samples).
  """

  def __init__(self, chunks: np.ndarray, *, batch_size: int, shuffle: bool,
               seed: int, tokenizer: AnyTokenizer, split: str,
               num_tokens: int):
    self.chunks = chunks
    self.batch_size = batch_size
    self.seq_len = chunks.shape[1] - 1
    self.shuffle = shuffle
    self.seed = seed
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self.split = split
    self.num_tokens = num_tokens
    self.num_examples = len(chunks)
    self.num_batches = self.num_examples // batch_size
    self._permutations: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """Chunk order of one train epoch (cached for the two latest epochs)."""
    with self._lock:
      if epoch in self._permutations:
        return self._permutations[epoch]
    perm = np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)
    with self._lock:
      self._permutations[epoch] = perm
      while len(self._permutations) > 2:
        self._permutations.popitem(last=False)
    return perm

  def rows(self, step: int) -> np.ndarray:
    """Chunk indices of batch `step`."""
    if step < 0 or (not self.shuffle and step >= self.num_batches):
      raise IndexError(f"step {step} is outside the {self.split} split "
                       f"({self.num_batches} batches)")
    index = step * self.batch_size + np.arange(self.batch_size)
    if not self.shuffle:
      return index
    epoch, position = np.divmod(index, self.num_examples)
    rows = np.empty_like(index)
    for e in np.unique(epoch):
      here = epoch == e
      rows[here] = self.permutation(int(e))[position[here]]
    return rows

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns {'inputs', 'targets'}: int32 [B, T], targets = next tokens."""
    chunk = self.chunks[self.rows(step)].astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(chunk[:, :-1]),
        "targets": np.ascontiguousarray(chunk[:, 1:]),
    }
