"""The unit every text source yields: a piece of text and a document flag."""

from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
  """A piece of text; `ends_document` marks the last record of a document.

  Text files yield one record per line (newline kept), one document per file;
  tfds yields one record (and one document) per example.
  """
  text: str
  ends_document: bool
