"""Early-exit predictions and the LayerSkip early-exit loss (issue 14, items 1 and 4).

`layer_outputs` runs a decoder once and applies the model's own shared head (final norm,
`project_out`, tied `embed.attend` or `lm_head`) to the hidden state after EVERY position of its
execution plan: the input of each `Block.__call__` (the state after the previous position) and
the input of the head are recorded (flax method interception), and the head's first module gets
all of them stacked along the batch axis, so the head runs on [P·B, T, d] and gives
[P·B, T, V] → [P, B, T, V]. Position l's logits are exactly the
logits of the model truncated to the first l + 1 plan positions (the early-exit prediction of
LayerSkip §4.2 / CALM §3: exit after layer l through the shared head). Differentiable and
jittable; one forward of the blocks plus P applications of the head.

`early_exit_loss` is LayerSkip's (Elhoushi et al. 2024, §4.2) loss

    J = Σ_{l=0}^{L−1} ẽ(t, l) · J_CE(g(x_{l+1}), Y),    ẽ(t, l) = C(t, l) e(l) / Σ_i C(t, i) e(i),

with g the shared head, x_{l+1} the state after position l and the per-layer scale

    e(l) = e_scale · Σ_{i=0}^{l} i              for 0 ≤ l < L − 1,
    e(L − 1) = L − 1 + e_scale · Σ_{i=0}^{L−2} i

(`layerskip_scales`; C(t, l) ∈ {0, 1} is the curriculum, here an optional mask). Any other
per-layer weights can be passed instead; they are used as given (not renormalised).

Training (`config.train.early_exit`, `EarlyExitConfig`): the train step takes this loss, with
ẽ(t, ·) from `EarlyExitConfig.loss_weights` at the optimizer step t, in one forward of the blocks
(`layer_outputs(..., deterministic=False)`: dropout, gates and LayerDrop as in plain training).
"""
import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.models import layout, stack
from skipjax.models.block import Block


class ExitOutputs(NamedTuple):
  """Per-exit-position outputs of one forward (P = number of plan positions).

  Attributes:
    logits: [P, B, T, V] float32, the shared head after each position (logits[-1] = the model's).
    hidden: [P + 1, B, T, d], hidden[0] the input of the first position, hidden[l + 1] the state
      after position l (un-normed, as CALM's hidden-state saturation reads it; in training with
      LayerDrop, after the position's y = x where it was dropped).
  """
  logits: jnp.ndarray
  hidden: jnp.ndarray


def _layerdrop_active(cfg: models.TransformerConfig, deterministic: bool) -> bool:
  """Whether an apply with this `deterministic` draws LayerDrop decisions (stack.layerdrop_keep)."""
  ld = cfg.layerdrop
  return any(ld.position_rates(len(cfg.execution_plan))) and (not deterministic or ld.at_inference)


def exit_config(cfg: models.TransformerConfig, deterministic: bool = True) -> models.TransformerConfig:
  """The loop-layout (scan_layers=False, remat=False) config the exits run (same forward).

  `deterministic=False` (training: dropout and LayerDrop on) refuses LayerDrop with unit='batch',
  whose dropped positions run under `nn.cond`, where the Block interception cannot see.
  """
  if not isinstance(cfg, models.TransformerConfig):
    raise ValueError(f"early exits need a decoder LM (TransformerConfig), got {type(cfg).__name__}")
  if deterministic and cfg.layerdrop.at_inference and any(cfg.layerdrop.position_rates(len(cfg.execution_plan))):
    raise ValueError("config.model.layerdrop.at_inference=True: early-exit logits need every plan position to run")
  if _layerdrop_active(cfg, deterministic) and cfg.layerdrop.unit == "batch":
    raise ValueError("config.model.layerdrop.unit='batch' skips positions under nn.cond, where the early-exit "
                     "states cannot be read: use unit='example' with early exits")
  return dataclasses.replace(cfg, scan_layers=False, remat=False)


def _loop_params(params) -> Mapping[str, Any]:
  return layout.to_loop(nn.meta.unbox(params))


def layer_outputs(cfg: models.TransformerConfig, params, inputs: jnp.ndarray,
                  positions: Optional[jnp.ndarray] = None, *, deterministic: bool = True,
                  rngs: Optional[Mapping[str, jax.Array]] = None, mutable: Union[bool, Sequence[str]] = False,
                  density: Optional[jnp.ndarray] = None):
  """Shared-head logits [P, B, T, V] and hidden states [P + 1, B, T, d] of a decoder.

  `params` in the loop or scan layout (scan params are split into the loop layout, differentiably:
  gradients come back in the scan layout); `inputs` [B, T] int32. `deterministic`, `rngs`,
  `density` as for `Transformer.apply` (training: dropout, gates and LayerDrop with
  unit='example' draw as in the plain forward). With `mutable` (collections, e.g. ['gates',
  'aux_loss']) returns (ExitOutputs, mutated variables), as `apply` does.

  The state after position p is the input of position p + 1 (after LayerDrop's y = x where the
  position was dropped) and, after the last position, the input of the first module of the head;
  that call gets all P states stacked along the batch axis.
  """
  cfg = exit_config(cfg, deterministic)
  num_positions = len(cfg.execution_plan)
  # Under LayerDrop a post-LN model with post_ln_skip='ln' calls each Block twice (run, skip).
  calls_per_position = 2 if _layerdrop_active(cfg, deterministic) and stack.skip_runs_norms(cfg) else 1
  total_calls = num_positions * calls_per_position
  model = models.build(cfg)
  states = []                    # x_p, the input of position p, then the final state
  count = {"calls": 0, "depth": 0}

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, Block) and context.method_name == "__call__":
      if count["depth"] == 0:
        if count["calls"] % calls_per_position == 0:
          states.append(args[0])                                           # [B, T, d]
        count["calls"] += 1
      count["depth"] += 1
      try:
        return next_fun(*args, **kwargs)
      finally:
        count["depth"] -= 1
    if count["depth"] == 0 and count["calls"] == total_calls and len(states) == num_positions and args:
      # the first module after the blocks (final norm / project_out / LM head) gets every exit state
      states.append(args[0])                                               # [B, T, d] the model's state
      return next_fun(jnp.concatenate(states[1:], axis=0), *args[1:], **kwargs)  # [P·B, T, d]
    return next_fun(*args, **kwargs)

  variables = {"params": _loop_params(params)}
  with nn.intercept_methods(grab):
    out = model.apply(variables, inputs, positions, deterministic=deterministic, density=density,
                      rngs=rngs, mutable=mutable)
  logits, mutated = out if mutable else (out, None)                         # [P·B, T, V]
  if count["calls"] != total_calls or len(states) != num_positions + 1:
    raise ValueError(f"config.model.plan={cfg.plan!r}: saw {count['calls']} block calls for {num_positions} "
                     "plan positions")
  batch = inputs.shape[0]
  logits = logits.reshape((num_positions, batch) + logits.shape[1:])        # [P, B, T, V]
  outputs = ExitOutputs(logits, jnp.stack(states))                          # hidden [P+1, B, T, d]
  return (outputs, mutated) if mutable else outputs


def layer_logits(cfg: models.TransformerConfig, params, batch: Mapping[str, Any]) -> jnp.ndarray:
  """[P, B, T, V]: the shared head (final norm + LM head) after every plan position of `batch['inputs']`."""
  return layer_outputs(cfg, params, jnp.asarray(batch["inputs"], jnp.int32), batch.get("positions")).logits


def layerskip_scales(num_layers: int, e_scale: float = 1.0, curriculum: Optional[Sequence[float]] = None
                     ) -> np.ndarray:
  """LayerSkip §4.2 normalised per-layer loss scales ẽ(t, l) [L] (sum to 1).

  e(l) = e_scale·Σ_{i≤l} i = e_scale·l(l+1)/2 for l < L − 1, e(L−1) = L − 1 + e_scale·(L−2)(L−1)/2;
  `curriculum` C(t, ·) [L] ∈ {0, 1} enables layers at step t (None: all).
  """
  if num_layers < 1:
    raise ValueError(f"early-exit loss num_layers={num_layers}: must be ≥ 1")
  if e_scale < 0:
    raise ValueError(f"early-exit loss e_scale={e_scale}: must be ≥ 0")
  l = np.arange(num_layers, dtype=np.float64)
  e = e_scale * l * (l + 1) / 2                                             # [L]
  e[-1] = (num_layers - 1) + e_scale * (num_layers - 2) * (num_layers - 1) / 2
  if curriculum is not None:
    c = np.asarray(curriculum, np.float64)
    if c.shape != (num_layers,):
      raise ValueError(f"early-exit loss curriculum has shape {c.shape}, expected ({num_layers},)")
    e = e * c
  total = e.sum()
  if total <= 0:
    # L = 1, or e_scale = 0 with the last layer off: nothing weighted; fall back to the last layer
    e = np.zeros(num_layers)
    e[-1] = 1.0
    total = 1.0
  return e / total


def exit_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """−log p(target) of every exit, [P, B, T] float32, from logits [P, B, T, V] and targets [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)            # [P, B, T, V]
  targets = jnp.asarray(targets, jnp.int32)
  return -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]  # [P, B, T]


def per_layer_ce(cfg: models.TransformerConfig, params, batch: Mapping[str, Any]) -> jnp.ndarray:
  """Mean next-token cross-entropy of every exit position [P] (token weights: batch['weights'] if given)."""
  logits = layer_logits(cfg, params, batch)                                 # [P, B, T, V]
  targets = jnp.asarray(batch["targets"], jnp.int32)                        # [B, T]
  nll = exit_nll(logits, targets)                                           # [P, B, T]
  w = jnp.asarray(batch["weights"], jnp.float32) if "weights" in batch else jnp.ones(targets.shape, jnp.float32)
  return jnp.sum(nll * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w), 1e-12)     # [P]


def early_exit_loss(cfg: models.TransformerConfig, params, batch: Mapping[str, Any], weights) -> jnp.ndarray:
  """LayerSkip §4.2: Σ_l w_l · CE_l over the plan's exit positions, CE_l through the shared head.

  `weights` [P] (e.g. `layerskip_scales(P, e_scale)`); a scalar loss, differentiable in `params`.
  """
  ce = per_layer_ce(cfg, params, batch)                                     # [P]
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != ce.shape:
    raise ValueError(f"early-exit loss weights have shape {w.shape}, expected ({ce.shape[0]},) (one per plan position)")
  return jnp.sum(w * ce)


# -- early-exit training (config.train.early_exit) ---------------------------------------------

EARLY_EXIT_FIELD = "config.train.early_exit"
EARLY_EXIT_WEIGHTS = ("layerskip", "uniform", "last")
EARLY_EXIT_CURRICULA = ("none", "rotational", "gradual")


def _ee_error(field: str, message: str) -> ValueError:
  return ValueError(f"{EARLY_EXIT_FIELD}.{field}{message}")


def _positive_int(field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise _ee_error(field, f"={value!r} must be an integer >= 1")
  return int(value)


@dataclasses.dataclass(frozen=True)
class EarlyExitConfig:
  """LayerSkip early-exit training (Elhoushi et al. 2024 §4.2) as an option of the train step.

  With `enabled`, the loss is Σ_l ẽ(t, l)·CE_l over the plan's P positions, CE_l the
  cross-entropy of the shared head after position l, and ẽ(t, l) = C(t, l)·e(l) / Σ_i C(t, i)·e(i)
  at optimizer step t (0 for the first update) of T = config.train.num_steps:

    e(l)      `weights`: 'layerskip' — LayerSkip's scale (`layerskip_scales`, with `e_scale`);
              'uniform' — 1; 'last' — 1 at l = P − 1 only (plain training, every exit still
              measured); or explicit non-negative numbers, one per position (comma-separated
              string or a sequence; the last > 0).
    C(t, l)   = E(l) · K(t, l), or 1 at l = P − 1 (the last position always has its loss), with
              E(l) = 1 iff (l + 1) mod `every` = 0 (an exit after every k-th position), and the
              curriculum K (from the paper's description, not checked against the text):
              'none'        K = 1;
              'rotational'  C_rot,R: K(t, l) = 1 iff (l − t) mod R = 0, R = `rotation` — every
                            R-th position is on and the set moves up by one position each step,
                            so each position is on once every R steps;
              'gradual'     C_grad: K(t, l) = 1 iff t ≥ ⌊(P − 1 − l)·T / (2P)⌋ — enabled from
                            the last position towards the first, one more every T/(2P) steps,
                            all on from step ⌊(P − 1)·T/(2P)⌋ < T/2.
  """
  enabled: bool = False
  weights: Union[str, Tuple[float, ...]] = "layerskip"
  e_scale: float = 1.0
  curriculum: str = "none"
  rotation: int = 2
  every: int = 1

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise _ee_error("enabled", f"={self.enabled!r} must be True or False")
    object.__setattr__(self, "weights", self._parse_weights(self.weights))
    e = self.e_scale
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not np.isfinite(e) or e < 0:
      raise _ee_error("e_scale", f"={e!r} must be a finite number >= 0")
    if self.curriculum not in EARLY_EXIT_CURRICULA:
      raise _ee_error("curriculum", f"={self.curriculum!r} is not one of {list(EARLY_EXIT_CURRICULA)}")
    _positive_int("rotation", self.rotation)
    _positive_int("every", self.every)

  @staticmethod
  def _parse_weights(weights) -> Union[str, Tuple[float, ...]]:
    if isinstance(weights, str) and weights.strip() in EARLY_EXIT_WEIGHTS:
      return weights.strip()
    items = weights.split(",") if isinstance(weights, str) else weights
    try:
      values = tuple(float(w) for w in items)
    except (TypeError, ValueError):
      raise _ee_error("weights", f"={weights!r} is not one of {list(EARLY_EXIT_WEIGHTS)} nor comma-separated "
                      "numbers") from None
    if not values or not all(np.isfinite(v) and v >= 0 for v in values) or values[-1] <= 0:
      raise _ee_error("weights", f"={weights!r}: explicit weights must be finite, >= 0, with the last > 0")
    return values

  @classmethod
  def from_config(cls, block) -> "EarlyExitConfig":
    """From the `config.train.early_exit` ConfigDict / dict (None: disabled); unknown keys are an error."""
    fields = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
    known = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
      if key not in known:
        raise _ee_error(key, f" is not an early_exit field; known: {sorted(known)}")
    return cls(**fields)

  def check_positions(self, num_positions: int) -> None:
    """Explicit weights must have one entry per plan position."""
    if isinstance(self.weights, tuple) and len(self.weights) != num_positions:
      raise _ee_error("weights", f"={','.join(repr(w) for w in self.weights)!r} has {len(self.weights)} weights, "
                      f"the plan has {num_positions} positions")

  def scales(self, num_positions: int) -> np.ndarray:
    """e(l) [P] before the curriculum (any positive scale; ẽ is normalised)."""
    self.check_positions(num_positions)
    if isinstance(self.weights, tuple):
      return np.asarray(self.weights, np.float64)
    if self.weights == "uniform":
      return np.ones(num_positions)
    if self.weights == "last":
      return np.eye(num_positions)[-1]
    return layerskip_scales(num_positions, self.e_scale)

  def enabled_mask(self, step, num_positions: int, num_steps: int) -> jnp.ndarray:
    """C(t, ·) [P] bool at optimizer step `step` (a traced int is fine: no recompiles)."""
    l = np.arange(num_positions)                                            # [P]
    t = jnp.asarray(step, jnp.int32)
    if self.curriculum == "rotational":
      on = (jnp.asarray(l) - t) % self.rotation == 0                        # [P]
    elif self.curriculum == "gradual":
      start = (num_positions - 1 - l) * num_steps // (2 * num_positions)   # [P] first step of position l
      on = t >= jnp.asarray(start, jnp.int32)
    else:
      on = jnp.ones(num_positions, bool)
    exits = jnp.asarray((l + 1) % self.every == 0)                          # [P] E(l)
    return (on & exits) | jnp.asarray(l == num_positions - 1)

  def loss_weights(self, step, num_positions: int, num_steps: int) -> jnp.ndarray:
    """ẽ(t, ·) [P] float32, summing to 1 (the last position is always on with e > 0)."""
    e = jnp.asarray(self.scales(num_positions), jnp.float32)                # [P]
    w = jnp.where(self.enabled_mask(step, num_positions, num_steps), e, 0.0)
    return w / jnp.sum(w)
