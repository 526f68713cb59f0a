"""Tensor-by-tensor reading of HF checkpoint folders: safetensors first, PyTorch `.bin` last.

Layouts understood, in order of preference:
  model.safetensors.index.json + shards | model.safetensors | *.safetensors
  pytorch_model.bin.index.json + shards | pytorch_model.bin   (torch.load(weights_only=True))
Each tensor is read only when asked for, so a large checkpoint never needs a full host copy.
The package never imports torch at module level; the `.bin` branch imports it lazily.
"""
import json
import os
from typing import Callable, Dict, Iterator, List, Tuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

# safetensors dtypes numpy cannot hold natively → read from the raw bytes with ml_dtypes.
_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the message names the tensor and the file."""


class TensorInfo:
  """Shape of one stored tensor and a loader that returns it as a numpy array."""

  def __init__(self, name: str, file: str, shape: Tuple[int, ...], read: Callable[[], np.ndarray]):
    self.name, self.file, self.shape, self._read = name, file, tuple(shape), read

  def read(self) -> np.ndarray:
    return self._read()


def _safetensors_header(path: str) -> Tuple[int, dict]:
  """The file's JSON header and the byte offset where tensor data starts (safetensors format)."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    return 8 + size, json.loads(f.read(size))


def _read_raw(path: str, start: int, entry: dict) -> np.ndarray:
  """A tensor numpy cannot load through safetensors (bf16, fp8), memory-mapped from its bytes."""
  begin, end = entry["data_offsets"]
  dtype = np.dtype(_RAW_DTYPES[entry["dtype"]])
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
  return np.asarray(data.view(dtype).reshape(entry["shape"]))


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _safetensors_tensors(path: str) -> Iterator[TensorInfo]:
  try:
    with safe_open(path, framework="numpy") as f:
      entries = [(name, f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()]
  except Exception as e:  # SafetensorError (truncated / corrupt header), OSError
    raise ConversionError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                          f"{_first_line(e)}") from e

  raw = None
  if any(dtype in _RAW_DTYPES for _, _, dtype in entries):
    raw = _safetensors_header(path)

  def reader(name: str, dtype: str) -> Callable[[], np.ndarray]:
    if dtype in _RAW_DTYPES:
      return lambda: _read_raw(path, raw[0], raw[1][name])

    def read() -> np.ndarray:
      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)
    return read

  for name, shape, dtype in entries:
    yield TensorInfo(name, os.path.basename(path), shape, reader(name, dtype))


# Paragraphs of torch's weights_only error that say nothing about the file (one advises
# weights_only=False, which this package never does).
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_reason(error: BaseException) -> str:
  """The informative line of a torch.load error (e.g. 'unsupported GLOBAL posix.system')."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(_TORCH_BOILERPLATE)]
  reason = useful[0] if useful else (lines[0] if lines else "")
  return f"{type(error).__name__}: {reason[:200]}"


def _torch_tensors(path: str) -> Iterator[TensorInfo]:
  """PyTorch pickles, only through `torch.load(weights_only=True)` (DESIGN.md)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f"{path} is a PyTorch .bin checkpoint and needs torch to read; "
                          "install torch or convert it to safetensors") from e
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError (non-weights objects: refused), RuntimeError, EOFError
    raise ConversionError(f"{path} cannot be loaded as PyTorch weights with torch.load(weights_only=True) "
                          f"(not a plain tensor state dict, or corrupt): {_torch_reason(e)}") from e
  if not isinstance(state, dict):
    raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")

  def reader(tensor) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
      if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return tensor.numpy()
    return read

  for name, tensor in state.items():
    yield TensorInfo(name, os.path.basename(path), tuple(tensor.shape), reader(tensor))


def _shards(directory: str, index_name: str) -> List[str]:
  path = os.path.join(directory, index_name)
  try:
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f"{path} is not a valid shard index (needs a 'weight_map' of tensor → file): "
                          f"{_first_line(e)}") from e
  for file in files:
    if not os.path.exists(os.path.join(directory, file)):
      tensor = next(k for k, v in weight_map.items() if v == file)
      raise ConversionError(f"missing shard {file} (holds tensor {tensor!r}) listed in {index_name} in {directory}")
  return [os.path.join(directory, f) for f in files]


def checkpoint_files(directory: str) -> Tuple[str, List[str]]:
  """('safetensors' | 'torch', files) for an HF checkpoint folder."""
  names = set(os.listdir(directory))
  if "model.safetensors.index.json" in names:
    return "safetensors", _shards(directory, "model.safetensors.index.json")
  if "model.safetensors" in names:
    return "safetensors", [os.path.join(directory, "model.safetensors")]
  found = sorted(n for n in names if n.endswith(".safetensors"))
  if found:
    return "safetensors", [os.path.join(directory, n) for n in found]
  if "pytorch_model.bin.index.json" in names:
    return "torch", _shards(directory, "pytorch_model.bin.index.json")
  if "pytorch_model.bin" in names:
    return "torch", [os.path.join(directory, "pytorch_model.bin")]
  raise ConversionError(f"no model.safetensors, *.safetensors or pytorch_model.bin in {directory}")


def list_tensors(directory: str) -> Dict[str, TensorInfo]:
  """Every stored tensor by name (data not read yet); a name stored twice is an error."""
  kind, files = checkpoint_files(directory)
  read_file = _safetensors_tensors if kind == "safetensors" else _torch_tensors
  tensors: Dict[str, TensorInfo] = {}
  for path in files:
    for info in read_file(path):
      if info.name in tensors:
        raise ConversionError(f"tensor {info.name!r} is stored twice: in {tensors[info.name].file} and {info.file}")
      tensors[info.name] = info
  return tensors
