"""`text:<glob>`: local UTF-8 files, one document per file."""

from __future__ import annotations

import glob
import os

from skipjax.data.records import Record


def match_files(pattern: str) -> list[str]:
  """Files matching `pattern` (`**` recursive), sorted for determinism."""
  paths = glob.glob(os.path.expanduser(pattern), recursive=True)
  files = sorted(p for p in paths if os.path.isfile(p))
  if not files:
    raise ValueError(f"text glob {pattern!r} matches no files")
  return files


def _file_records(path: str, limit: int | None) -> list[Record]:
  """Lines of one file (newlines kept), decoded as strict UTF-8."""
  lines = []
  with open(path, "rb") as f:
    offset = 0
    for raw in f:
      if limit is not None and len(lines) >= limit:
        break
      try:
        lines.append(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"text file {path!r} is not valid UTF-8 (byte "
                         f"{offset + e.start}: {e.reason})") from None
      offset += len(raw)
  return [Record(line, ends_document=i == len(lines) - 1)
          for i, line in enumerate(lines)]


def read_text_records(pattern: str, max_records: int = 0) -> list[Record]:
  """Reads the files of a glob as records: one per line, a document per file.

  Args:
    pattern: a glob; files are read in sorted order.
    max_records: cap on the total number of lines read (0 = all); the last
      file read then ends at the cap.

  Returns:
    Records; an empty file contributes nothing (not even a separator).
  """
  records: list[Record] = []
  for path in match_files(pattern):
    limit = max_records - len(records) if max_records else None
    if limit == 0:
      break
    records.extend(_file_records(path, limit))
  return records
