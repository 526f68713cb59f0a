"""GGUF files (llama.cpp's format) as HF checkpoints: config dict, HF-named tensors, tokenizer.json.

    hf_config = gguf.read_config("model.gguf")     # HF config.json fields (model_type llama/qwen2)
    tensors = gguf.list_tensors("model.gguf")      # HF name → reader.TensorInfo, [out, in] layout
    tokenizer = gguf.tokenizer_json("model.gguf")  # HF tokenizer.json (dict) from the GGUF vocab

so `hf.load` runs the same specs and rules as for safetensors. Tensors are dequantised to float32
by the `gguf` package (`gguf.quants.dequantize`) one at a time, when read. llama-arch files store
the q/k rows of each head permuted for llama.cpp's rotary layout (interleaved pairs instead of
HF's two halves); reading undoes that so the tensors equal the HF ones. GGUF key names follow
llama.cpp's `gguf-py/gguf/constants.py` (`{arch}.embedding_length`, `blk.{i}.attn_q`, ...).
"""
import functools
import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from skipjax.convert.reader import ConversionError, TensorInfo

ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (after `blk.{i}.`) → HF module name (after `model.layers.{i}.`).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` → the text split before byte-level BPE, as in llama.cpp's llama-vocab.cpp
# ('gpt2': GPT-2's own regex, built into tokenizers' ByteLevel).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "smollm": "digits+gpt2", "qwen2": _QWEN2_SPLIT,
                  "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}


def is_gguf(path: Any) -> bool:
  return isinstance(path, (str, os.PathLike)) and str(path).endswith(".gguf")


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime: float) -> Tuple[GGUFReader, Dict[str, Any]]:
  del mtime  # part of the cache key: a rewritten file is read again
  try:
    reader = GGUFReader(path)
  except Exception as e:  # bad magic, truncated file
    raise ConversionError(f"{path} is not a readable GGUF file: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  return reader, {key: field.contents() for key, field in reader.fields.items()}


def open_gguf(path: str) -> Tuple[GGUFReader, Dict[str, Any]]:
  """The file's reader (tensors memory-mapped) and its metadata: GGUF key → value."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"GGUF file {path} does not exist")
  return _open(path, os.path.getmtime(path))


def _architecture(meta: Dict[str, Any], path: str) -> str:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ConversionError(f"unsupported GGUF architecture {arch!r} in {path}; supported: {list(ARCHITECTURES)}")
  return arch


def _hf_shape(tensor) -> tuple:
  return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first


def _f32(value) -> float:
  """A float32 field as the shortest decimal that is that float32 (1e-5, not 9.99999974e-06)."""
  return float(str(np.float32(value)))


def read_config(path: str) -> Dict[str, Any]:
  """HF `config.json` fields for a llama/qwen2 GGUF file (its `{arch}.*` metadata)."""
  reader, meta = open_gguf(path)
  arch = _architecture(meta, path)
  shapes = {t.name: _hf_shape(t) for t in reader.tensors}

  def field(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ConversionError(f"GGUF key {arch}.{key!r} missing in {path}")
    return value

  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ConversionError(f"unsupported GGUF {arch}.rope.scaling.type={scaling!r} in {path}")
  heads = int(field("attention.head_count"))
  if "token_embd.weight" not in shapes:
    raise ConversionError(f"missing tensor 'token_embd.weight' in {path}")
  config = {
      "model_type": arch, "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
      "hidden_size": int(field("embedding_length")), "intermediate_size": int(field("feed_forward_length")),
      "num_attention_heads": heads, "num_key_value_heads": int(field("attention.head_count_kv", heads)),
      "num_hidden_layers": int(field("block_count")),
      "rms_norm_eps": _f32(field("attention.layer_norm_rms_epsilon")),
      "rope_theta": _f32(field("rope.freq_base", 10000.0)),
      "vocab_size": shapes["token_embd.weight"][0],
      "max_position_embeddings": int(field("context_length")),
      "tie_word_embeddings": "output.weight" not in shapes, "hidden_act": "silu",
  }
  # Llama/Qwen2 rotate whole heads, so llama.cpp's rotary width is the head size where no key_length is given.
  rotary = meta.get(f"{arch}.rope.dimension_count")
  head_dim = meta.get(f"{arch}.attention.key_length", rotary)
  if head_dim is not None:
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != int(head_dim):
      raise ConversionError(f"GGUF {arch}.attention.key_length != value_length in {path}: not supported")
    if rotary is not None and int(rotary) != int(head_dim):
      raise ConversionError(f"GGUF {arch}.rope.dimension_count={rotary} != head size {head_dim} in {path}: "
                            "partial rotary embeddings are not supported")
    config["head_dim"] = int(head_dim)
  if arch == "llama":
    config["attention_bias"] = "blk.0.attn_q.bias" in shapes
  for name in ("bos", "eos", "padding"):
    if f"tokenizer.ggml.{name}_token_id" in meta:
      config[f"{name.replace('padding', 'pad')}_token_id"] = int(meta[f"tokenizer.ggml.{name}_token_id"])
  return config


def hf_name(name: str, path: str) -> str:
  """HF tensor name of a GGUF tensor name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`)."""
  match = _BLOCK_RE.match(name)
  if match and match.group(2) in _BLOCK_NAMES:
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
  match = _TOP_RE.match(name)
  if match and match.group(1) in _TOP_NAMES:
    return f"{_TOP_NAMES[match.group(1)]}.{match.group(2)}"
  raise ConversionError(f"unsupported GGUF tensor {name!r} in {path}")


@functools.lru_cache(maxsize=None)
def can_dequantize(qtype: GGMLQuantizationType) -> bool:
  """Whether `gguf.quants.dequantize` knows this type (probed on one zero block)."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  try:
    return gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype).shape == (1, block)
  except NotImplementedError:
    return False


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`): GGUF keeps
  each head's rotary pairs interleaved (rows 2j, 2j+1), HF keeps them as halves (rows j, j + Dh/2)."""
  rows = w.shape[0]
  interleaved = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])  # [H, Dh/2, 2, ...]
  return np.ascontiguousarray(interleaved.swapaxes(1, 2)).reshape(w.shape)  # [H, 2, Dh/2, ...]


def list_tensors(path: str) -> Dict[str, TensorInfo]:
  """HF name → TensorInfo (shape [out, in], read() dequantises to float32), as reader.list_tensors."""
  reader, meta = open_gguf(path)
  arch = _architecture(meta, path)
  heads = int(meta[f"{arch}.attention.head_count"])
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  file = os.path.basename(path)
  tensors: Dict[str, TensorInfo] = {}
  for tensor in reader.tensors:
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if not can_dequantize(qtype):
      raise ConversionError(f"unsupported GGUF quantisation type {qtype.name} of tensor {tensor.name!r} in {path}")
    name = hf_name(tensor.name, path)
    permute = 0
    if arch == "llama" and re.search(r"\.attn_[qk]\.", tensor.name):
      permute = heads if ".attn_q." in tensor.name else kv_heads
    tensors[name] = TensorInfo(name, file, _hf_shape(tensor), functools.partial(_read, tensor, qtype, permute))
  return tensors


def _read(tensor, qtype: GGMLQuantizationType, permute: int) -> np.ndarray:
  array = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32).reshape(_hf_shape(tensor))
  return unpermute_rotary(array, permute) if permute else np.array(array)


# ---------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> Dict[int, str]:
  """GPT-2's byte → printable character table of byte-level BPE (Radford et al. 2019, §2.2)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return table


def tokenizer_json(path: str) -> Dict[str, Any]:
  """HF `tokenizer.json` (as a dict) of the GGUF's byte-level BPE vocabulary (`tokenizer.ggml.*`)."""
  _, meta = open_gguf(path)
  kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
  if kind != "gpt2":
    raise ConversionError(f"unsupported GGUF tokenizer.ggml.model={kind!r} in {path}; only byte-level BPE 'gpt2'")
  if pre not in PRE_TOKENIZERS:
    raise ConversionError(f"unsupported GGUF tokenizer.ggml.pre={pre!r} in {path}; supported: {sorted(PRE_TOKENIZERS)}")
  tokens: List[str] = meta["tokenizer.ggml.tokens"]
  types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())
  # Tokens are stored in the byte alphabet; one that is not (a raw added token) is spelled from its bytes.
  vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
  tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZERS[pre]
  if split == "gpt2":
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split == "digits+gpt2":  # llama.cpp's smollm split: every digit alone, then GPT-2's regex
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are matched whole and special; user-defined ones whole, not special.
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ttype in zip(tokens, types) if ttype == _CONTROL and set(t) <= spelled])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ttype in zip(tokens, types) if ttype == _USER_DEFINED and t in vocab])
  bos = meta.get("tokenizer.ggml.bos_token_id")
  if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
  return json.loads(tokenizer.to_str())


# ---------------------------------------------------------------------------------------- split files
def join_parts(parts: Sequence[str], out: str) -> str:
  """Concatenate the byte parts of one GGUF file (in order) into `out`, once: an existing `out`
  of the right size is reused; the file is written under a temporary name and renamed."""
  size = sum(os.path.getsize(p) for p in parts)
  if os.path.exists(out) and os.path.getsize(out) == size:
    return out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(os.path.abspath(out)))
  try:
    with os.fdopen(fd, "wb") as f:
      for part in parts:
        with open(part, "rb") as src:
          shutil.copyfileobj(src, f, 1 << 24)
    os.rename(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return out
