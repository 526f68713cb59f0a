"""Mixture-of-Depths routing (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
compute in transformer-based language models"), from the paper's definitions.

Facts of the paper used here:
  * Router: per routed block a scalar router weight r_i = w_θᵀ x_i for every token i of the
    block's input stream (a linear projection, no bias).
  * Expert-choice top-k: per sequence the block processes the C tokens with the largest r
    (r above the β-th percentile of the sequence's router weights, β = 1 − C/T); capacity
    C = ⌊P·T⌋. The paper's best configuration: P = 12.5 %, routing every other block.
  * Output (MoD Eq. 1): x_i' = x_i + r_i·f_i(x̃) if token i is among the top-k, else x_i: the
    router weight multiplies the block's output f (attention + MLP residual), which is how the
    router receives the language-modelling gradient.
  * Sampling: top-k over the sequence is non-causal (a token's membership depends on future
    tokens). Two remedies: (a) an auxiliary binary cross-entropy loss whose logits are the
    router's own outputs and whose targets are the top-k membership; a token is routed at
    sampling time where σ(r) > 0.5 (r > 0); (b) a small auxiliary MLP predictor that reads the
    router's input through a stop-gradient and is trained with BCE to predict top-k membership;
    routed where its prediction σ(p) > 0.5. The paper reports 97–99 % accuracy for both.

What is ours (not in the paper): `output_weight(r, 'sigmoid')`, σ(r) in place of r in Eq. 1 (a
bounded multiplier; `skip.mod_weight`). For a padded sequence of n real tokens the row capacity is
min(n, max(1, ⌊P·n⌋)) and padding is never selected (so a sequence routes the same tokens
alone or in a padded batch); C ≥ 1 when P·T < 1.

Pure functions on arrays and two small linen modules; no model knowledge (the block is in
`skipjax/models/block.py`, the gather/scatter in `dispatch.topk_dispatch`).
"""
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipjax.routing.dispatch import topk_indices

Array = jnp.ndarray

CAUSAL_RULES = ("aux_loss", "predictor")
# What multiplies the routed block's output: the router weight r itself (MoD Eq. 1) or σ(r) (ours).
OUTPUT_WEIGHTS = ("linear", "sigmoid")
EVAL_RULES = ("causal", "topk")


def capacity(seq_len: int, target_density: float) -> int:
  """MoD capacity C = ⌊P·T⌋ tokens per sequence (static), within [1, T]."""
  c = math.floor(target_density * seq_len + 1e-9)
  return int(min(max(c, 1), seq_len))


def row_capacity(valid: Array, target_density: float) -> Array:
  """Per-row capacity [G] int32 of a padded batch: min(n, max(1, ⌊P·n⌋)), n = real tokens of the row."""
  n = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [G]
  c = jnp.floor(target_density * n.astype(jnp.float32) + 1e-6).astype(jnp.int32)
  return jnp.minimum(n, jnp.maximum(c, 1))


def topk_mask(scores: Array, num_slots: int, valid: Optional[Array] = None,
              row_slots: Optional[Array] = None) -> Array:
  """Expert-choice membership [G, S] float32 (no gradient): 1 for the top-`num_slots` scores of
  each row (MoD: r above the β-th percentile), padding (`valid` = 0) never selected; with
  `row_slots` [G] only the top row_slots[g] of row g."""
  idx, ok = topk_indices(scores, num_slots, valid, row_slots)  # [G, C] each
  rows = jnp.arange(scores.shape[0])[:, None]
  mask = jnp.zeros(scores.shape, jnp.float32).at[rows, idx].max(ok.astype(jnp.float32))
  return jax.lax.stop_gradient(mask)


def causal_decision(logits: Array) -> Array:
  """MoD sampling rule: routed where σ(logit) > 0.5, i.e. logit > 0 ({0., 1.}, no gradient)."""
  return jax.lax.stop_gradient((logits > 0).astype(jnp.float32))


def _token_weights(like: Array, valid: Optional[Array]) -> Array:
  return jnp.ones(like.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)


def bce_loss(logits: Array, targets: Array, valid: Optional[Array] = None) -> Array:
  """Binary cross-entropy of top-k membership (MoD sampling, both remedies), mean over valid tokens:
  −mean[t·log σ(z) + (1 − t)·log(1 − σ(z))]; `targets` carry no gradient."""
  z = logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(targets).astype(jnp.float32)
  w = _token_weights(z, valid)
  per_token = -(t * jax.nn.log_sigmoid(z) + (1.0 - t) * jax.nn.log_sigmoid(-z))
  return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1.0)


def agreement(logits: Array, targets: Array, valid: Optional[Array] = None) -> Array:
  """Fraction of valid tokens where the causal rule (logit > 0) equals top-k membership (the
  accuracy the paper reports for its sampling remedies)."""
  hit = (causal_decision(logits) == jax.lax.stop_gradient(targets).astype(jnp.float32)).astype(jnp.float32)
  w = _token_weights(hit, valid)
  return jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1.0)


def output_weight(r: Array, kind: str = "linear") -> Array:
  """The factor of a routed token's block output: r (MoD Eq. 1, `linear`) or σ(r) (`sigmoid`, not in
  the paper: bounded in (0, 1), as a gate; top-k and the causal rule still read r, σ being monotone)."""
  return jax.nn.sigmoid(r) if kind == "sigmoid" else r


def mod_output(x: Array, residual: Array, weight: Array, mask: Array) -> Array:
  """MoD Eq. 1: y = x + m·r·f(x̃), with f the block's residual (F(x) − x for a whole layer),
  r [...] the router weight (gradient flows through it) and m [...] the routing mask (no gradient)."""
  on = jax.lax.stop_gradient(mask).astype(jnp.float32) * weight.astype(jnp.float32)  # [...]
  dtype = jnp.result_type(x.dtype, residual.dtype)
  return x + on[..., None].astype(dtype) * residual


class MoDRouter(nn.Module):
  """MoD router: r = w_θᵀ x, one scalar per token, w_θ ∈ R^d (kernel [d, 1], axes ('embed', None)).

  `kernel_init`: small, so routed blocks start with a small weight r (the block's residual is
  scaled by r from the first step, as in the paper's definition).
  """
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [..., d] -> r [...] float32."""
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                        (x.shape[-1], 1), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))[..., 0].astype(jnp.float32)


class MoDPredictor(nn.Module):
  """MoD's auxiliary predictor of top-k membership: a small MLP on stop_gradient(x) (the router's
  input) -> one logit per token; trained only by its BCE, so it does not touch the LM objective.

  `hidden`: width of its one hidden layer (0: max(16, d // 8)).
  """
  hidden: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [..., d] -> logits [...] float32."""
    x = jax.lax.stop_gradient(x).astype(self.dtype)
    hidden = self.hidden or max(16, x.shape[-1] // 8)
    init = nn.initializers.lecun_normal()
    h = nn.Dense(hidden, dtype=self.dtype, name="hidden",
                 kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(x)
    h = nn.gelu(h)
    out = nn.Dense(1, dtype=self.dtype, name="out",
                   kernel_init=nn.with_logical_partitioning(init, (None, None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(h)
    return out[..., 0].astype(jnp.float32)
