"""HF → skipjax conversion: tiny random OPT / ViT / BERT models saved offline, outputs vs PyTorch."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipjax import models
from skipjax.convert import ConversionError, export, hf, positions_from_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from _torch_helpers import randomize  # pylint: disable=wrong-import-position
safetensors_numpy = pytest.importorskip("safetensors.numpy")

OPT_BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
OPT_VARIANTS = {
    "pre_ln": {},
    "post_ln_350m": {"do_layer_norm_before": False, "word_embed_proj_dim": 16},
    "no_bias_no_affine": {"enable_bias": False, "layer_norm_elementwise_affine": False},
}
BERT_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VIT_KW = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)



def make_hf(kind: str, overrides=None):
  overrides = overrides or {}
  if kind == "opt":
    cfg = transformers.OPTConfig(**{**OPT_BASE, **overrides})
    cls = transformers.OPTForCausalLM
  elif kind == "bert":
    cfg, cls = transformers.BertConfig(**{**BERT_KW, **overrides}), transformers.BertModel
  else:
    cfg, cls = transformers.ViTConfig(**{**VIT_KW, **overrides}), transformers.ViTModel
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  return randomize(cls(cfg))


def save_hf(model, directory, **kwargs) -> str:
  model.save_pretrained(directory, **kwargs)
  return str(directory)


def opt_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 64, (2, 9)).astype(np.int64)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0  # left padding
  return tokens, mask


def opt_outputs(directory, hf_model):
  tokens, mask = opt_batch()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  cfg, params = hf.load(directory)
  got = models.build(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                positions_from_mask(mask), jnp.asarray(mask, bool))
  return np.asarray(got), want, mask.astype(bool)


@pytest.mark.parametrize("variant", sorted(OPT_VARIANTS))
def test_opt_logits_match_pytorch(variant, tmp_path):
  model = make_hf("opt", OPT_VARIANTS[variant])
  got, want, valid = opt_outputs(save_hf(model, tmp_path), model)
  assert got.shape == want.shape == (2, 9, 64)
  diff = np.abs(got - want)[valid].max()
  print(f"opt[{variant}] max abs diff {diff:.2e}")
  assert diff <= 1e-4


def test_bert_last_hidden_state_matches_pytorch(tmp_path):
  model = make_hf("bert")
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 64, (2, 10))
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0  # right padding
  types = rng.integers(0, 2, tokens.shape)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  cfg, params = hf.load(save_hf(model, tmp_path))
  got = models.build(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask, bool),
                                jnp.asarray(types))
  diff = np.abs(np.asarray(got) - want)[mask.astype(bool)].max()
  print(f"bert max abs diff {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_last_hidden_state_matches_pytorch(qkv_bias, tmp_path):
  model = make_hf("vit", {"qkv_bias": qkv_bias})
  pixels = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  cfg, params = hf.load(save_hf(model, tmp_path))
  assert cfg.transformer.layer_norm_eps == 1e-6
  got = models.build(cfg).apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape == (2, 17, 32)
  diff = np.abs(np.asarray(got) - want).max()
  print(f"vit[qkv_bias={qkv_bias}] max abs diff {diff:.2e}")
  assert diff <= 1e-4


def test_vit_transformers5_names_from_torch_bin(tmp_path):
  """A `.bin` of the in-memory (transformers 5) state dict uses the new ViT module names."""
  model = make_hf("vit")
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  cfg, params = hf.load(str(tmp_path))
  _, ref = hf.load(save_hf(model, tmp_path / "st"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
  model = make_hf("opt")
  return save_hf(model, tmp_path_factory.mktemp("opt")), model


def test_torch_bin_only_checkpoint_loads(opt_dir, tmp_path):
  directory, model = opt_dir
  shutil.copy(os.path.join(directory, "config.json"), tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # includes the tied lm_head.weight
  _, ref = hf.load(directory)
  _, params = hf.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)


def test_sharded_safetensors_with_index(opt_dir, tmp_path):
  directory, model = opt_dir
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  _, ref = hf.load(directory)
  _, params = hf.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)


def test_bfloat16_checkpoint_and_dtype(opt_dir, tmp_path):
  directory, model = opt_dir
  save_hf(make_hf("opt").to(torch.bfloat16), tmp_path)
  cfg, params = hf.load(str(tmp_path), dtype=jnp.float32)
  _, ref = hf.load(directory)
  leaf = params["block_0"]["mlp"]["wi"]["kernel"]
  assert leaf.dtype == jnp.float32
  np.testing.assert_allclose(leaf, ref["block_0"]["mlp"]["wi"]["kernel"], rtol=1e-2, atol=1e-2)
  cfg16, params16 = hf.load(directory, dtype=jnp.bfloat16)
  assert cfg16.dtype == "bfloat16" and params16["embed"]["embedding"].dtype == jnp.bfloat16


def test_placed_with_target_sharding_on_a_mesh(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  model = make_hf("opt")
  directory = save_hf(model, tmp_path)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  cfg, params = hf.load(directory, mesh=mesh)
  query = params["block_0"]["attn"]["query"]["kernel"]  # [embed, heads, kv]: heads over 'model'
  assert query.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert params["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("model", None)
  _, ref = hf.load(directory)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref)


# ------------------------------------------------------------------------------ error messages
def _rewrite(src: str, dst, edit) -> str:
  """Copy checkpoint `src` to `dst` with its tensors edited by `edit(dict) -> dict`."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = safetensors_numpy.load_file(path)
  safetensors_numpy.save_file(edit(dict(tensors)), path, metadata={"format": "pt"})
  return str(dst)


def _one_line_error(directory, *needles):
  with pytest.raises(ConversionError) as err:
    hf.load(directory)
  message = str(err.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message
  return message


def test_missing_tensor_is_named(opt_dir, tmp_path):
  name = "model.decoder.layers.1.fc1.weight"
  directory = _rewrite(opt_dir[0], tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != name})
  _one_line_error(directory, name, "missing")


def test_unexpected_tensor_is_named(opt_dir, tmp_path):
  name = "model.decoder.layers.0.mystery.weight"
  directory = _rewrite(opt_dir[0], tmp_path / "c", lambda t: {**t, name: np.zeros(3, np.float32)})
  _one_line_error(directory, name, "unexpected", "model.safetensors")


def test_shape_mismatch_is_named(opt_dir, tmp_path):
  name = "model.decoder.layers.0.self_attn.q_proj.weight"
  directory = _rewrite(opt_dir[0], tmp_path / "c", lambda t: {**t, name: t[name][:, :16]})
  _one_line_error(directory, name, "shape mismatch", "model.safetensors", "[32, 16]")


def test_unsupported_model_type_is_named(opt_dir, tmp_path):
  directory = shutil.copytree(opt_dir[0], tmp_path / "c")
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  _one_line_error(str(directory), "unsupported model_type 'gpt2'", "config.json")


# ----------------------------------------------------------------------------- CLI and export
def test_cli_writes_orbax_checkpoint_and_config(opt_dir, tmp_path):
  directory, _ = opt_dir
  out = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "skipjax.convert", f"--hf={directory}", f"--out={out}"],
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg, params = export.restore(str(out))
  ref_cfg, ref = hf.load(directory)
  assert cfg == ref_cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)
  assert json.loads((out / "hf_config.json").read_text())["model_type"] == "opt"


def test_failed_conversion_leaves_nothing(opt_dir, tmp_path):
  from skipjax.convert.__main__ import convert
  name = "model.decoder.embed_tokens.weight"
  bad = _rewrite(opt_dir[0], tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(ConversionError):
    convert(bad, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_encoder_config_roundtrip_and_build():
  cfg = models.EncoderConfig("vit", models.TransformerConfig(causal=False, norm="pre", num_layers=1,
                                                             max_len=17, d_model=32, d_ff=64),
                             image_size=16, patch_size=4)
  assert export.config_from_dict(export.config_to_dict(cfg)) == cfg
  assert isinstance(models.build(export.config_to_dict(cfg)), models.Encoder)


def test_prefixes_and_ignored_heads(opt_dir, tmp_path):
  """`decoder.*` (OPTModel / metaseq layout), `bert.*` with an MLM head and a pooler."""
  bare = _rewrite(opt_dir[0], tmp_path / "opt", lambda t: {k.replace("model.decoder.", "decoder."): v
                                                           for k, v in t.items()})
  _, params = hf.load(bare)
  _, ref = hf.load(opt_dir[0])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)
  bert = save_hf(make_hf("bert"), tmp_path / "bert")
  prefixed = _rewrite(bert, tmp_path / "bert_mlm", lambda t: {
      **{"bert." + k: v for k, v in t.items()}, "cls.predictions.bias": np.zeros(64, np.float32)})
  _, params = hf.load(prefixed)
  _, ref = hf.load(bert)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, ref)


def test_torch_bin_without_torch_is_a_clear_error(opt_dir, tmp_path, monkeypatch):
  directory, model = opt_dir
  shutil.copy(os.path.join(directory, "config.json"), tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)
  _one_line_error(str(tmp_path), "pytorch_model.bin", "needs torch")


# ------------------------------------------------- unreadable inputs: one ConversionError line
def _opt_config_only(opt_dir, tmp_path, edit=None) -> str:
  config = json.loads(open(os.path.join(opt_dir[0], "config.json")).read())
  (tmp_path / "config.json").write_text(json.dumps(edit(config) if edit else config))
  return str(tmp_path)


class _Malicious:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_malicious_or_non_tensor_bin_is_one_line(opt_dir, tmp_path):
  directory = _opt_config_only(opt_dir, tmp_path)
  torch.save({"model.decoder.embed_tokens.weight": _Malicious()}, tmp_path / "pytorch_model.bin")
  message = _one_line_error(directory, "pytorch_model.bin", "weights_only=True", "posix.system")
  assert "weights_only=False" not in message and "will likely succeed" not in message
  torch.save({"model.decoder.embed_tokens.weight": torch.ones(2), "step": 3}, tmp_path / "pytorch_model.bin")
  _one_line_error(directory, "pytorch_model.bin", "'step' is a int, not a tensor")
  torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
  _one_line_error(directory, "pytorch_model.bin", "holds a list")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
  _one_line_error(directory, "pytorch_model.bin", "cannot be loaded")


@pytest.mark.parametrize("keep", [4, 100, -64], ids=["header_cut", "in_header", "data_cut"])
def test_truncated_safetensors_is_one_line(opt_dir, tmp_path, keep):
  directory = shutil.copytree(opt_dir[0], tmp_path / "c")
  path = directory / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:keep])
  _one_line_error(str(directory), "model.safetensors", "truncated or corrupt")


def test_bad_config_json_is_one_line(opt_dir, tmp_path):
  directory = shutil.copytree(opt_dir[0], tmp_path / "c")
  (directory / "config.json").write_text('{"model_type": "opt", "hidden_size": 32,')
  _one_line_error(str(directory), "config.json", "not valid JSON", "line 1")
  (directory / "config.json").write_text("[1, 2]")
  _one_line_error(str(directory), "config.json", "not an object")


def test_missing_config_field_is_named(opt_dir, tmp_path):
  directory = shutil.copytree(opt_dir[0], tmp_path / "c")
  config = json.loads((directory / "config.json").read_text())
  del config["hidden_size"]
  (directory / "config.json").write_text(json.dumps(config))
  _one_line_error(str(directory), "config.json", "no field 'hidden_size'", "'opt'")


def test_heads_not_dividing_hidden_size_is_named(tmp_path):
  directory = save_hf(make_hf("bert"), tmp_path / "c")
  config = json.loads(open(os.path.join(directory, "config.json")).read())
  (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
  message = _one_line_error(directory, "config.json", "num_attention_heads=5", "hidden_size=32")
  assert "shape mismatch" not in message


def test_hub_ids_fetch_tokenizer_files(monkeypatch, tmp_path):
  hub = pytest.importorskip("huggingface_hub")
  seen = {}

  def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
    seen.update(repo_id=repo_id, patterns=list(allow_patterns))
    return str(tmp_path)

  monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
  assert hf.resolve("org/some-model") == str(tmp_path)
  assert seen["repo_id"] == "org/some-model"
  for name in ("config.json", "*.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
               "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
    assert name in seen["patterns"], name


# ------------------------------------------ mesh loading with dimensions the mesh does not divide
def test_indivisible_dimensions_are_replicated_on_a_mesh(tmp_path, caplog):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  from skipjax.train import sharding  # pylint: disable=import-outside-toplevel
  caplog.set_level("INFO")
  sharding._LOGGED.clear()  # pylint: disable=protected-access
  P = jax.sharding.PartitionSpec
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("data", "model"))
  # BERT-like odd sizes: vocabulary 1003 (30522 % 8 ≠ 0 too), type table [2, 48], 12 heads, FFN 100.
  bert = save_hf(make_hf("bert", dict(vocab_size=1003, hidden_size=48, num_attention_heads=12,
                                      intermediate_size=100)), tmp_path / "bert")
  # OPT with 12 heads (OPT-125m's count) and a vocabulary of 50, FFN 64 (divisible: stays split).
  opt = save_hf(make_hf("opt", dict(vocab_size=50, hidden_size=48, num_attention_heads=12, ffn_dim=64,
                                    word_embed_proj_dim=48)), tmp_path / "opt")
  for directory in (bert, opt):
    _, params = hf.load(directory, mesh=mesh)
    _, ref = hf.load(directory)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref)
    query = params["block_0"]["attn"]["query"]["kernel"]
    assert query.sharding.spec == P(None, None, None)  # 12 heads on 8 devices: replicated
  _, params = hf.load(opt, mesh=mesh)
  assert params["block_0"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, "model")  # 64 / 8
  assert params["embed"]["embedding"].sharding.spec == P(None, None)
  _, params = hf.load(bert, mesh=mesh)
  assert params["embeddings"]["type_embed"]["embedding"].sharding.spec == P(None, None)
  assert params["block_1"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, None)
  logged = [r.getMessage() for r in caplog.records if "not divisible by mesh axis" in r.getMessage()]
  heads = [m for m in logged if "'heads' of size 12" in m]
  assert len(heads) == 1, logged  # once, although every layer of both models has 12 heads
