"""`tfds:<name>`: random-access array_record data via `tfds.data_source`.

No TensorFlow is needed: `tfds.data_source` reads prepared array_record files
(`tfds.load`/`as_numpy` would need TF). Each example is one document.
"""

from __future__ import annotations

import numpy as np

from skipjax.data.records import Record


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def resolve_split(name: str, split: str, data_dir: str | None) -> str:
  """`split`, or 'test' when a dataset with known splits lacks 'validation'.

  Splits are unknown (empty) when the dataset is not prepared or mocked; the
  requested split is then passed through.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    splits = set(tfds.builder(name, data_dir=data_dir).info.splits.keys())
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"tfds:{name}: {_one_line(e)}") from None
  if not splits or split in splits:
    return split
  if split == "validation" and "test" in splits:
    return "test"
  raise ValueError(f"tfds:{name} has no split {split!r} (splits: "
                   f"{', '.join(sorted(splits))})")


def _as_text(value, name: str, index: int) -> str:
  """Decodes a text feature (str, bytes or a 0-d array of either)."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"tfds:{name} record {index} is not valid UTF-8 "
                       f"({e.reason})") from None
  if isinstance(value, str):
    return value
  raise ValueError(f"tfds:{name} record {index} text is a "
                   f"{type(value).__name__}, not str/bytes")


def read_tfds_records(name: str, split: str, *, text_key: str,
                      data_dir: str = "", max_records: int = 0
                      ) -> list[Record]:
  """Reads the first `max_records` (0 = all) examples' text of a tfds split.

  Args:
    name: tfds name, e.g. 'lm1b' or 'wiki40b/en'.
    split: split name (already resolved, see `resolve_split`).
    text_key: the feature holding the text (`config.data.tfds_text_key`).
    data_dir: tfds data dir ('' = default).
    max_records: cap on examples read.

  Returns:
    One record per example, each its own document.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"tfds:{name} (split {split!r}): {_one_line(e)}") from None
  count = len(source)
  if max_records:
    count = min(count, max_records)
  records = []
  for index in range(count):
    example = source[index]
    if text_key not in example:
      raise ValueError(f"config.data.tfds_text_key={text_key!r} is not a "
                       f"feature of tfds:{name} (features: "
                       f"{', '.join(sorted(example))})")
    records.append(Record(_as_text(example[text_key], name, index), True))
  return records
