"""Profiling inputs (RR §4): packed text for language models, images for ViT.

Text (`config.data`): `text:<glob>` (or a bare file path) read with `skipjax.data`'s text
source, tokenised with the model's own tokenizer (the `tokenizers` package): `tokenizer.json`,
else `vocab.json` + `merges.txt` (byte-level BPE, GPT-2/OPT) or `vocab.txt` (WordPiece, BERT),
or a `.gguf` file's own vocabulary and merges. Padding and truncation stored in `tokenizer.json` are switched off: packed profiling must see
only real tokens. A folder without a tokenizer is an error unless `config.tokenizer='bytes'`
(UTF-8 bytes modulo the vocabulary, explicit). `random` gives uniform token ids (offline smoke
runs; no tokenizer needed). Documents are concatenated with the separator token and cut into
sequences of `seq_len` without padding (RR §4: packed, "batch-size one" inference). Encoders get
`[CLS] … [SEP]` around each chunk when the tokenizer has them.

Images: `images:<folder>` (every image file below it, sorted) or `images:builtin` (a small
deterministic set of generated patterns), resized to the model's image size (DINOv2: the
preprocessor's resize + centre crop, e.g. 256 → 224), converted to its
channel count (1: luminance, 3: RGB, 4: RGBA; built-in patterns are generated with that many
channels), NHWC, normalised with the checkpoint's `preprocessor_config.json` mean/std (default
0.5/0.5 as HF ViT).
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


TOKENIZER_KINDS = ("auto", "bytes")


class HFTokenizer:
  """A checkpoint's tokenizer with the interface `skipjax.data.packing` expects.

  `source`: a `tokenizer.json` path, or an already built `tokenizers.Tokenizer`.
  """

  def __init__(self, source, vocab_size: int):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.tokenizer = tokenizers.Tokenizer.from_file(source) if isinstance(source, str) else source
    # HF tokenizer.json files often pin padding/truncation (all-MiniLM-L6-v2: fixed 128): packed
    # profiling would then see [PAD] runs and cut records.
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
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


def _tokenizer_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _build_tokenizer(model_dir: str):
  """A `tokenizers.Tokenizer` from the files in `model_dir`, or None when there are none."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import implementations  # pylint: disable=import-outside-toplevel

  from skipjax.convert import gguf  # pylint: disable=import-outside-toplevel
  if gguf.is_gguf(model_dir):  # the vocabulary and merges stored in the GGUF metadata
    return tokenizers.Tokenizer.from_str(json.dumps(gguf.tokenizer_json(model_dir)))
  if not os.path.isdir(model_dir):
    return None
  files = lambda *names: [os.path.join(model_dir, n) for n in names]
  tokenizer_json, vocab_json, merges, vocab_txt = files("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")
  if os.path.exists(tokenizer_json):
    return tokenizer_json
  if os.path.exists(vocab_json) and os.path.exists(merges):  # GPT-2 / OPT byte-level BPE
    settings = _tokenizer_config(model_dir)
    return implementations.ByteLevelBPETokenizer(
        vocab_json, merges, add_prefix_space=bool(settings.get("add_prefix_space", False)))._tokenizer
  if os.path.exists(vocab_txt):  # BERT WordPiece
    settings = _tokenizer_config(model_dir)
    return implementations.BertWordPieceTokenizer(
        vocab_txt, lowercase=bool(settings.get("do_lower_case", True)),
        strip_accents=settings.get("strip_accents"),
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)))._tokenizer
  return None


def tokenizer_for(model_dir: Optional[str], vocab_size: int, kind: str = "auto"):
  """The model's tokenizer (`kind='auto'`), or UTF-8 bytes modulo the vocabulary ('bytes').

  Raises ValueError naming the folder when `auto` finds no tokenizer files in it."""
  if kind == "bytes":
    return ModuloByteTokenizer(vocab_size)
  if kind != "auto":
    raise ValueError(f"config.tokenizer={kind!r} is not one of {TOKENIZER_KINDS}")
  source = _build_tokenizer(model_dir) if model_dir else None
  if source is None:
    raise ValueError(f"no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt) in model folder "
                     f"{model_dir}; pass --config.tokenizer=bytes to profile UTF-8 bytes modulo the vocabulary")
  return HFTokenizer(source, vocab_size)


def is_random(source: str) -> bool:
  return source == "random" or source.startswith("random:")


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
  if is_random(source):
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


def builtin_images(num: int, size: int, channels: int = 3) -> np.ndarray:
  """Deterministic pattern images [num, size, size, channels] in [0, 1]: gradients, stripes,
  rings and checkerboards with varying frequency, angle and colour (offline ViT profiling)."""
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
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (i * 0.618 + np.arange(channels) / channels))
    out.append(np.clip(base[..., None] * colour + 0.1 * (1 - base[..., None]), 0, 1))
  return np.stack(out).astype(np.float32)


PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channel count → PIL mode images are converted to


def folder_images(folder: str, num: int, size: int, channels: int = 3, shortest_edge: int = 0) -> np.ndarray:
  """Up to `num` images found below `folder`, converted to `channels` (PIL_MODES), in [0, 1] →
  [N, size, size, channels]: centre-cropped to squares and resized to `size`, or, given
  `shortest_edge` (HF BitImageProcessor, DINOv2), resized (bicubic) so that the short side is
  `shortest_edge` and centre-cropped to `size`."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if channels not in PIL_MODES:
    raise ValueError(f"config.data='images:{folder}': the model takes {channels}-channel images; image files "
                     f"can be converted to {sorted(PIL_MODES)} channels only (use images:builtin)")
  files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if p.lower().endswith(IMAGE_SUFFIXES))[:num]
  if not files:
    raise ValueError(f"config.data='images:{folder}': no image files ({', '.join(IMAGE_SUFFIXES)}) found")
  out = []
  for path in files:
    img = Image.open(path).convert(PIL_MODES[channels])
    if shortest_edge:
      short, long = sorted(img.size)
      long = int(shortest_edge * long / short)  # truncated, as HF get_resize_output_image_size
      img = img.resize((shortest_edge, long) if img.size[0] == short else (long, shortest_edge), Image.BICUBIC)
      left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
      out.append(np.asarray(img.crop((left, top, left + size, top + size)), np.float32).reshape(
          size, size, channels) / 255.0)
      continue
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32).reshape(size, size, channels) / 255.0)
  return np.stack(out)


def _channel_stat(proc: dict, field: str, channels: int, where: str) -> np.ndarray:
  value = np.asarray(proc.get(field, 0.5), np.float32).reshape(-1)
  if value.size == 1:
    return np.full(channels, value[0], np.float32)
  if value.size != channels:
    raise ValueError(f"{where}: {field} has {value.size} values, the model takes {channels} channels")
  return value


def _processor_size(proc: dict, field: str) -> int:
  """A square side from an HF image-processor size field ({'height', 'width'}, {'shortest_edge'}
  or an int); 0 when absent."""
  value = proc.get(field)
  if isinstance(value, dict):
    value = value.get("shortest_edge", value.get("height"))
  return int(value) if value else 0


def image_batch(source: str, model_dir: Optional[str], image_size: int, num: int, channels: int = 3,
                resizable: bool = False) -> Batch:
  """{'inputs': pixels [N, H, W, channels]} normalised as the checkpoint's image processor does.

  `resizable` models (DINOv2: position grid interpolated to the input) get the processor's
  `crop_size` (facebook/dinov2-*: short side 256, centre crop 224) instead of `image_size` (the
  pre-training position grid, 518); fixed-size ViTs always get `image_size`."""
  arg = source[len("images:"):]
  proc = {}
  pre = os.path.join(model_dir, "preprocessor_config.json") if model_dir else ""
  if os.path.exists(pre):
    with open(pre) as f:
      proc = json.load(f)
  shortest_edge = 0
  if resizable and proc.get("do_center_crop", True) and _processor_size(proc, "crop_size"):
    image_size = _processor_size(proc, "crop_size")
    shortest_edge = _processor_size(proc, "size") if proc.get("do_resize", True) else 0
  pixels = (builtin_images(num, image_size, channels) if arg == "builtin"
            else folder_images(arg, num, image_size, channels, shortest_edge))
  mean = _channel_stat(proc, "image_mean", channels, pre)
  std = _channel_stat(proc, "image_std", channels, pre)
  return {"inputs": ((pixels - mean) / std).astype(np.float32)}

