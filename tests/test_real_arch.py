"""Modern decoders (Llama / Qwen2 / Mistral) and DINOv2 as configurations of the one Block.

Tiny random HF models built offline (odd sizes, GQA with one and several K/V heads, tied and
untied heads, rope_theta ≠ 10000, head_dim ≠ d / heads), saved as safetensors, converted with
`skipjax.convert.hf.load` and compared with HF PyTorch in fp32; then the KV cache, SkipLayer
routing and scanned layers on the converted models.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from skipjax import decode, models
from skipjax.convert import ConversionError, hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from _torch_helpers import randomize  # pylint: disable=wrong-import-position

COMMON = dict(vocab_size=67, hidden_size=48, intermediate_size=75, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32, rms_norm_eps=1e-5, attention_dropout=0.0)
DECODERS = {
    # GQA 4 query / 2 K/V heads, head_dim 16 ≠ 48 / 4, untied head.
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
                                       tie_word_embeddings=False)),
    # Multi-query (one K/V head), tied head, biases everywhere, GeGLU.
    "llama_mqa_tied_bias": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True, hidden_act="gelu", rope_theta=20000.0)),
    # q/k/v bias without o bias; 6 heads / 3 K/V heads of 10 ≠ 42 / 6.
    "qwen2_gqa_tied": ("qwen2", dict(hidden_size=42, num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                                     rope_theta=1e6, tie_word_embeddings=True)),
    # A sliding window (4) shorter than the sequence.
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=4, rope_theta=5e5,
                                       tie_word_embeddings=False)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}
SEQ = 13



def make_decoder(variant: str):
  kind, overrides = DECODERS[variant]
  config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[kind])
  cfg = config_cls(**{**COMMON, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  return randomize(model_cls(cfg))


def _tokens(batch=2, length=SEQ, seed=0):
  return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], (batch, length))


_CACHE = {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """variant → (cfg, params, HF logits of `_tokens()`), each built, saved and converted once."""
  def get(variant):
    if variant not in _CACHE:
      model = make_decoder(variant)
      directory = tmp_path_factory.mktemp(variant)
      model.save_pretrained(directory)
      with torch.no_grad():
        want = model(input_ids=torch.tensor(_tokens())).logits.numpy()
      cfg, params = hf.load(str(directory))
      _CACHE[variant] = (cfg, params, want)
    return _CACHE[variant]
  return get


def _forward(cfg, params, tokens, **kw):
  """Logits (and sown collections with `mutable=`), jitted: tracing op by op is slower here."""
  model = models.build(cfg)
  return jax.jit(lambda p, t: model.apply({"params": p}, t, **kw))(params, jnp.asarray(tokens, jnp.int32))


@pytest.mark.parametrize("variant", sorted(DECODERS))
def test_decoder_logits_match_pytorch(variant, converted):
  cfg, params, want = converted(variant)
  kind, overrides = DECODERS[variant]
  assert cfg.position == "rope" and cfg.norm_type == "rmsnorm" and cfg.mlp_gated
  assert cfg.kv_heads == overrides["num_key_value_heads"]
  assert cfg.tie_embeddings == overrides["tie_word_embeddings"] and ("lm_head" in params) != cfg.tie_embeddings
  assert cfg.rope_theta == overrides["rope_theta"]
  assert params["block_0"]["attn"]["key"]["kernel"].shape == (cfg.d_model, cfg.kv_heads, cfg.heads_dim)
  if kind == "qwen2":
    assert "bias" in params["block_0"]["attn"]["query"] and "bias" not in params["block_0"]["attn"]["out"]
  got = np.asarray(_forward(cfg, params, _tokens()))
  diff = np.abs(got - want).max()
  print(f"{variant} max abs diff {diff:.2e}")
  assert got.shape == want.shape and diff <= 1e-4


def test_mistral_sliding_window_matters(converted):
  cfg, params, want = converted("mistral_window")
  assert cfg.sliding_window == 4
  full = np.asarray(_forward(dataclasses.replace(cfg, sliding_window=0), params, _tokens()))
  assert np.abs(full - want).max() > 1e-3  # so the parity above really tests the window


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_gqa_tied", "mistral_window"])
def test_kv_cache_decoding_equals_full_forward(variant, converted):
  """Token-by-token decoding (K/V cache of the K/V heads, keys rotated at their slot) = forward."""
  cfg, params, want = converted(variant)
  model = models.build(cfg)
  tokens = jnp.asarray(_tokens(), jnp.int32)
  cache = decode.init_cache(model, tokens.shape[0])
  assert cache["block_0"]["attn"]["cached_key"].shape == (2, cfg.max_len, cfg.kv_heads, cfg.heads_dim)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True, mutable=["cache"]))
  outs = []
  for t in range(tokens.shape[1]):
    logits, state = step(cache, tokens[:, t:t + 1])
    cache = state["cache"]
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, atol=1e-4)


def _routed(cfg, params, **skip):
  """`cfg` with SkipLayer routers; the converted params plus router params from init."""
  kw = dict(router="top1", dispatch="masked", target_density=0.5, granularity="layer", capacity_factor=2.0, gsize=4)
  rcfg = dataclasses.replace(cfg, skip=models.SkipConfig(**{**kw, **skip}))
  model = models.build(rcfg)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(1)},
                                                            jnp.zeros((1, 4), jnp.int32))["params"]))
  init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # router params are set below
  merged = {k: ({**v, **params[k]} if k.startswith("block_") else params[k]) for k, v in init.items()}

  return rcfg, _helpers.perturb_routers(merged)  # mixed routing decisions


@pytest.mark.parametrize("granularity,method", [("layer", "capacity"), ("block", "grouped")])
def test_routed_llama_dispatch_equals_masked_and_all_routed_equals_hf(granularity, method, converted):
  """Gathered queries keep their original rotary positions: a gathering dispatch = masked; with
  every token routed (capacity dispatch) the SkipLayer model is the HF model."""
  cfg, params, want = converted("llama_gqa_untied")
  tokens = jnp.asarray(_tokens(), jnp.int32)
  outs = {}
  for m in ("masked", method):
    rcfg, rparams = _routed(cfg, params, granularity=granularity, dispatch=m)
    logits, state = _forward(rcfg, rparams, tokens, mutable=["gates"])
    outs[m] = np.asarray(logits)
    mask = models.per_layer(state["gates"], "layer_mask" if granularity == "layer" else "attn_mask")
    assert 0.0 < float(np.mean(np.asarray(mask))) < 1.0
  np.testing.assert_allclose(outs[method], outs["masked"], atol=1e-5)
  if granularity != "layer":
    return
  # Routers forced on: the routed model is the HF model.
  rcfg, rparams = _routed(cfg, params, granularity=granularity, dispatch=method, target_density=1.0,
                          capacity_factor=1.0)
  forced = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[..., 1].set(100.0) if "router" in jax.tree_util.keystr(path)
      and "bias" in jax.tree_util.keystr(path) else x, rparams)
  np.testing.assert_allclose(_forward(rcfg, forced, tokens), want, atol=1e-4)


def test_routed_qwen2_greedy_decoding_equals_full_forward(converted):
  """LtS Alg. 2 on a GQA + RoPE + bias model: cached decoding with per-step routing (batch 1,
  `lax.cond`) generates what recomputing the full forward each step does."""
  cfg, params, _ = converted("qwen2_gqa_tied")
  rcfg, rparams = _routed(cfg, params, granularity="block")
  model = models.build(rcfg)
  prompt = _tokens(1, 4, seed=3)
  result = decode.generate(model, rparams, prompt, 5)
  forward = jax.jit(lambda t: model.apply({"params": rparams}, t))
  seq = np.zeros((1, cfg.max_len), np.int32)
  seq[:, :4] = prompt
  for t in range(4, 9):
    seq[:, t] = np.argmax(np.asarray(forward(seq))[:, t - 1], axis=-1)
  np.testing.assert_array_equal(result.tokens, seq[:, :9])
  assert 0.0 < float(np.mean(result.executed)) < 1.0


def test_scan_layers_equal_the_loop(converted):
  cfg, params, want = converted("mistral_window")
  scan_params = models.layout.to_scan(params, cfg.num_layers)
  got = _forward(dataclasses.replace(cfg, scan_layers=True), scan_params, _tokens())
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_unsupported_rope_scaling_is_named(converted, tmp_path):
  model = make_decoder("llama_gqa_untied")
  model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
  model.save_pretrained(tmp_path)
  with pytest.raises(ConversionError, match="rope_parameters: rope_type='linear'"):
    hf.load(str(tmp_path))


def test_gqa_params_are_sharded_or_replicated_on_a_mesh(converted, tmp_path):
  """'kv_heads' is split over 'model' when it divides, else replicated (2 K/V heads, 4-way axis)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  model = make_decoder("llama_gqa_untied")
  model.save_pretrained(tmp_path)
  P = jax.sharding.PartitionSpec
  for shape, kv_spec in (((4, 2), P(None, "model", None)), ((2, 4), P(None, None, None))):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
    cfg, params = hf.load(str(tmp_path), mesh=mesh)
    assert params["block_0"]["attn"]["key"]["kernel"].sharding.spec == kv_spec
    assert params["block_0"]["attn"]["query"]["kernel"].sharding.spec == P(None, "model", None)


# ---------------------------------------------------------------------------------------- DINOv2
DINO = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=3, image_size=42, patch_size=14,
            num_channels=3, layerscale_value=0.5, layer_norm_eps=1e-6)
DINO_VARIANTS = {"mlp": {}, "no_qkv_bias": {"qkv_bias": False}}


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  """variant → (HF Dinov2Model, cfg, params)."""
  built = {}

  def get(variant):
    if variant not in built:
      cfg = transformers.Dinov2Config(**{**DINO, **DINO_VARIANTS[variant]})
      cfg._attn_implementation = "eager"
      torch.manual_seed(0)
      model = randomize(transformers.Dinov2Model(cfg))
      directory = tmp_path_factory.mktemp("dinov2_" + variant)
      model.save_pretrained(directory)
      built[variant] = (model, *hf.load(str(directory)))
    return built[variant]
  return get


@pytest.mark.parametrize("variant,height,width", [("mlp", 42, 42), ("mlp", 56, 70), ("mlp", 28, 28),
                                                  ("no_qkv_bias", 70, 56)])
def test_dinov2_last_hidden_state_matches_pytorch(variant, height, width, dinov2):
  """[CLS] + patch tokens; at image sizes other than the config's the position grid is resized."""
  model, cfg, params = dinov2(variant)
  assert cfg.model_type == "dinov2" and cfg.patch_size == 14 and cfg.transformer.layer_scale
  assert ("bias" in params["block_0"]["attn"]["query"]) == (variant == "mlp")
  pixels = np.random.default_rng(height * width).normal(size=(2, 3, height, width)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  enc = models.build(cfg)
  got = np.asarray(jax.jit(lambda p, x: enc.apply({"params": p}, x))(params, jnp.asarray(pixels.transpose(0, 2, 3, 1))))
  assert got.shape == want.shape == (2, 1 + (height // 14) * (width // 14), DINO["hidden_size"])
  diff = np.abs(got - want).max()
  print(f"dinov2[{variant}] {height}x{width} max abs diff {diff:.2e}")
  assert diff <= 1e-4


def test_dinov2_swiglu_is_named(tmp_path):
  cfg = transformers.Dinov2Config(**{**DINO, "use_swiglu_ffn": True})
  transformers.Dinov2Model(cfg).save_pretrained(tmp_path)
  with pytest.raises(ConversionError, match="use_swiglu_ffn"):
    hf.load(str(tmp_path))


def test_configs_roundtrip_through_json(converted, dinov2):
  """The new fields survive the converter CLI's config.json (export.config_to_dict / from_dict)."""
  import json
  from skipjax.convert import export
  for cfg in (converted("qwen2_gqa_tied")[0], converted("mistral_window")[0], dinov2("mlp")[1]):
    assert export.config_from_dict(json.loads(json.dumps(export.config_to_dict(cfg)))) == cfg
