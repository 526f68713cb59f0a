"""Tokenizers: byte-level (fixed) and byte-level BPE (trained locally).

Both expose `vocab_size`, `eos_id` (the document separator), `fingerprint`
(identifies the exact token mapping), `encode_batch` and `decode`.

* `ByteTokenizer`: ids 0..255 are the UTF-8 bytes, id 256 = EOS; 257 ids.
* `BpeTokenizer`: a `tokenizers` ByteLevel BPE (GPT-2 style pre-tokenizer, all
  256 byte symbols in the initial alphabet, so every text is encodable and
  decoding is lossless) trained on the train split's text with the special
  token '<|endoftext|>' = id 0 as EOS. It is saved as `<workdir>/tokenizer.json`
  and loaded from there when present, so a resumed run tokenizes identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np
from etils import epath
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
SOURCE_FILE = "tokenizer_source.json"  # the data settings the BPE was trained with


class ByteTokenizer:
  """UTF-8 bytes as tokens (0..255) plus EOS = 256."""

  vocab_size = 257
  eos_id = 256
  fingerprint = "byte"

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (uint8 arrays) of each text."""
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; EOS is shown as '<|endoftext|>'."""
    out, piece = [], bytearray()
    for i in ids:
      if int(i) == self.eos_id:
        out.append(piece.decode("utf-8", errors="replace"))
        out.append(EOS_TOKEN)
        piece = bytearray()
      else:
        piece.append(int(i))
    out.append(piece.decode("utf-8", errors="replace"))
    return "".join(out)


class BpeTokenizer:
  """A trained `tokenizers.Tokenizer` (ByteLevel BPE) with EOS = id 0."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if self.eos_id is None:
      raise ValueError(f"BPE tokenizer has no {EOS_TOKEN!r} token")
    json_text = tokenizer.to_str()
    self.fingerprint = "bpe:" + hashlib.sha256(json_text.encode()).hexdigest()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BpeTokenizer":
    """Trains a ByteLevel BPE of `vocab_size` ids (EOS included) on `texts`."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return cls(tokenizer)

  def to_str(self) -> str:
    return self.tokenizer.to_str()

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int32 arrays) of each text, encoded independently."""
    encodings = self.tokenizer.encode_batch_fast(list(texts),
                                                 add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids],
                                 skip_special_tokens=False)


AnyTokenizer = ByteTokenizer | BpeTokenizer


def _write_atomically(path: epath.Path, text: str) -> None:
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(text)
  tmp.rename(path)


def _check_source(path: epath.Path, settings: dict | None) -> None:
  """A saved BPE is reused only for the data settings it was trained with."""
  if settings is None:
    return
  source_path = path.parent / SOURCE_FILE
  if not source_path.exists():
    raise ValueError(
        f"tokenizer file {os.fspath(path)!r} has no {SOURCE_FILE} recording the data it was trained "
        f"on; this run wants a BPE of {_describe(settings)}: delete it to retrain, or write "
        f"{os.fspath(source_path)!r} with {json.dumps(settings, sort_keys=True)} to reuse it")
  try:
    stored = json.loads(source_path.read_text())
  except ValueError as e:
    raise ValueError(f"{os.fspath(source_path)!r} is not valid JSON ({e})") from None
  if stored != settings:
    diff = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}"
                     for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k))
    raise ValueError(f"tokenizer file {os.fspath(path)!r} was trained on other data (config.data: {diff}); "
                     "delete it (and its tokenizer_source.json) to retrain, or use another --workdir")


def _describe(settings: dict) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))


def bpe_settings(data_config) -> dict:
  """What a BPE trained for `config.data` depends on (stored beside tokenizer.json)."""
  settings = {"source": data_config.source, "bpe_vocab_size": data_config.bpe_vocab_size,
              "max_records": data_config.max_records}
  if data_config.source.startswith("tfds:"):
    settings.update(tfds_split=data_config.tfds_split, tfds_text_key=data_config.tfds_text_key)
  return settings


def load_or_train_bpe(vocab_size: int, train_texts: Callable[[], Iterable[str]],
                      workdir: str | None, settings: dict | None = None) -> BpeTokenizer:
  """`<workdir>/tokenizer.json` if present, else a BPE trained on the texts.

  Args:
    vocab_size: `config.data.bpe_vocab_size`.
    train_texts: returns the train split's texts (called only if training).
    workdir: where the tokenizer is saved/reloaded; None trains in memory.
    settings: the data settings the BPE is for (`bpe_settings`); saved as
      `tokenizer_source.json` beside it, and a saved tokenizer whose settings
      differ (or are unrecorded) is refused instead of silently reused. None
      (decoding a workdir) skips the check.

  Returns:
    The tokenizer; when trained and `workdir` is set it has been saved.
  """
  path = epath.Path(workdir) / TOKENIZER_FILE if workdir else None
  if path is not None and path.exists():
    _check_source(path, settings)
    try:
      tokenizer = BpeTokenizer(tokenizers.Tokenizer.from_str(path.read_text()))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"cannot load tokenizer file {os.fspath(path)!r}: "
                       f"{str(e).strip().splitlines()[0]}") from None
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(
          f"tokenizer file {os.fspath(path)!r} has {tokenizer.vocab_size} ids "
          f"but config.data.bpe_vocab_size={vocab_size}; delete the file or "
          "fix the config")
    return tokenizer
  tokenizer = BpeTokenizer.train(train_texts(), vocab_size)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if settings is not None:  # first, so a tokenizer.json never exists without its source
      _write_atomically(path.parent / SOURCE_FILE, json.dumps(settings, sort_keys=True))
    _write_atomically(path, tokenizer.to_str())
  return tokenizer
