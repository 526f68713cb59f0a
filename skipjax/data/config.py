"""The `config.data` block: defaults and up-front validation.

Every error is one line and names the offending field as `config.data.<field>`.
"""

from __future__ import annotations

import ml_collections

SOURCE_PREFIXES = ("synthetic:", "text:", "tfds:")
TOKENIZERS = ("byte", "bpe")


def default_config() -> ml_collections.ConfigDict:
  """Returns the default data config (the configs files copy this block).

  Fields:
    source: where the training text comes from; 'synthetic:<task>',
      'text:<glob>' (local UTF-8 files) or 'tfds:<name>' (array_record via
      `tfds.data_source`, no TensorFlow).
    batch_size: global batch size B.
    seq_len: tokens per example T; examples are packed chunks of T+1 tokens.
    tokenizer: 'byte' (257 ids: 256 bytes + document separator) or 'bpe'
      (byte-level BPE trained on the train text, saved to
      `<workdir>/tokenizer.json`).
    bpe_vocab_size: vocabulary size of the BPE tokenizer (incl. separator).
    eval_source: source of split='eval'; '' holds out the last
      `eval_fraction` of the packed train stream (synthetic sources use a
      separate generated stream instead).
    eval_fraction: fraction of packed train chunks held out when
      `eval_source` is ''.
    tfds_split: tfds split read for split='train'.
    tfds_eval_split: tfds split read for split='eval' when `eval_source` is a
      tfds source; 'validation' falls back to 'test' if the dataset has none.
    tfds_text_key: feature holding the text in tfds records.
    tfds_data_dir: tfds data dir ('' = tfds default).
    max_records: cap on records read (tfds records / text lines); 0 = all.
    synthetic_vocab_size: vocabulary size of the synthetic tasks.
    synthetic_eval_batches: number of batches in a synthetic eval split.
  """
  config = ml_collections.ConfigDict()
  config.source = "synthetic:mixed_difficulty"
  config.batch_size = 32
  config.seq_len = 128
  config.tokenizer = "byte"
  config.bpe_vocab_size = 4096
  config.eval_source = ""
  config.eval_fraction = 0.05
  config.tfds_split = "train"
  config.tfds_eval_split = "validation"
  config.tfds_text_key = "text"
  config.tfds_data_dir = ""
  config.max_records = 0
  config.synthetic_vocab_size = 64
  config.synthetic_eval_batches = 16
  return config


def field_error(config, name: str, requirement: str) -> ValueError:
  """A one-line error naming `config.data.<name>` and its current value."""
  return ValueError(f"config.data.{name}={config[name]!r} {requirement}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_source(config, name: str, allow_empty: bool) -> None:
  value = config[name]
  if allow_empty and value == "":
    return
  if not isinstance(value, str) or not value.startswith(SOURCE_PREFIXES):
    raise field_error(config, name,
                      "must start with synthetic:, text: or tfds:")
  if value.split(":", 1)[1] == "":
    raise field_error(config, name, "names no task, glob or dataset")


def validate_config(config) -> None:
  """Checks every field used by the pipeline; raises one-line ValueErrors."""
  missing = [k for k in default_config() if k not in config]
  # synthetic_eval_batches is an addition; older configs may omit it.
  missing = [k for k in missing if k != "synthetic_eval_batches"]
  if missing:
    raise ValueError(f"config.data is missing fields: {', '.join(missing)}")
  _check_source(config, "source", allow_empty=False)
  _check_source(config, "eval_source", allow_empty=True)
  for name in ("batch_size", "seq_len", "bpe_vocab_size"):
    if not _is_int(config[name]) or config[name] <= 0:
      raise field_error(config, name, "must be a positive integer")
  if not _is_int(config.max_records) or config.max_records < 0:
    raise field_error(config, "max_records",
                      "must be a non-negative integer (0 = all)")
  if config.tokenizer not in TOKENIZERS:
    raise field_error(config, "tokenizer", "must be 'byte' or 'bpe'")
  if config.tokenizer == "bpe" and config.bpe_vocab_size < 258:
    raise field_error(config, "bpe_vocab_size",
                      "must be >= 258 (256 byte symbols + separator + 1)")
  fraction = config.eval_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or (
      not 0.0 <= fraction < 1.0):
    raise field_error(config, "eval_fraction", "must be in [0, 1)")
  vocab = config.synthetic_vocab_size
  if not _is_int(vocab) or vocab < 9:
    raise field_error(config, "synthetic_vocab_size",
                      "must be an integer >= 9 (3 markers + 3 alphabets)")
  eval_batches = config.get("synthetic_eval_batches", 16)
  if not _is_int(eval_batches) or eval_batches <= 0:
    raise field_error(config, "synthetic_eval_batches",
                      "must be a positive integer")
  for name in ("tfds_split", "tfds_eval_split", "tfds_text_key"):
    if not isinstance(config[name], str) or not config[name]:
      raise field_error(config, name, "must be a non-empty string")
