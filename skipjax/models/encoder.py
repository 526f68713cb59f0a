"""Bidirectional encoders (BERT, ViT, DINOv2) built from the same gated residual Block as the decoder.

Only the embeddings differ from the decoder LM (DESIGN.md: one block serves every model):
  BERT    word + position + token-type embeddings → LayerNorm → post-LN blocks (no final norm)
  ViT     patch conv → [cls; patches] + position embeddings → pre-LN blocks → final LayerNorm
  DINOv2  as ViT, the position grid bicubically resized to the input's patch grid, and blocks
          with layer scale (`layer_scale`, Oquab et al. 2023)
Both return the last hidden state [B, T, d] in float32. Blocks are `block_{i}` walked along
`config.plan` as in the decoder (models/stack.py), so the sown statistics
(`stats/{attn,ffn}_{input,residual}_norm`) read the same as for the decoder.
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from skipjax.layers import LearnedPositions, layer_norm, make_norm, token_embedding
from skipjax.layers.embeddings import resize_position_grid
from skipjax.models import stack
from skipjax.models.config import TransformerConfig

ENCODER_TYPES = ("bert", "vit", "dinov2")
_embed_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Encoder settings around the blocks' `TransformerConfig` (which has `causal=False`)."""
  model_type: str = "bert"        # bert | vit | dinov2
  transformer: TransformerConfig = TransformerConfig(causal=False, norm="post", final_norm=False)
  type_vocab_size: int = 2        # BERT token types
  image_size: int = 224           # ViT: square images of this side (DINOv2: of its position grid)
  patch_size: int = 16
  num_channels: int = 3

  def __post_init__(self):
    if self.model_type not in ENCODER_TYPES:
      raise ValueError(f"config.model.model_type={self.model_type!r} is not one of {ENCODER_TYPES}")
    if self.transformer.causal:
      raise ValueError("config.model.causal must be False for an encoder")
    if self.model_type in ("vit", "dinov2") and self.image_size % self.patch_size:
      raise ValueError(f"config.model.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

  @property
  def num_layers(self) -> int:
    return self.transformer.num_layers

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def to_dict(self) -> dict:
    """Flat dict (TransformerConfig fields + encoder fields + model_type), JSON-serialisable."""
    out = dataclasses.asdict(self.transformer)
    out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "transformer"})
    return out

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "EncoderConfig":
    """From a flat ConfigDict / dict as written by `to_dict`; unknown keys name the field."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    own = {f.name for f in dataclasses.fields(cls)} - {"transformer"}
    kwargs = {k: cfg.pop(k) for k in list(cfg) if k in own}
    cfg.setdefault("causal", False)
    return cls(transformer=TransformerConfig.from_dict(cfg), **kwargs)


class BertEmbeddings(nn.Module):
  """BERT input: LN(word(ids) + position(pos) + token_type(types)) (Devlin et al. 2019 §3)."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, tokens, positions, token_type_ids, deterministic: bool = True):
    cfg = self.config.transformer
    dtype = cfg.compute_dtype
    x = token_embedding(cfg.vocab_size, cfg.d_model, dtype, name="embed")(tokens)
    x = x + LearnedPositions(cfg.max_len, cfg.d_model, cfg.position_offset, dtype, name="pos_embed")(positions)
    x = x + token_embedding(self.config.type_vocab_size, cfg.d_model, dtype, name="type_embed")(token_type_ids)
    x = layer_norm(cfg.layer_norm_eps, cfg.layer_norm_affine, dtype, name="ln_embed")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


def _patch_conv(cfg: EncoderConfig) -> nn.Conv:
  """Non-overlapping p×p patches → d features (ViT Eq. 1's E as a strided convolution)."""
  p, tcfg = cfg.patch_size, cfg.transformer
  return nn.Conv(tcfg.d_model, (p, p), strides=(p, p), padding="VALID", dtype=tcfg.compute_dtype, name="patch_embed",
                 kernel_init=nn.with_logical_partitioning(_embed_init, (None, None, None, "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class PatchEmbeddings(nn.Module):
  """ViT input (Dosovitskiy et al. 2021 Eq. 1): [x_cls; x_p¹E; …; x_pᴺE] + E_pos, pixels NHWC."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, pixels, deterministic: bool = True):
    cfg, tcfg = self.config, self.config.transformer
    dtype = tcfg.compute_dtype
    x = _patch_conv(cfg)(pixels)  # [B, H/p, W/p, d]
    x = x.reshape(x.shape[0], -1, tcfg.d_model)
    cls = self.param("cls_token", nn.with_logical_partitioning(_embed_init, ("embed",)), (tcfg.d_model,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, tcfg.d_model))
    x = jnp.concatenate([cls, x], axis=1)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    x = x + LearnedPositions(tcfg.max_len, tcfg.d_model, 0, dtype, name="pos_embed")(positions)
    return nn.Dropout(tcfg.dropout_rate)(x, deterministic=deterministic)


class ResizedPatchEmbeddings(nn.Module):
  """DINOv2 input: [x_cls; patches] + E_pos, the patch part of E_pos (a square grid for
  `image_size`) bicubically resized to the input's patch grid (HF `interpolate_pos_encoding`)."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, pixels, deterministic: bool = True):
    cfg, tcfg = self.config, self.config.transformer
    dtype = tcfg.compute_dtype
    x = _patch_conv(cfg)(pixels)  # [B, H/p, W/p, d]
    b, h, w, d = x.shape
    cls = self.param("cls_token", nn.with_logical_partitioning(_embed_init, ("embed",)), (d,), jnp.float32)
    table = self.param("pos_embed", nn.with_logical_partitioning(_embed_init, (None, "embed")),
                       (cfg.num_patches + 1, d), jnp.float32)
    pos = jnp.concatenate([table[:1], resize_position_grid(table[1:], h, w)], axis=0)  # [1 + h·w, d]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x.reshape(b, h * w, d)], axis=1)
    x = x + pos.astype(dtype)
    return nn.Dropout(tcfg.dropout_rate)(x, deterministic=deterministic)


class Encoder(nn.Module):
  """`apply({'params': p}, inputs, attention_mask=None)` → last hidden state [B, T, d] (float32).

  `inputs`: token ids [B, T] (BERT) or pixels [B, H, W, C] (ViT; DINOv2 at any H, W).
  """
  config: EncoderConfig

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, attention_mask: Optional[jnp.ndarray] = None,
               token_type_ids: Optional[jnp.ndarray] = None, positions: Optional[jnp.ndarray] = None,
               *, deterministic: bool = True) -> jnp.ndarray:
    cfg, tcfg = self.config, self.config.transformer
    if cfg.model_type == "vit":
      x = PatchEmbeddings(cfg, name="embeddings")(inputs, deterministic)
    elif cfg.model_type == "dinov2":
      x = ResizedPatchEmbeddings(cfg, name="embeddings")(inputs, deterministic)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(inputs)
      x = BertEmbeddings(cfg, name="embeddings")(inputs, positions, token_type_ids, deterministic)
    block_positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    stack.check_overrides(self.variables.get("gate_override", {}), tcfg)
    x = stack.walk(tcfg, deterministic, x, lambda block, x, entry, repeat: block(
        x, block_positions, attention_mask, entry.slot, None, entry.branches), self)
    if tcfg.final_norm:
      x = make_norm(tcfg.norm_type, tcfg.layer_norm_eps, tcfg.layer_norm_affine, tcfg.compute_dtype,
                    name="ln_final")(x)
    return x.astype(jnp.float32)
