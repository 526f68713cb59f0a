"""Up-front config validation: one-line errors that name the offending field."""
import math
import re

import numpy as np

from skipjax.depth import exits as exits_lib, plan as plan_lib
from skipjax.layers.mlp import ACTIVATIONS
from skipjax.models.config import DTYPES, FFNConfig, LayerDropConfig
from skipjax.models.config import check_gate_semantics, check_mod
from skipjax.routing.groups import check_group_size
from skipjax.train.sharding import mesh_shape

ROUTERS = ("gumbel", "top1", "sigmoid", "random", "none", "highway", "mod")
DISPATCHES = ("masked", "capacity", "grouped")
SOURCES = ("synthetic:", "text:", "tfds:")
MAX_LEARNING_RATE = 10.0  # far above any working rate (adamw ~1e-3, LtS adafactor 0.1)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _one_of(field: str, value, allowed) -> None:
  _require(value in allowed, f"config.{field}={value!r} is not one of {list(allowed)}")


def _finite(field: str, value) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  _require(ok, f"config.{field}={value!r} must be a finite number")


def _in_range(field: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
  _finite(field, value)
  ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  _require(ok, f"config.{field}={value} must be in {interval}")


def validate_model(m) -> None:
  _require(m.d_model >= 1, f"config.model.d_model={m.d_model} must be >= 1")
  _require(m.num_layers >= 1, f"config.model.num_layers={m.num_layers} must be >= 1")
  plan = plan_lib.parse(m.get("plan", ""), m.num_layers)  # one-line ValueError naming config.model.plan
  _require(not m.get("scan_layers", False) or plan_lib.is_identity(plan, m.num_layers),
           f"config.model.plan={m.get('plan')!r} needs scan_layers=False: scanned layers serve only the identity plan")
  layerdrop = dict(m.get("layerdrop", None) or {})
  for key in layerdrop:
    _require(key in LayerDropConfig.__dataclass_fields__, f"config.model.layerdrop.{key} is not a layerdrop field")
  LayerDropConfig(**layerdrop).position_rates(len(plan))  # one-line ValueError naming config.model.layerdrop.<field>
  _require(m.num_heads >= 1, f"config.model.num_heads={m.num_heads} must be >= 1")
  _require(bool(m.head_dim) or m.d_model % m.num_heads == 0,
           f"config.model.num_heads={m.num_heads} does not divide d_model={m.d_model}")
  _require(m.d_ff >= 1, f"config.model.d_ff={m.d_ff} must be >= 1")
  ffn = FFNConfig.from_dict(m.get("ffn", None))  # one-line ValueError naming config.model.ffn.<field>
  batch_drop = layerdrop.get("unit", "example") == "batch" and any(
      LayerDropConfig(**layerdrop).position_rates(len(plan)))
  ffn.check(ffn.hidden(m.d_model, m.d_ff), m.skip.router, m.skip.dispatch, batch_drop)
  _one_of("model.activation", m.activation, sorted(ACTIVATIONS))
  _one_of("model.norm", m.norm, ("pre", "post"))
  _one_of("model.post_ln_skip", m.get("post_ln_skip", "identity"), ("identity", "ln"))
  _one_of("model.position", m.position, ("learned", "sinusoidal", "rope", "none"))
  _one_of("model.norm_type", m.get("norm_type", "layernorm"), ("layernorm", "rmsnorm"))
  kv = m.get("num_kv_heads", 0)
  _require(kv >= 0 and (kv == 0 or m.num_heads % kv == 0),
           f"config.model.num_kv_heads={kv} must divide num_heads={m.num_heads} (0: num_heads)")
  _require(m.get("sliding_window", 0) >= 0, f"config.model.sliding_window={m.get('sliding_window')} must be >= 0")
  _require(m.position != "rope" or (m.head_dim or m.d_model // m.num_heads) % 2 == 0,
           "config.model.position='rope' needs an even head_dim")
  _one_of("model.dtype", m.dtype, sorted(DTYPES))
  _require(0.0 <= m.dropout_rate < 1.0, f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1)")
  s = m.skip
  _one_of("model.skip.router", s.router, ROUTERS)
  _one_of("model.skip.dispatch", s.dispatch, DISPATCHES)
  _one_of("model.skip.granularity", s.granularity, ("layer", "block", "ffn"))
  # gate_form / router_bias_init / router_input, and post-LN only with layer-granularity routers (issue 15 P8).
  check_gate_semantics(m.norm, s.router, s.granularity, s.get("gate_form", "paper"),
                       s.get("router_bias_init", "warmup"), s.get("router_input", "stream"))
  _require(0.0 < s.target_density <= 1.0,
           f"config.model.skip.target_density={s.target_density} must be in (0, 1]")
  _require(s.gsize >= 1, f"config.model.skip.gsize={s.gsize} must be >= 1")
  _require(s.capacity_factor > 0, f"config.model.skip.capacity_factor={s.capacity_factor} must be > 0")
  _require(s.temperature > 0, f"config.model.skip.temperature={s.temperature} must be > 0")
  _in_range("model.skip.aux_weight", s.aux_weight, 0.0, math.inf)
  warmup = s.get("density_warmup_steps", 0)
  _require(warmup >= 0, f"config.model.skip.density_warmup_steps={warmup} must be >= 0")
  _require(not (warmup and s.dispatch == "capacity"),
           "config.model.skip.density_warmup_steps > 0 needs dispatch 'masked' or 'grouped': 'capacity' "
           "sizes its static slots from the final P and would drop the warm-up's extra tokens")
  validate_mod(m)


def validate_mod(m) -> None:
  """Mixture-of-Depths fields (`skip.mod_*`, skipjax/routing/mod.py): the model config's own check."""
  s = m.skip
  check_mod(m.norm, s.router, s.granularity, s.get("mod_every", 1), s.get("mod_causal", "aux_loss"),
            s.get("mod_eval", "causal"), s.get("mod_aux_weight", 0.1), s.get("mod_weight", "linear"),
            s.get("density_warmup_steps", 0),
            m.get("scan_layers", False), m.get("remat", False))


def validate_data(d, model) -> None:
  _require(isinstance(d.source, str) and d.source.startswith(SOURCES),
           f"config.data.source={d.source!r} must start with synthetic:, text: or tfds:")
  _require(d.batch_size >= 1, f"config.data.batch_size={d.batch_size} must be >= 1")
  _require(d.seq_len >= 1, f"config.data.seq_len={d.seq_len} must be >= 1")
  _require(d.seq_len <= model.max_len,
           f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={model.max_len}")
  _one_of("data.tokenizer", d.tokenizer, ("byte", "bpe"))


def validate_train(t) -> None:
  _one_of("train.optimizer", t.optimizer, ("adamw", "adafactor"))
  for field in ("num_steps", "log_every_steps", "eval_every_steps", "eval_batches", "checkpoint_every_steps",
                "keep_checkpoints"):
    _require(t[field] >= 1, f"config.train.{field}={t[field]} must be >= 1")
  _require(t.warmup_steps >= 0, f"config.train.warmup_steps={t.warmup_steps} must be >= 0")
  _in_range("train.learning_rate", t.learning_rate, 0.0, MAX_LEARNING_RATE, lo_open=True, hi_open=False)
  _in_range("train.grad_clip", t.grad_clip, 0.0, math.inf)  # 0 = no clipping
  _in_range("train.weight_decay", t.weight_decay, 0.0, math.inf)
  _in_range("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, hi_open=False)
  _in_range("train.b1", t.b1, 0.0, 1.0)
  _in_range("train.b2", t.b2, 0.0, 1.0)
  _in_range("train.adafactor_decay", t.adafactor_decay, 0.0, 1.0, lo_open=True)
  _in_range("train.router_lr_multiplier", t.get("router_lr_multiplier", 1.0), 0.0, math.inf, lo_open=True)
  exits_lib.EarlyExitConfig.from_config(t.get("early_exit", None))  # one-line ValueError naming the field
  trainable = t.get("trainable", "")
  _require(isinstance(trainable, str), f"config.train.trainable={trainable!r} must be a regex string")
  try:
    re.compile(trainable)
  except re.error as e:
    raise ValueError(f"config.train.trainable={trainable!r} is not a valid regex ({e})") from None


def validate_mesh(config, num_devices: int) -> None:
  axes = tuple(config.mesh.axes)
  _require(axes == ("data", "model"), f"config.mesh.axes={axes} must be ('data', 'model')")
  shape = mesh_shape(config.mesh.shape, num_devices)
  _require(len(shape) == 2 and all(s >= 1 for s in shape) and int(np.prod(shape)) == num_devices,
           f"config.mesh.shape={tuple(config.mesh.shape)} does not fit the {num_devices} available devices")
  data, model = shape
  _require(config.data.batch_size % data == 0,
           f"config.data.batch_size={config.data.batch_size} is not divisible by the mesh data axis ({data})")
  m = config.model
  if m.skip.router != "none":  # each routing group on one data shard (skipjax/routing/groups.py)
    check_group_size(config.data.batch_size, config.data.seq_len, m.skip.get("group_size", 0), data)
  _require(m.num_heads % model == 0, f"config.model.num_heads={m.num_heads} is not divisible by the mesh model axis ({model})")
  d_ff = FFNConfig.from_dict(m.get("ffn", None)).hidden(m.d_model, m.d_ff)  # F·d_model with ffn.expansion
  _require(d_ff % model == 0, f"config.model.d_ff={d_ff} is not divisible by the mesh model axis ({model})")
  _require(m.vocab_size % model == 0,
           f"config.model.vocab_size={m.vocab_size} is not divisible by the mesh model axis ({model})")


def validate_early_exit(config) -> None:
  """`config.train.early_exit` against the model it trains (fields: validate_train)."""
  ee = exits_lib.EarlyExitConfig.from_config(config.train.get("early_exit", None))
  if not ee.enabled:
    return
  m = config.model
  model_type = m.get("model_type", "decoder")
  _require(model_type == "decoder", f"config.train.early_exit.enabled=True needs a decoder LM, "
           f"config.model.model_type={model_type!r}")
  num_positions = len(plan_lib.parse(m.get("plan", ""), m.num_layers))
  ee.check_positions(num_positions)
  _require(not m.get("remat", False), "config.train.early_exit.enabled=True needs config.model.remat=False: the "
           "exit states are read by intercepting each block, which nn.remat hides")
  layerdrop = m.get("layerdrop", None) or {}
  if any(LayerDropConfig(**dict(layerdrop)).position_rates(num_positions)):
    _require(layerdrop.get("unit", "example") == "example",
             "config.model.layerdrop.unit='batch' skips positions under nn.cond, where the early-exit states "
             "cannot be read: use unit='example' with config.train.early_exit")
    _require(not layerdrop.get("at_inference", False),
             "config.model.layerdrop.at_inference=True with config.train.early_exit: the per-exit eval loss "
             "needs every plan position to run")


def validate(config, num_devices: int) -> None:
  """Raise ValueError naming the first invalid field of a `configs/lm.py`-style config."""
  validate_model(config.model)
  validate_data(config.data, config.model)
  validate_train(config.train)
  validate_early_exit(config)
  init_from = config.get("init_from", "")
  _require(isinstance(init_from, str), f"config.init_from={init_from!r} must be a path string ('' = none)")
  validate_mesh(config, num_devices)
