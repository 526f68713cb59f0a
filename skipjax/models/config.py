"""Typed, hashable model configuration built from the `config.model` ConfigDict."""
import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from skipjax.depth import plan as plan_lib
from skipjax.routing import mod as mod_lib

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
  # Gate semantics (issue 15 P1/P3; README "SkipLayer"):
  gate_form: str = "paper"        # layer granularity: paper (LtS Eq. 1/4) | residual (y = x + m·g₁·(F(x) − x))
  router_bias_init: str = "warmup"  # warmup: bias at logit(0.99) with a density warm-up | target: logit(P)
  router_input: str = "stream"    # stream: the router reads x | norm: the block's pre-norm LN(x)
  # Mixture-of-Depths (router='mod'; skipjax/routing/mod.py; capacity C = ⌊target_density·T⌋; its top-k
  # always gathers C tokens; `dispatch` only picks masked | grouped for a per-token mask, e.g. the causal rule):
  mod_every: int = 1              # route every k-th layer (layer i iff i % k == k − 1), others dense; paper: 2
  mod_causal: str = "aux_loss"    # decoding rule: aux_loss (BCE on r, route σ(r) > 0.5) | predictor (MLP, BCE)
  mod_aux_weight: float = 0.1     # weight of that BCE (sown into aux_loss)
  mod_eval: str = "causal"        # deterministic full forward: causal (= KV-cache decoding) | topk
  mod_weight: str = "linear"      # what multiplies f: linear r (MoD Eq. 1) | sigmoid σ(r) (not in the paper)
  # Routing groups (LtS §2.2, skipjax/routing/groups.py): tokens per group for the FFN's dispatch,
  # a divisor of seq_len or a multiple (whole rows, never across data shards); 0: one batch row.
  group_size: int = 0


GATE_FORMS = ("paper", "residual")
ROUTER_BIAS_INITS = ("warmup", "target")
ROUTER_INPUTS = ("stream", "norm")
# Router kinds whose parameters are trained through the block output (not `random` / `none`).
GRADIENT_ROUTERS = ("gumbel", "top1", "sigmoid", "highway")


def check_gate_semantics(norm: str, router: str, granularity: str, gate_form: str = "paper",
                         router_bias_init: str = "warmup", router_input: str = "stream") -> None:
  """One-line ValueError naming the field for gate options the block cannot honour (issue 15 P8).

  A post-LN residual block selects between LN(x + R(x)) and x with the hard mask, so a router at
  block / FFN granularity would get no gradient; at layer granularity the gate scales the whole
  layer output F(x) (norms included) and trains with either norm placement.
  """
  for field, value, allowed in (("gate_form", gate_form, GATE_FORMS),
                                ("router_bias_init", router_bias_init, ROUTER_BIAS_INITS),
                                ("router_input", router_input, ROUTER_INPUTS)):
    if value not in allowed:
      raise ValueError(f"config.model.skip.{field}={value!r} is not one of {list(allowed)}")
  if norm == "post" and router in GRADIENT_ROUTERS and granularity != "layer":
    raise ValueError(f"config.model.skip.granularity={granularity!r} with router={router!r} needs "
                     "config.model.norm='pre': a post-LN block gives its router no gradient (use granularity='layer')")
  if norm == "post" and router_input == "norm" and router != "none":
    raise ValueError("config.model.skip.router_input='norm' needs config.model.norm='pre' (a post-LN block has "
                     "no pre-norm LN(x) to read)")


def check_mod(norm: str, router: str, granularity: str, mod_every, mod_causal: str, mod_eval: str,
              mod_aux_weight, mod_weight: str = "linear", density_warmup_steps: int = 0, scan_layers: bool = False,
              remat: bool = False) -> None:
  """One-line ValueError naming the `config.model.skip.mod_*` field the Mixture-of-Depths block cannot honour."""
  if not (isinstance(mod_every, int) and not isinstance(mod_every, bool) and mod_every >= 1):
    raise ValueError(f"config.model.skip.mod_every={mod_every!r} must be an integer >= 1")
  for field, value, allowed in (("mod_causal", mod_causal, mod_lib.CAUSAL_RULES),
                                ("mod_eval", mod_eval, mod_lib.EVAL_RULES),
                                ("mod_weight", mod_weight, mod_lib.OUTPUT_WEIGHTS)):
    if value not in allowed:
      raise ValueError(f"config.model.skip.{field}={value!r} is not one of {list(allowed)}")
  if not (isinstance(mod_aux_weight, (int, float)) and math.isfinite(mod_aux_weight) and mod_aux_weight >= 0):
    raise ValueError(f"config.model.skip.mod_aux_weight={mod_aux_weight!r} must be a finite number >= 0")
  if router != "mod":
    return
  if granularity != "layer":
    raise ValueError(f"config.model.skip.router='mod' routes whole layers: config.model.skip.granularity="
                     f"{granularity!r} must be 'layer'")
  if norm != "pre":
    raise ValueError(f"config.model.skip.router='mod' needs config.model.norm='pre', got {norm!r}")
  if density_warmup_steps:
    raise ValueError("config.model.skip.density_warmup_steps > 0 does not apply to router='mod': its top-k "
                     "capacity ⌊P·T⌋ is static")
  if mod_every != 1 and (scan_layers or remat):
    raise ValueError(f"config.model.skip.mod_every={mod_every} needs scan_layers=False and remat=False "
                     "(a static layer index)")


LAYERDROP_SCHEDULES = ("constant", "linear", "exponential")
LAYERDROP_UNITS = ("example", "batch")


def _layerdrop_error(field: str, message: str) -> ValueError:
  return ValueError(f"config.model.layerdrop.{field}{message}")


def _check_rate(field: str, value) -> float:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1
  if not ok:
    raise _layerdrop_error(field, f"={value!r} must be a number in [0, 1)")
  return float(value)


@dataclasses.dataclass(frozen=True)
class LayerDropConfig:
  """LayerDrop (Fan et al. 2019 §3): each plan position is skipped (y = x) with probability p_l.

  p_l for position l of L: `constant` p; `linear` p·l/(L−1); `exponential` p·D(l),
  D(l) = exp(l·ln2/(L−1)) − 1 (LayerSkip, Elhoushi et al. 2024 §4.1: rates rise with depth,
  D(0) = 0, D(L−1) = 1; L = 1 gives p). `rates`: explicit comma-separated p_l, one per plan
  position (overrides `schedule`). `unit='example'`: one Bernoulli draw per sequence;
  `'batch'`: one per batch, and a dropped position is not computed (lax.cond).
  `at_inference`: also sample when deterministic (stochastic skipping at inference).
  """
  rate: float = 0.0               # p (LayerSkip's p_max)
  schedule: str = "constant"      # constant | linear | exponential
  rates: str = ""                 # explicit per-position rates '0,0.1,0.2'; '' = from schedule
  unit: str = "example"           # example | batch
  at_inference: bool = False

  def __post_init__(self):
    if not isinstance(self.rates, str):
      try:
        object.__setattr__(self, "rates", ",".join(repr(float(r)) for r in self.rates))
      except (TypeError, ValueError):
        raise _layerdrop_error("rates", f"={self.rates!r} must be comma-separated numbers") from None
    _check_rate("rate", self.rate)
    if self.schedule not in LAYERDROP_SCHEDULES:
      raise _layerdrop_error("schedule", f"={self.schedule!r} is not one of {list(LAYERDROP_SCHEDULES)}")
    if self.unit not in LAYERDROP_UNITS:
      raise _layerdrop_error("unit", f"={self.unit!r} is not one of {list(LAYERDROP_UNITS)}")
    if not isinstance(self.at_inference, bool):
      raise _layerdrop_error("at_inference", f"={self.at_inference!r} must be True or False")
    self.explicit_rates()

  def explicit_rates(self) -> Tuple[float, ...]:
    """The `rates` field parsed and range-checked; () when empty."""
    if not self.rates.strip():
      return ()
    out = []
    for item in self.rates.split(","):
      try:
        value = float(item)
      except ValueError:
        raise _layerdrop_error("rates", f"={self.rates!r}: {item.strip()!r} is not a number") from None
      out.append(_check_rate("rates", value))
    return tuple(out)

  def position_rates(self, num_positions: int) -> Tuple[float, ...]:
    """p_l for each of the plan's `num_positions` positions (all 0.0: LayerDrop off)."""
    explicit = self.explicit_rates()
    if explicit:
      if len(explicit) != num_positions:
        raise _layerdrop_error("rates", f"={self.rates!r} has {len(explicit)} rates, the plan has "
                               f"{num_positions} positions")
      return explicit
    last = max(num_positions - 1, 1)
    if self.schedule == "linear":
      depth = [l / last if num_positions > 1 else 1.0 for l in range(num_positions)]
    elif self.schedule == "exponential":
      depth = [math.exp(l * math.log(2) / last) - 1 if num_positions > 1 else 1.0 for l in range(num_positions)]
    else:
      depth = [1.0] * num_positions
    return tuple(self.rate * d for d in depth)


def _ffn_error(field: str, message: str) -> ValueError:
  return ValueError(f"config.model.ffn.{field}{message}")


def _whole(field: str, value, low: int) -> int:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or value != int(value) or value < low:
    raise _ffn_error(field, f"={value!r} must be a whole number >= {low}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """Structured FF sparsity options (Dong et al. 2023, "SS"), read by `layers.make_ffn`.

  The FFN's activation, width, gating and bias stay the flat model fields `activation`, `d_ff`,
  `mlp_gated`, `mlp_bias` (converters and saved configs use them). This sub-config adds:
  `expansion` F > 0: d_ff = F·d_model (overrides `d_ff`; SS uses F = 4, and F = 24 when tied);
  `tied`: all FF1s share one kernel and all FF2s one kernel, biases per layer (SS §3.1);
  `block_sparsity_weight` λ > 0: the block-sparsity regulariser of SS Eq. 3 over blocks of
  `block_size` B contiguous FF neurons, the first `exempt` E neurons exempt (§3.2), sown as an
  aux loss (`aux_loss/ffn_block_sparsity`).
  """
  expansion: int = 0              # F; 0: d_ff as given
  tied: bool = False
  block_sparsity_weight: float = 0.0  # λ
  block_size: int = 64            # B
  exempt: int = 0                 # E

  def __post_init__(self):
    object.__setattr__(self, "expansion", _whole("expansion", self.expansion, 0))
    if not isinstance(self.tied, bool):
      raise _ffn_error("tied", f"={self.tied!r} must be True or False")
    lam = self.block_sparsity_weight
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam >= 0):
      raise _ffn_error("block_sparsity_weight", f"={lam!r} must be a finite number >= 0")
    object.__setattr__(self, "block_sparsity_weight", float(lam))
    object.__setattr__(self, "block_size", _whole("block_size", self.block_size, 1))
    object.__setattr__(self, "exempt", _whole("exempt", self.exempt, 0))

  def hidden(self, d_model: int, d_ff: int) -> int:
    """The FFN width F·D: expansion·d_model when expansion is set, else d_ff."""
    return self.expansion * d_model if self.expansion else d_ff

  def check(self, hidden: int, router: str = "none", dispatch: str = "masked", batch_layerdrop: bool = False) -> None:
    """One-line ValueError naming the field for options the model cannot honour."""
    if self.block_sparsity_weight <= 0:
      return
    if self.exempt >= hidden or (hidden - self.exempt) % self.block_size:
      raise _ffn_error("block_size", f"={self.block_size} must tile the {hidden} FF neurons after the first "
                       f"exempt={self.exempt} (d_ff - exempt divisible by block_size)")
    if router != "none" and dispatch == "grouped":
      raise _ffn_error("block_sparsity_weight", f"={self.block_sparsity_weight} needs skip.dispatch 'masked' or "
                       "'capacity': 'grouped' runs the FFN inside lax.scan, where its aux loss cannot be sown")
    if batch_layerdrop:
      raise _ffn_error("block_sparsity_weight", f"={self.block_sparsity_weight} needs layerdrop.unit='example': "
                       "'batch' skips positions under lax.cond, which cannot sow the aux loss")

  @classmethod
  def from_dict(cls, ffn: Optional[Mapping[str, Any]]) -> "FFNConfig":
    """From the `config.model.ffn` ConfigDict / dict (None: defaults); unknown keys name the field."""
    if isinstance(ffn, FFNConfig):
      return ffn
    ffn = dict(ffn.to_dict() if hasattr(ffn, "to_dict") else (ffn or {}))
    known = {f.name for f in dataclasses.fields(cls)}
    for key in ffn:
      if key not in known:
        raise ValueError(f"config.model.ffn.{key} is not an ffn field; known: {sorted(known)}")
    return cls(**ffn)


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
  layerdrop: LayerDropConfig = LayerDropConfig()
  ffn: FFNConfig = FFNConfig()    # SS structured FF sparsity: expansion F, tied kernels, block regulariser
  # Execution plan (skipjax/depth/plan.py) in its string form, e.g. '0:3,5:8' or '0,1,2,2,3a';
  # '' is the identity plan. Given as a tuple of PlanEntry it is stored as its string form.
  plan: str = ""

  def __post_init__(self):
    if not isinstance(self.plan, str):
      object.__setattr__(self, "plan", plan_lib.to_string(plan_lib.resolve(self.plan, self.num_layers)))
    plan = self.execution_plan  # validates: one-line ValueError naming config.model.plan
    partial = [p for p, e in enumerate(plan) if not (e.attn and e.ffn)]
    if self.scan_layers and partial:
      raise ValueError(f"config.model.plan={self.plan!r} needs scan_layers=False: position {partial[0]} runs "
                       "only some branches, which one scan body cannot serve (convert params with "
                       "skipjax.models.layout.to_loop)")
    s = self.skip
    check_gate_semantics(self.norm, s.router, s.granularity, s.gate_form, s.router_bias_init, s.router_input)
    check_mod(self.norm, s.router, s.granularity, s.mod_every, s.mod_causal, s.mod_eval, s.mod_aux_weight,
              s.mod_weight, s.density_warmup_steps, self.scan_layers, self.remat)
    if isinstance(self.layerdrop, Mapping):
      object.__setattr__(self, "layerdrop", LayerDropConfig(**self.layerdrop))
    rates = self.layerdrop.position_rates(len(plan))  # validates the length of explicit rates
    if self.layerdrop.unit == "batch" and any(rates) and (self.skip.router != "none" or self.oracle_threshold):
      raise ValueError("config.model.layerdrop.unit='batch' needs a dense block (skip.router='none', "
                       "oracle_threshold=0): a position skipped under lax.cond cannot sow its gates")
    object.__setattr__(self, "ffn", FFNConfig.from_dict(self.ffn))
    object.__setattr__(self, "d_ff", self.ffn.hidden(self.d_model, self.d_ff))  # F·D when ffn.expansion is set
    self.ffn.check(self.d_ff, self.skip.router, self.skip.dispatch,
                   self.layerdrop.unit == "batch" and any(rates))

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
    layerdrop = dict(cfg.pop("layerdrop", {}) or {})
    if "ffn" in cfg:
      cfg["ffn"] = FFNConfig.from_dict(cfg["ffn"])  # (absent in configs written before it: defaults)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in cfg:
      if key not in known:
        raise ValueError(f"config.model.{key} is not a model field; known: {sorted(known)}")
    skip_known = {f.name for f in dataclasses.fields(SkipConfig)}
    for key in skip:
      if key not in skip_known:
        raise ValueError(f"config.model.skip.{key} is not a skip field; known: {sorted(skip_known)}")
    layerdrop_known = {f.name for f in dataclasses.fields(LayerDropConfig)}
    for key in layerdrop:
      if key not in layerdrop_known:
        raise ValueError(f"config.model.layerdrop.{key} is not a layerdrop field; known: {sorted(layerdrop_known)}")
    return cls(skip=SkipConfig(**skip), layerdrop=LayerDropConfig(**layerdrop), **cfg)
