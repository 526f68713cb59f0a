"""Typed, hashable model configuration built from the `config.model` ConfigDict."""
import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from skipjax.depth import plan as plan_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SkipConfig:
  """SkipLayer routing (LtS §2); `router='none'` is the dense model."""
  router: str = "none"            # gumbel | top1 | sigmoid | random | none
  dispatch: str = "masked"        # masked | capacity | grouped
  target_density: float = 1.0     # P
  granularity: str = "layer"      # layer | block | ffn (route only the FFN block: WideFFN)
  gsize: int = 64
  capacity_factor: float = 1.25
  aux_weight: float = 0.1         # lambda
  temperature: float = 1.0
  density_warmup_steps: int = 0   # dense-to-sparse: P_t anneals 1 -> P over these steps (0: LtS)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Decoder-only LM built from the gated residual block (DESIGN.md)."""
  vocab_size: int = 256
  d_model: int = 128
  num_heads: int = 4
  head_dim: int = 0               # 0: d_model // num_heads
  num_layers: int = 4
  d_ff: int = 512
  activation: str = "gelu"
  max_len: int = 512
  position: str = "learned"       # learned | sinusoidal | rope | none
  rope_theta: float = 10000.0     # RoPE base (position='rope')
  sliding_window: int = 0         # > 0: causal sliding-window attention (Mistral)
  num_kv_heads: int = 0           # grouped-query attention; 0: num_heads
  position_offset: int = 0        # OPT: 2
  norm: str = "pre"               # pre | post
  post_ln_skip: str = "identity"  # skipped post-LN block: y = x | 'ln': y = LN(x) (RR: "only the skip connection")
  final_norm: bool = True
  tie_embeddings: bool = True
  use_bias: bool = True
  qkv_bias: Optional[bool] = None  # None: use_bias (Qwen2: True with use_bias=False)
  out_bias: Optional[bool] = None  # None: use_bias
  mlp_bias: Optional[bool] = None  # None: use_bias
  mlp_gated: bool = False         # SwiGLU (activation='silu') / GeGLU ('gelu'): params gate, wi, wo
  norm_type: str = "layernorm"    # layernorm | rmsnorm (eps: layer_norm_eps)
  layer_scale: bool = False       # DINOv2 (CaiT LayerScale): y = x + γ ⊙ R(x), γ [d] per branch
  layer_norm_eps: float = 1e-5
  layer_norm_affine: bool = True
  embed_proj_dim: int = 0         # OPT-350m word_embed_proj_dim (0: none)
  causal: bool = True             # False: bidirectional encoder (BERT, ViT)
  dropout_rate: float = 0.0
  dtype: str = "float32"          # activation dtype; params are always float32
  scan_layers: bool = False
  remat: bool = False
  oracle_threshold: float = 0.0   # RR §4.4 applied oracle: skip R(x) where ‖R(x)‖/‖x‖ < this
  skip: SkipConfig = SkipConfig()
  # Execution plan (skipjax/depth/plan.py) in its string form, e.g. '0:3,5:8' or '0,1,2,2,3a';
  # '' is the identity plan. Given as a tuple of PlanEntry it is stored as its string form.
  plan: str = ""

  def __post_init__(self):
    if not isinstance(self.plan, str):
      object.__setattr__(self, "plan", plan_lib.to_string(plan_lib.resolve(self.plan, self.num_layers)))
    plan = self.execution_plan  # validates: one-line ValueError naming config.model.plan
    if self.scan_layers and not plan_lib.is_identity(plan, self.num_layers):
      raise ValueError(f"config.model.plan={self.plan!r} needs scan_layers=False: scanned layers serve only "
                       "the identity plan (convert params with skipjax.models.layout.to_loop)")

  @property
  def execution_plan(self) -> plan_lib.Plan:
    """The plan as a tuple of PlanEntry, one per depth position (identity when `plan` is '')."""
    return plan_lib.parse(self.plan, self.num_layers)

  @property
  def heads_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_dict(cls, cfg: Mapping[str, Any]) -> "TransformerConfig":
    """From a ConfigDict / dict; unknown keys are an error naming the field."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    cfg.pop("model_type", None)
    skip = dict(cfg.pop("skip", {}) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for key in cfg:
      if key not in known:
        raise ValueError(f"config.model.{key} is not a model field; known: {sorted(known)}")
    skip_known = {f.name for f in dataclasses.fields(SkipConfig)}
    for key in skip:
      if key not in skip_known:
        raise ValueError(f"config.model.skip.{key} is not a skip field; known: {sorted(skip_known)}")
    return cls(skip=SkipConfig(**skip), **cfg)
