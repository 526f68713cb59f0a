"""Profiling inputs (RR §4): packed text for language models, images for ViT.

Text (`config.data`): `text:<glob>` (or a bare file path) read with `skipjax.data`'s text
source, tokenised with the model's own `tokenizer.json` (the `tokenizers` package) when the
checkpoint folder has one, else UTF-8 bytes modulo the vocabulary; `random` gives uniform token
ids (offline smoke runs). Documents are concatenated with the separator token and cut into
sequences of `seq_len` without padding (RR §4: packed, "batch-size one" inference). Encoders get
`[CLS] … [SEP]` around each chunk when the tokenizer has them.

Images: `images:<folder>` (every image file below it, sorted) or `images:builtin` (a small
deterministic set of generated patterns), resized to the model's image size, NHWC, normalised
with the checkpoint's `preprocessor_config.json` mean/std (default 0.5/0.5 as HF ViT).
"""
import glob
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from skipjax.data.packing import pack_records
from skipjax.data.text import read_text_records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
Batch = Dict[str, np.ndarray]


class HFTokenizer:
  """A checkpoint's `tokenizer.json` with the interface `skipjax.data.packing` expects."""

  def __init__(self, path: str, vocab_size: int):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = vocab_size
    ids = {t: self.tokenizer.token_to_id(t) for t in ("</s>", "[SEP]", "<|endoftext|>", "[CLS]")}
    self.eos_id = next((ids[t] for t in ("</s>", "[SEP]", "<|endoftext|>") if ids[t] is not None), 0)
    self.cls_id, self.sep_id = ids["[CLS]"], ids["[SEP]"]

  def encode_batch(self, texts: Sequence[str]):
    return [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class ModuloByteTokenizer:
  """UTF-8 bytes modulo the vocabulary (models without a tokenizer: random checkpoints)."""
  cls_id = sep_id = None

  def __init__(self, vocab_size: int):
    self.vocab_size, self.eos_id = vocab_size, min(2, vocab_size - 1)

  def encode_batch(self, texts: Sequence[str]):
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) % self.vocab_size for t in texts]


def tokenizer_for(model_dir: Optional[str], vocab_size: int):
  path = os.path.join(model_dir, "tokenizer.json") if model_dir else ""
  return HFTokenizer(path, vocab_size) if os.path.exists(path) else ModuloByteTokenizer(vocab_size)


def _records(source: str, max_records: int):
  if source.startswith("text:"):
    return read_text_records(source[len("text:"):], max_records)
  if os.path.isfile(source):
    return read_text_records(source, max_records)
  raise ValueError(f"config.data={source!r} is not 'random', 'text:<glob>', a text file, "
                   "'images:<folder>' or 'images:builtin'")


def text_batch(source: str, tokenizer, seq_len: int, num_sequences: int, encoder: bool,
               max_records: int = 0, seed: int = 0) -> Batch:
  """Packed token sequences (see module doc): decoders {'inputs', 'targets'} [N, T] (targets are
  the next tokens); encoders {'inputs', 'attention_mask'} [N, T]."""
  wrap = encoder and tokenizer.cls_id is not None and tokenizer.sep_id is not None
  width = seq_len - 2 if wrap else seq_len + (0 if encoder else 1)
  if source == "random" or source.startswith("random:"):
    rng = np.random.default_rng(int(source.split(":")[1]) if ":" in source else seed)
    chunks = rng.integers(min(4, tokenizer.vocab_size - 1), tokenizer.vocab_size, (num_sequences, width))
  else:
    stream = pack_records(_records(source, max_records), tokenizer)
    n = min(num_sequences, len(stream) // width)
    if n == 0:
      raise ValueError(f"config.data={source!r} has {len(stream)} tokens, fewer than one sequence of {width}")
    chunks = np.asarray(stream[:n * width], np.int32).reshape(n, width)
  chunks = np.asarray(chunks, np.int32)
  if wrap:
    n = len(chunks)
    chunks = np.concatenate([np.full((n, 1), tokenizer.cls_id), chunks, np.full((n, 1), tokenizer.sep_id)], 1)
  if encoder:
    return {"inputs": chunks.astype(np.int32), "attention_mask": np.ones(chunks.shape, bool)}
  return {"inputs": chunks[:, :-1].astype(np.int32), "targets": chunks[:, 1:].astype(np.int32)}


def builtin_images(num: int, size: int) -> np.ndarray:
  """Deterministic pattern images [num, size, size, 3] in [0, 1]: gradients, stripes, rings and
  checkerboards with varying frequency, angle and colour (offline ViT profiling)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  out = []
  for i in range(num):
    angle, freq = np.pi * ((i * 0.37) % 1.0), 1 + (i * 3) % 7
    u = np.cos(angle) * xx + np.sin(angle) * yy
    kind = i % 4
    if kind == 0:
      base = u
    elif kind == 1:
      base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
    elif kind == 2:
      base = 0.5 + 0.5 * np.cos(2 * np.pi * freq * np.hypot(xx - 0.5, yy - 0.5))
    else:
      base = ((np.floor(xx * freq * 2) + np.floor(yy * freq * 2)) % 2).astype(np.float32)
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (i * 0.618 + np.arange(3) / 3.0))
    out.append(np.clip(base[..., None] * colour + 0.1 * (1 - base[..., None]), 0, 1))
  return np.stack(out).astype(np.float32)


def folder_images(folder: str, num: int, size: int) -> np.ndarray:
  """Up to `num` images found below `folder`, centre-cropped to squares, resized, in [0, 1]."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_SUFFIXES))[:num]
  if not files:
    raise ValueError(f"config.data='images:{folder}': no image files ({', '.join(IMAGE_SUFFIXES)}) found")
  out = []
  for path in files:
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32) / 255.0)
  return np.stack(out)


def image_batch(source: str, model_dir: Optional[str], image_size: int, num: int) -> Batch:
  """{'inputs': pixels [N, H, W, 3]} normalised as the checkpoint's image processor does."""
  arg = source[len("images:"):]
  pixels = builtin_images(num, image_size) if arg == "builtin" else folder_images(arg, num, image_size)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
  pre = os.path.join(model_dir, "preprocessor_config.json") if model_dir else ""
  if os.path.exists(pre):
    with open(pre) as f:
      proc = json.load(f)
    mean = np.asarray(proc.get("image_mean", mean), np.float32)
    std = np.asarray(proc.get("image_std", std), np.float32)
  return {"inputs": ((pixels - mean) / std).astype(np.float32)}

