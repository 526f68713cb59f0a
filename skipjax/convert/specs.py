"""Per-`model_type` knowledge: HF config.json → skipjax config, and HF tensor names → params.

  opt   OPTForCausalLM / OPTModel (`model.decoder.*` or `decoder.*`) → models.Transformer
  bert  BertModel and Bert* heads (`bert.*` or bare)                → models.Encoder (post-LN)
  vit   ViTModel / ViTFor* (`vit.*` or bare; legacy and v5 names)   → models.Encoder (pre-LN)
  llama, mistral, qwen2   *ForCausalLM / *Model (`model.*` or bare) → models.Transformer with
        RMSNorm, RoPE, SwiGLU, grouped-query attention (Qwen2: q/k/v bias; Mistral: sliding window)
  dinov2  Dinov2Model (`dinov2.*` or bare; legacy and v5 names)     → models.Encoder (layer scale)
The decoder specs read only HF tensor names and the HF config dict, so GGUF tensors renamed to
HF names go through them too.
Tensors of heads skipjax does not model (poolers, classifiers, MLM heads, buffers, a tied
`lm_head`) are listed as ignored; any other stored tensor without a rule is an error.
"""
import dataclasses
from typing import Any, Callable, Dict, FrozenSet, List, Tuple

import jax.numpy as jnp

from skipjax.convert.reader import ConversionError
from skipjax.convert.rules import Rule, block_rules, dense_rules
from skipjax.models import EncoderConfig, TransformerConfig

# HF `hidden_act` / `activation_function` → skipjax.layers activation names.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


@dataclasses.dataclass(frozen=True)
class Spec:
  model_type: str
  prefixes: Tuple[str, ...]            # stripped from stored names (first that matches)
  ignored: Tuple[str, ...]             # regexes (on stripped names) of tensors not modelled
  config: Callable[[Dict[str, Any]], Any]
  rules: Callable[[Any], List[Rule]]
  dummy_inputs: Callable[[Any], tuple]
  # targets filled with zeros when the checkpoint has no tensor for them: (hf_config, cfg) → paths
  zero_fill: Callable[[Dict[str, Any], Any], FrozenSet[Tuple[str, ...]]] = lambda hf, cfg: frozenset()


def _activation(hf: Dict[str, Any], field: str) -> str:
  name = hf.get(field, "gelu")
  if name not in ACTIVATIONS:
    raise ConversionError(f"config.json {field}={name!r} is not supported; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------- OPT
def opt_config(hf: Dict[str, Any]) -> TransformerConfig:
  """OPT (Zhang et al. 2022): learned positions offset 2, ReLU, pre-LN or 350m-style post-LN."""
  d = hf["hidden_size"]
  proj = hf.get("word_embed_proj_dim") or d
  pre = hf.get("do_layer_norm_before", True)
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=d, num_heads=hf["num_attention_heads"],
      num_layers=hf["num_hidden_layers"], d_ff=hf["ffn_dim"],
      activation=_activation(hf, "activation_function"), max_len=hf["max_position_embeddings"],
      position="learned", position_offset=2, norm="pre" if pre else "post",
      final_norm=bool(pre and not hf.get("_remove_final_layer_norm", False)),
      tie_embeddings=hf.get("tie_word_embeddings", True), use_bias=hf.get("enable_bias", True),
      layer_norm_eps=1e-5, layer_norm_affine=hf.get("layer_norm_elementwise_affine", True),
      embed_proj_dim=proj if proj != d else 0, causal=True)


def opt_rules(cfg: TransformerConfig) -> List[Rule]:
  rules = [Rule(("embed_tokens.weight",), ("embed", "embedding")),
           Rule(("embed_positions.weight",), ("pos_embed", "embedding")),
           Rule(("project_in.weight",), ("project_in", "kernel"), "linear"),
           Rule(("project_out.weight",), ("project_out", "kernel"), "linear"),
           Rule(("lm_head.weight",), ("lm_head", "kernel"), "linear")]
  rules += dense_rules(("ln_final",), ["final_layer_norm"], "norm")
  layer = "layers.{i}."
  for i in range(cfg.num_layers):
    rules += block_rules(i, {
        "attn/query:qkv": [layer + "self_attn.q_proj"], "attn/key:qkv": [layer + "self_attn.k_proj"],
        "attn/value:qkv": [layer + "self_attn.v_proj"], "attn/out:out": [layer + "self_attn.out_proj"],
        "mlp/wi:linear": [layer + "fc1"], "mlp/wo:linear": [layer + "fc2"],
        "ln_attn:norm": [layer + "self_attn_layer_norm"], "ln_ffn:norm": [layer + "final_layer_norm"]})
  return rules


OPT = Spec("opt", ("model.decoder.", "decoder."), (r"^lm_head\.weight$",), opt_config, opt_rules,
           lambda cfg: (jnp.zeros((1, 1), jnp.int32),))


# ---------------------------------------------------------------------------------------- BERT
def bert_config(hf: Dict[str, Any]) -> EncoderConfig:
  """BERT (Devlin et al. 2019): absolute positions, token types, post-LN encoder blocks."""
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ConversionError(f"config.json position_embedding_type={hf['position_embedding_type']!r} "
                          "is not supported; only 'absolute'")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise ConversionError("config.json is_decoder/add_cross_attention: only BERT encoders are supported")
  blocks = TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
      activation=_activation(hf, "hidden_act"), max_len=hf["max_position_embeddings"],
      position="learned", norm="post", final_norm=False, tie_embeddings=False,
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), causal=False)
  return EncoderConfig("bert", blocks, type_vocab_size=hf.get("type_vocab_size", 2))


def bert_rules(cfg: EncoderConfig) -> List[Rule]:
  emb = ("embeddings",)
  rules = [Rule(("embeddings.word_embeddings.weight",), emb + ("embed", "embedding")),
           Rule(("embeddings.position_embeddings.weight",), emb + ("pos_embed", "embedding")),
           Rule(("embeddings.token_type_embeddings.weight",), emb + ("type_embed", "embedding"))]
  rules += dense_rules(emb + ("ln_embed",), ["embeddings.LayerNorm"], "norm")
  layer = "encoder.layer.{i}."
  for i in range(cfg.num_layers):
    rules += block_rules(i, {
        "attn/query:qkv": [layer + "attention.self.query"], "attn/key:qkv": [layer + "attention.self.key"],
        "attn/value:qkv": [layer + "attention.self.value"], "attn/out:out": [layer + "attention.output.dense"],
        "mlp/wi:linear": [layer + "intermediate.dense"], "mlp/wo:linear": [layer + "output.dense"],
        "ln_attn:norm": [layer + "attention.output.LayerNorm"], "ln_ffn:norm": [layer + "output.LayerNorm"]})
  return rules


BERT = Spec("bert", ("bert.",),
            (r"^embeddings\.(position_ids|token_type_ids)$", r"^pooler\.", r"^cls\.", r"^classifier\.",
             r"^qa_outputs\."),
            bert_config, bert_rules, lambda cfg: (jnp.zeros((1, 1), jnp.int32),))


# ----------------------------------------------------------------------------------------- ViT
def vit_config(hf: Dict[str, Any]) -> EncoderConfig:
  """ViT (Dosovitskiy et al. 2021): patch conv, cls token, learned positions, pre-LN blocks."""
  def side(field, default):
    value = hf.get(field, default)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ConversionError(f"config.json {field}={value!r}: only square images/patches are supported")
      value = value[0]
    return int(value)
  image, patch = side("image_size", 224), side("patch_size", 16)
  blocks = TransformerConfig(
      vocab_size=1, d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
      activation=_activation(hf, "hidden_act"), max_len=(image // patch) ** 2 + 1,
      position="learned", norm="pre", final_norm=True, tie_embeddings=False,
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), causal=False)
  return EncoderConfig("vit", blocks, image_size=image, patch_size=patch,
                       num_channels=hf.get("num_channels", 3))


def vit_rules(cfg: EncoderConfig) -> List[Rule]:
  emb = ("embeddings",)
  rules = [Rule(("embeddings.cls_token",), emb + ("cls_token",), "squeeze"),
           Rule(("embeddings.position_embeddings",), emb + ("pos_embed", "embedding"), "squeeze")]
  rules += dense_rules(emb + ("patch_embed",), ["embeddings.patch_embeddings.projection"], "conv")
  rules += dense_rules(("ln_final",), ["layernorm"], "norm")
  old, new = "encoder.layer.{i}.", "layers.{i}."  # HF checkpoints / transformers 5 module names
  for i in range(cfg.num_layers):
    rules += block_rules(i, {
        "attn/query:qkv": [old + "attention.attention.query", new + "attention.q_proj"],
        "attn/key:qkv": [old + "attention.attention.key", new + "attention.k_proj"],
        "attn/value:qkv": [old + "attention.attention.value", new + "attention.v_proj"],
        "attn/out:out": [old + "attention.output.dense", new + "attention.o_proj"],
        "mlp/wi:linear": [old + "intermediate.dense", new + "mlp.fc1"],
        "mlp/wo:linear": [old + "output.dense", new + "mlp.fc2"],
        "ln_attn:norm": [old + "layernorm_before", new + "layernorm_before"],
        "ln_ffn:norm": [old + "layernorm_after", new + "layernorm_after"]})
  return rules


def vit_zero_fill(hf: Dict[str, Any], cfg: EncoderConfig) -> FrozenSet[Tuple[str, ...]]:
  """`qkv_bias=False` checkpoints have no q/k/v biases; the shared Block keeps them at zero."""
  if hf.get("qkv_bias", True):
    return frozenset()
  return frozenset((f"block_{i}", "attn", m, "bias") for i in range(cfg.num_layers)
                   for m in ("query", "key", "value"))


VIT = Spec("vit", ("vit.",), (r"^pooler\.", r"^classifier\.", r"^embeddings\.mask_token$"),
           vit_config, vit_rules,
           lambda cfg: (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),),
           vit_zero_fill)


# --------------------------------------------------------------------- Llama / Mistral / Qwen2
def _rope_theta(hf: Dict[str, Any]) -> float:
  """RoPE base from `rope_parameters` (transformers ≥ 5) or `rope_theta`; only unscaled RoPE."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if kind not in (None, "default"):
    field = "rope_parameters" if params else "rope_scaling"
    raise ConversionError(f"config.json {field}: rope_type={kind!r} is not supported; only unscaled RoPE ('default')")
  if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConversionError("config.json partial_rotary_factor != 1 is not supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: Dict[str, Any], max_len: int, layers: int) -> int:
  """The causal sliding window, one for every layer (0: none or longer than `max_len`)."""
  window = hf.get("sliding_window") or 0
  if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
    window = 0
  types = hf.get("layer_types")
  if window and types is not None and hf.get("model_type") == "qwen2":
    if set(types) == {"full_attention"}:
      window = 0
    elif set(types) != {"sliding_attention"} and window < max_len:
      raise ConversionError(f"config.json layer_types mixes full and sliding-window attention (sliding_window="
                            f"{window}); only one attention kind for all {layers} layers is supported")
  return int(window) if window and window < max_len else 0


def llama_config(hf: Dict[str, Any]) -> TransformerConfig:
  """Llama (Touvron et al. 2023 §2.2): pre-RMSNorm, SwiGLU, RoPE, GQA; Mistral adds a sliding
  window (Jiang et al. 2023 §2), Qwen2 q/k/v biases without an output bias."""
  model_type = hf.get("model_type", "llama")
  heads = hf["num_attention_heads"]
  d = hf["hidden_size"]
  head_dim = hf.get("head_dim") or d // heads
  kv_heads = hf.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise ConversionError(f"config.json num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
  if head_dim % 2:
    raise ConversionError(f"config.json head_dim={head_dim} must be even for rotary positions")
  max_len = hf.get("max_position_embeddings", 2048)
  qwen2 = model_type == "qwen2"
  attention_bias = bool(hf.get("attention_bias", False))
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=d, num_heads=heads, head_dim=head_dim if head_dim != d // heads else 0,
      num_layers=hf["num_hidden_layers"], d_ff=hf["intermediate_size"],
      activation=_activation({"hidden_act": hf.get("hidden_act", "silu")}, "hidden_act"), max_len=max_len,
      position="rope", rope_theta=_rope_theta(hf), sliding_window=_sliding_window(hf, max_len, hf["num_hidden_layers"]),
      num_kv_heads=kv_heads if kv_heads != heads else 0, norm="pre", norm_type="rmsnorm", final_norm=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False,
      qkv_bias=True if qwen2 else attention_bias, out_bias=False if qwen2 else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)), mlp_gated=True, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      causal=True)


def llama_rules(cfg: TransformerConfig) -> List[Rule]:
  rules = [Rule(("embed_tokens.weight",), ("embed", "embedding")),
           Rule(("lm_head.weight",), ("lm_head", "kernel"), "linear")]
  rules += dense_rules(("ln_final",), ["norm"], "norm")
  layer = "layers.{i}."
  for i in range(cfg.num_layers):
    rules += block_rules(i, {
        "attn/query:qkv": [layer + "self_attn.q_proj"], "attn/key:qkv": [layer + "self_attn.k_proj"],
        "attn/value:qkv": [layer + "self_attn.v_proj"], "attn/out:out": [layer + "self_attn.o_proj"],
        "mlp/gate:linear": [layer + "mlp.gate_proj"], "mlp/wi:linear": [layer + "mlp.up_proj"],
        "mlp/wo:linear": [layer + "mlp.down_proj"],
        "ln_attn:norm": [layer + "input_layernorm"], "ln_ffn:norm": [layer + "post_attention_layernorm"]})
  return rules


def _decoder_spec(model_type: str) -> Spec:
  return Spec(model_type, ("model.",), (r"^lm_head\.weight$", r"rotary_emb\.inv_freq$"), llama_config, llama_rules,
              lambda cfg: (jnp.zeros((1, 1), jnp.int32),))


LLAMA, MISTRAL, QWEN2 = (_decoder_spec(t) for t in ("llama", "mistral", "qwen2"))


# -------------------------------------------------------------------------------------- DINOv2
def dinov2_config(hf: Dict[str, Any]) -> EncoderConfig:
  """DINOv2 (Oquab et al. 2023): a pre-LN ViT with layer scale, patch 14, position grid resized
  to the input."""
  if hf.get("use_swiglu_ffn", False):  # ViT-g: stored fused as `mlp.weights_in` [2·hidden, d]
    raise ConversionError("config.json use_swiglu_ffn=true (DINOv2 ViT-g) is not supported")
  d_ff = int(hf["hidden_size"] * hf.get("mlp_ratio", 4))
  vit = vit_config({**hf, "intermediate_size": d_ff, "layer_norm_eps": hf.get("layer_norm_eps", 1e-6),
                    "image_size": hf.get("image_size", 224), "patch_size": hf.get("patch_size", 14)})
  blocks = dataclasses.replace(vit.transformer, qkv_bias=bool(hf.get("qkv_bias", True)), layer_scale=True)
  return dataclasses.replace(vit, model_type="dinov2", transformer=blocks)


def dinov2_rules(cfg: EncoderConfig) -> List[Rule]:
  emb = ("embeddings",)
  rules = [Rule(("embeddings.cls_token",), emb + ("cls_token",), "squeeze"),
           Rule(("embeddings.position_embeddings",), emb + ("pos_embed",), "squeeze")]
  rules += dense_rules(emb + ("patch_embed",), ["embeddings.patch_embeddings.projection"], "conv")
  rules += dense_rules(("ln_final",), ["layernorm"], "norm")
  layer = "encoder.layer.{i}."  # transformers 5 names first, then the hub checkpoints' names
  for i in range(cfg.num_layers):
    rules += block_rules(i, {
        "attn/query:qkv": [layer + "attention.q_proj", layer + "attention.attention.query"],
        "attn/key:qkv": [layer + "attention.k_proj", layer + "attention.attention.key"],
        "attn/value:qkv": [layer + "attention.v_proj", layer + "attention.attention.value"],
        "attn/out:out": [layer + "attention.o_proj", layer + "attention.output.dense"],
        "mlp/wi:linear": [layer + "mlp.fc1"], "mlp/wo:linear": [layer + "mlp.fc2"],
        "ln_attn:norm": [layer + "norm1"], "ln_ffn:norm": [layer + "norm2"]})
    rules += [Rule((layer.format(i=i) + "layer_scale1.lambda1",), (f"block_{i}", "ls_attn")),
              Rule((layer.format(i=i) + "layer_scale2.lambda1",), (f"block_{i}", "ls_ffn"))]
  return rules


DINOV2 = Spec("dinov2", ("dinov2.",), (r"^embeddings\.mask_token$", r"^classifier\."), dinov2_config, dinov2_rules,
              lambda cfg: (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),))


SPECS = {spec.model_type: spec for spec in (OPT, BERT, VIT, LLAMA, MISTRAL, QWEN2, DINOV2)}
