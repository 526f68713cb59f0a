"""Models built from the gated residual block."""
from typing import Any, Mapping, Union

import flax.linen as nn
import jax.numpy as jnp

from skipjax.models.block import Block
from skipjax.models.config import SkipConfig, TransformerConfig
from skipjax.models.encoder import Encoder, EncoderConfig
from skipjax.models.transformer import Transformer

_BUILDERS = {"decoder": Transformer, "vit": Encoder, "bert": Encoder, "dinov2": Encoder}


def build(model_config: Union[Mapping[str, Any], TransformerConfig]) -> nn.Module:
  """`config.model` (ConfigDict, dict, TransformerConfig or EncoderConfig) → linen Module."""
  if isinstance(model_config, TransformerConfig):
    return Transformer(model_config)
  if isinstance(model_config, EncoderConfig):
    return Encoder(model_config)
  model_type = dict(model_config).get("model_type", "decoder")
  if model_type not in _BUILDERS:
    raise ValueError(f"config.model.model_type={model_type!r} is not one of {sorted(_BUILDERS)}")
  if _BUILDERS[model_type] is Encoder:
    return Encoder(EncoderConfig.from_dict(model_config))
  return _BUILDERS[model_type](TransformerConfig.from_dict(model_config))


def per_layer(tree: Mapping[str, Any], name: str) -> jnp.ndarray:
  """Stack sown value `name` of every layer into [num_layers, ...] (loop or scanned layout)."""
  if "layers" in tree:
    return jnp.asarray(tree["layers"]["block"][name][0])
  keys = sorted((k for k in tree if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
  return jnp.stack([tree[k][name][0] for k in keys])
