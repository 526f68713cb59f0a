"""Early-exit predictions and the LayerSkip early-exit loss (issue 14, items 1 and 4).

`layer_outputs` runs a decoder once and applies the model's own shared head (final norm,
`project_out`, tied `embed.attend` or `lm_head`) to the hidden state after EVERY position of its
execution plan: the output of each `Block.__call__` is recorded (flax method interception) and
the last position returns all of them stacked along the batch axis, so the modules after the
blocks run on [P·B, T, d] and give [P·B, T, V] → [P, B, T, V]. Position l's logits are exactly the
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
"""
import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.models import layout
from skipjax.models.block import Block


class ExitOutputs(NamedTuple):
  """Per-exit-position outputs of one forward (P = number of plan positions).

  Attributes:
    logits: [P, B, T, V] float32, the shared head after each position (logits[-1] = the model's).
    hidden: [P + 1, B, T, d], hidden[0] the input of the first position, hidden[l + 1] the state
      after position l (un-normed, as CALM's hidden-state saturation reads it).
  """
  logits: jnp.ndarray
  hidden: jnp.ndarray


def exit_config(cfg: models.TransformerConfig) -> models.TransformerConfig:
  """The loop-layout (scan_layers=False, remat=False) config the exits run (same forward)."""
  if not isinstance(cfg, models.TransformerConfig):
    raise ValueError(f"early exits need a decoder LM (TransformerConfig), got {type(cfg).__name__}")
  if cfg.layerdrop.at_inference and any(cfg.layerdrop.position_rates(len(cfg.execution_plan))):
    raise ValueError("config.model.layerdrop.at_inference=True: early-exit logits need every plan position to run")
  return dataclasses.replace(cfg, scan_layers=False, remat=False)


def _loop_params(params) -> Mapping[str, Any]:
  return layout.to_loop(nn.meta.unbox(params))


def layer_outputs(cfg: models.TransformerConfig, params, inputs: jnp.ndarray,
                  positions: Optional[jnp.ndarray] = None) -> ExitOutputs:
  """Shared-head logits [P, B, T, V] and hidden states [P + 1, B, T, d] of a decoder.

  `params` in the loop or scan layout; `inputs` [B, T] int32. Deterministic (no dropout).
  """
  cfg = exit_config(cfg)
  num_positions = len(cfg.execution_plan)
  model = models.build(cfg)
  seen = []

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Block) and context.method_name == "__call__":
      if not seen:
        seen.append(args[0])                                                # [B, T, d] x_0
      seen.append(out)                                                      # [B, T, d] after position
      if len(seen) == num_positions + 1:
        # the last position hands every exit state to the head: [P·B, T, d]
        return jnp.concatenate(seen[1:], axis=0)
    return out

  with nn.intercept_methods(grab):
    logits = model.apply({"params": _loop_params(params)}, inputs, positions)  # [P·B, T, V]
  if len(seen) != num_positions + 1:
    raise ValueError(f"config.model.plan={cfg.plan!r}: saw {len(seen) - 1} block calls for {num_positions} "
                     "plan positions")
  batch = inputs.shape[0]
  logits = logits.reshape((num_positions, batch) + logits.shape[1:])        # [P, B, T, V]
  return ExitOutputs(logits, jnp.stack(seen))                               # hidden [P+1, B, T, d]


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


def per_layer_ce(cfg: models.TransformerConfig, params, batch: Mapping[str, Any]) -> jnp.ndarray:
  """Mean next-token cross-entropy of every exit position [P] (token weights: batch['weights'] if given)."""
  logits = layer_logits(cfg, params, batch)                                 # [P, B, T, V]
  targets = jnp.asarray(batch["targets"], jnp.int32)                        # [B, T]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)            # [P, B, T, V]
  nll = -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]  # [P, B, T]
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
