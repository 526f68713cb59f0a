"""Applied residual-ratio oracles (RR §4.3–4.4, future work of §5) and the forward helpers every
oracle shares.

Applied mode really skips R(x) where ‖R(x)‖/‖x‖ < threshold (`TransformerConfig.oracle_threshold`),
so later blocks see the change; its cost is the perplexity (decoders) or the drift of the last
hidden state (encoders) against the fraction of blocks skipped. The simulated decisions (from
the dense run's ratios, as in the paper) can be forced through the Block's `gate_override`
collection for comparison: same decisions, but made without seeing the changed inputs.

A "batch" is a dict: decoders {'inputs', 'targets'} token ids [B, T]; BERT {'inputs',
'attention_mask'}; ViT {'inputs': pixels NHWC}.
"""
import dataclasses
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.models import layout
from skipjax.profile.oracle import oracle_keep
from skipjax.profile.ratios import BRANCHES

Overrides = Dict[str, Dict[str, jnp.ndarray]]


def is_decoder(cfg) -> bool:
  return isinstance(cfg, models.TransformerConfig)


def num_layers(cfg) -> int:
  return cfg.num_layers


def _with_blocks(cfg, **fields):
  """The config with the Block fields replaced (decoders, or an encoder's `transformer`)."""
  if is_decoder(cfg):
    return dataclasses.replace(cfg, **fields)
  return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, **fields))


def with_threshold(cfg, threshold: float):
  """The config with the applied oracle at `threshold` (0 = off)."""
  return _with_blocks(cfg, oracle_threshold=float(threshold))


POST_LN_SKIPS = ("identity", "ln")


def with_post_ln_skip(cfg, rule: str):
  """The config whose skipped post-LN blocks give y = x ('identity') or y = LN(x) ('ln': RR §3,
  "only the skip connection is active" into the addition node, which the LN follows).
  Pre-LN blocks give y = x either way."""
  if rule not in POST_LN_SKIPS:
    raise ValueError(f"config.post_ln_skip={rule!r} is not one of {POST_LN_SKIPS}")
  return _with_blocks(cfg, post_ln_skip=rule)


def forward(model: nn.Module, params, batch: Dict[str, Any], overrides: Optional[Overrides] = None,
            mutable: Sequence[str] = ()):
  """`model.apply` on a batch, with optional `gate_override` masks; returns (output, state)."""
  variables = {"params": params}
  if overrides:
    scan = isinstance(model.config, models.TransformerConfig) and model.config.scan_layers
    variables["gate_override"] = layout.to_layout(overrides, scan)
  # By keyword: the decoder's second positional argument is `positions`, the encoder's the mask.
  kwargs = {k: batch[k] for k in ("attention_mask", "positions") if k in batch}
  if mutable:
    return model.apply(variables, batch["inputs"], mutable=list(mutable), **kwargs)
  return model.apply(variables, batch["inputs"], **kwargs), {}


def token_losses(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Next-token cross entropy −log p(target) per token → [B, T] (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def hidden_drift(hidden: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
  """Relative L2 change of the last hidden state per token, ‖h − h_dense‖/‖h_dense‖ → [B, T]."""
  diff = jnp.linalg.norm((hidden - reference).astype(jnp.float32), axis=-1)
  return diff / jnp.maximum(jnp.linalg.norm(reference.astype(jnp.float32), axis=-1), 1e-12)


def valid_tokens(batch: Dict[str, Any]) -> np.ndarray:
  """[B, T] bool of real tokens (all for packed text and images)."""
  if "attention_mask" in batch:
    return np.asarray(batch["attention_mask"]).astype(bool)
  if "targets" in batch:
    return np.ones(np.shape(batch["targets"]), bool)
  return None


def overrides_from_keep(keep: np.ndarray) -> Overrides:
  """[L, 2, B, T] bool keep decisions → the `gate_override` collection {'block_i': {'attn', 'ffn'}}."""
  stacked = {name: jnp.asarray(keep[:, b], jnp.float32) for b, name in enumerate(BRANCHES)}  # [L, B, T]
  return layout.to_loop({layout.SCAN_KEY: {layout.SCAN_BLOCK: stacked}})


def masks_from_gates(gates: Dict[str, Any], layers: int) -> np.ndarray:
  """Sown `gates/{attn,ffn}_mask` → keep [L, 2, B, T] float."""
  keep = np.stack([np.asarray(layout.per_layer(gates, f"{name}_mask")) for name in BRANCHES], axis=1)
  return keep[:layers]


def cost(cfg, output: jnp.ndarray, batch: Dict[str, Any], dense_output: Optional[jnp.ndarray]) -> Dict[str, float]:
  """Decoders: mean loss and perplexity; encoders: mean hidden-state drift vs the dense output."""
  valid = valid_tokens(batch)
  if is_decoder(cfg):
    losses = np.asarray(token_losses(output, jnp.asarray(batch["targets"])))
    loss = float(losses[valid].mean())
    return {"loss": loss, "perplexity": float(np.exp(loss))}
  drift = np.asarray(hidden_drift(output, dense_output))
  return {"drift": float(drift[valid].mean() if valid is not None else drift.mean())}


def _skipped_fraction(keep: np.ndarray, valid: Optional[np.ndarray]) -> float:
  keep = np.asarray(keep, bool)
  return float(1.0 - (keep[..., valid] if valid is not None else keep).mean())


def applied_oracle(cfg, params, batch: Dict[str, Any], thresholds: Sequence[float],
                   dense_ratios: Optional[np.ndarray] = None, jit: bool = True) -> Dict[str, Any]:
  """RR §4.4 applied mode vs the simulated mode for every threshold.

  For each t: the model rebuilt with `oracle_threshold=t` (blocks skip where their ratio on the
  *actual* input is < t), its cost (perplexity / drift, see `cost`) and fraction of blocks
  skipped; and the simulated decisions from `dense_ratios` (RR §4.3) with their skipped fraction
  and the cost when forced through `gate_override`.
  """
  layers = num_layers(cfg)
  valid = valid_tokens(batch)
  dense_model = models.build(cfg)
  dense_out, _ = (jax.jit(lambda p, b: forward(dense_model, p, b)) if jit else
                  (lambda p, b: forward(dense_model, p, b)))(params, batch)
  dense_cost = cost(cfg, dense_out, batch, dense_out)
  rows = []
  for t in thresholds:
    model = models.build(with_threshold(cfg, t))
    fn = (lambda p, b, m=model: forward(m, p, b, None, ("gates",)))
    out, state = (jax.jit(fn) if jit else fn)(params, batch)
    row = {"threshold": float(t), "applied": {**cost(cfg, out, batch, dense_out)}}
    row["applied"]["skipped_fraction"] = (_skipped_fraction(masks_from_gates(state["gates"], layers), valid)
                                          if t > 0 else 0.0)
    if dense_ratios is not None:
      keep = oracle_keep(dense_ratios, t)
      sim_fn = lambda p, b, ov: forward(dense_model, p, b, ov)
      sim_out, _ = (jax.jit(sim_fn) if jit else sim_fn)(params, batch, overrides_from_keep(keep))
      row["simulated"] = {**cost(cfg, sim_out, batch, dense_out), "skipped_fraction": _skipped_fraction(keep, valid)}
    rows.append(row)
  return {"dense": dense_cost, "curve": rows}
