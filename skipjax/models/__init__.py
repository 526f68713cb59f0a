"""Models built from the gated residual block."""
from typing import Any, Mapping, Union

import flax.linen as nn

from skipjax.models import layout
from skipjax.models.block import Block
from skipjax.models.config import SkipConfig, TransformerConfig
from skipjax.models.encoder import Encoder, EncoderConfig
from skipjax.models.layout import per_layer
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
