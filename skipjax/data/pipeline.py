"""`get_dataset`: config.data + split + seed -> an object serving `batch(step)`.

Sources (`config.data.source`):
  synthetic:<task>  generated on the fly (see `synthetic`), no files.
  text:<glob>       local UTF-8 files (see `text`), one document per file.
  tfds:<name>       `tfds.data_source` array_record data, no TensorFlow.

Eval split: with `eval_source` == '' a text/tfds source holds out the last
`eval_fraction` of the packed train chunks (the train split is the rest), and
a synthetic source uses its separate eval stream. Otherwise `eval_source` is
read (tfds with `tfds_eval_split`) and tokenized with the train tokenizer.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Protocol

import numpy as np

from skipjax.data import config as config_lib
from skipjax.data import packing
from skipjax.data import synthetic
from skipjax.data import text
from skipjax.data import tfds_source
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.data.records import Record

SPLITS = ("train", "eval")
_CACHE_SIZE = 2
_streams: collections.OrderedDict = collections.OrderedDict()
_tokenizers: collections.OrderedDict = collections.OrderedDict()


class Dataset(Protocol):
  """What the training loop uses."""
  vocab_size: int
  num_batches: int | None
  batch_size: int
  seq_len: int

  def batch(self, step: int) -> dict[str, np.ndarray]:
    ...


def _cached(cache: collections.OrderedDict, key, make: Callable[[], Any]):
  """`cache[key]`, made by `make()` on a miss; keeps the latest entries."""
  if key not in cache:
    cache[key] = make()
  cache.move_to_end(key)
  while len(cache) > _CACHE_SIZE:
    cache.popitem(last=False)
  return cache[key]


def _source_key(config, source: str, role: str) -> tuple:
  """Identifies the records a (source, role) reads, incl. file versions."""
  kind, arg = source.split(":", 1)
  if kind == "text":
    files = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
                  for p in text.match_files(arg))
    return (kind, files, config.max_records)
  split = config.tfds_split if role == "train" else config.tfds_eval_split
  return (kind, arg, split, config.tfds_data_dir, config.tfds_text_key,
          config.max_records)


def _read_records(config, source: str, role: str) -> list[Record]:
  """Records of a text/tfds source for the 'train' or 'eval' role."""
  kind, arg = source.split(":", 1)
  if kind == "text":
    return text.read_text_records(arg, config.max_records)
  data_dir = config.tfds_data_dir or None
  wanted = config.tfds_split if role == "train" else config.tfds_eval_split
  split = tfds_source.resolve_split(arg, wanted, data_dir)
  return tfds_source.read_tfds_records(
      arg, split, text_key=config.tfds_text_key,
      data_dir=config.tfds_data_dir, max_records=config.max_records)


def _tokenizer(config, workdir: str | None,
               train_records: Callable[[], list[Record]],
               train_key: tuple) -> tokenizer_lib.AnyTokenizer:
  """The byte tokenizer, or the BPE of the workdir / trained on train text."""
  if config.tokenizer == "byte":
    return tokenizer_lib.ByteTokenizer()
  texts = lambda: (r.text for r in train_records())
  if workdir:
    return tokenizer_lib.load_or_train_bpe(
        config.bpe_vocab_size, texts, workdir,
        settings=tokenizer_lib.bpe_settings(config))
  return _cached(
      _tokenizers, (train_key, config.bpe_vocab_size),
      lambda: tokenizer_lib.load_or_train_bpe(config.bpe_vocab_size, texts,
                                              None))


def _stream(key: tuple, records: Callable[[], list[Record]],
            tok: tokenizer_lib.AnyTokenizer) -> np.ndarray:
  """Packed token stream of `records`, cached per (records, tokenizer)."""
  return _cached(_streams, (key, tok.fingerprint),
                 lambda: packing.pack_records(records(), tok))


def _memoize(fn: Callable[[], list[Record]]) -> Callable[[], list[Record]]:
  cell = []

  def wrapper():
    if not cell:
      cell.append(fn())
    return cell[0]
  return wrapper


def _too_small(field: str, split: str, stream_tokens: int, chunks: int,
               config, note: str = "") -> ValueError:
  return ValueError(
      f"config.data.{field}={config[field]!r} ({split} split) is too small "
      "for one batch: "
      f"{stream_tokens} packed tokens give {chunks} chunks of "
      f"seq_len+1={config.seq_len + 1} tokens{note}, fewer than "
      f"batch_size={config.batch_size}")


def _packed_dataset(config, split: str, seed: int,
                    workdir: str | None) -> packing.PackedDataset:
  """A text/tfds split: tokenize, pack, chunk, hold out, batch."""
  train_key = _source_key(config, config.source, "train")
  train_records = _memoize(
      lambda: _read_records(config, config.source, "train"))
  tok = _tokenizer(config, workdir, train_records, train_key)
  if split == "train" or not config.eval_source:
    field = "source"
    stream = _stream(train_key, train_records, tok)
    chunks = packing.chunk_stream(stream, config.seq_len)
    # With an eval_source, nothing of the train stream is held out.
    n_eval = 0 if config.eval_source else packing.num_holdout(
        len(chunks), config.eval_fraction)
    total = len(chunks)
    chunks = chunks[:total - n_eval] if split == "train" else (
        chunks[total - n_eval:])
    note = (f", of which {n_eval} are held out for eval "
            f"(eval_fraction={config.eval_fraction})"
            if split == "train" else
            f", of which the last {n_eval} (eval_fraction="
            f"{config.eval_fraction}) form the eval split")
  else:
    field = "eval_source"
    key = _source_key(config, config.eval_source, "eval")
    stream = _stream(
        key, lambda: _read_records(config, config.eval_source, "eval"), tok)
    chunks = packing.chunk_stream(stream, config.seq_len)
    total, note = len(chunks), ""
  if len(chunks) < config.batch_size:
    raise _too_small(field, split, len(stream), total, config, note)
  return packing.PackedDataset(
      chunks, batch_size=config.batch_size, shuffle=split == "train",
      seed=seed, tokenizer=tok, split=split, num_tokens=len(stream))


def _synthetic_dataset(config, task: str, split: str,
                       seed: int) -> synthetic.SyntheticDataset:
  field = "eval_source" if split == "eval" and config.eval_source else "source"
  if task not in synthetic.TASKS:
    raise config_lib.field_error(
        config, field,
        f"names an unknown synthetic task; choose one of "
        f"{', '.join(synthetic.TASKS)}")
  return synthetic.SyntheticDataset(
      task, vocab_size=config.synthetic_vocab_size,
      batch_size=config.batch_size, seq_len=config.seq_len, split=split,
      seed=seed, eval_batches=config.get("synthetic_eval_batches", 16))


def get_dataset(data_config, split: str = "train", seed: int = 0,
                workdir: str | None = None) -> Dataset:
  """Builds the dataset of one split.

  Args:
    data_config: the `config.data` ConfigDict (see `default_config`).
    split: 'train' (shuffled, endless) or 'eval' (fixed order, finite).
    seed: non-negative data seed: the train chunk order and synthetic data.
    workdir: where a BPE tokenizer is saved/reloaded (`tokenizer.json`).

  Returns:
    An object with `vocab_size`, `num_batches` (full batches in one pass; None
    for synthetic train) and `batch(step)` -> {'inputs', 'targets'} int32
    [B, T] (+ 'difficulty' int32 [B, T] for synthetic tasks), a pure function
    of (seed, step).
  """
  config_lib.validate_config(data_config)
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be 'train' or 'eval'")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or (
      seed < 0):
    raise ValueError(f"seed={seed!r} must be a non-negative integer")
  seed = int(seed)
  source = data_config.source
  if split == "eval" and data_config.eval_source:
    source = data_config.eval_source
    synthetic_kinds = {s.startswith("synthetic:")
                       for s in (data_config.source, source)}
    if len(synthetic_kinds) == 2:
      raise config_lib.field_error(
          data_config, "eval_source",
          f"mixes synthetic and text data with config.data.source="
          f"{data_config.source!r}")
  kind, arg = source.split(":", 1)
  if kind == "synthetic":
    return _synthetic_dataset(data_config, arg, split, seed)
  return _packed_dataset(data_config, split, seed, workdir)
