"""Router capacity (LtS §2.1): per-layer routed fractions, the auxiliary loss, compute accounting.

r_i, the capacity of layer i, is the fraction of tokens whose mask is 1. Its forward value is the
true fraction of the hard mask (as the paper computes it); its gradient is that of the expected
fraction mean(probs) (straight-through): r_i = r_hard + r_soft − sg(r_soft), exact forward.
"""
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from skipjax.routing.routers import straight_through

Array = jnp.ndarray
PerLayer = Union[Array, Sequence[Array]]


def _weighted_mean(values: Array, weights: Optional[Array]) -> Array:
  """Mean of `values` over all its axes, weighted by `weights` (broadcast; e.g. a padding mask)."""
  values = values.astype(jnp.float32)
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def _layers(per_layer: PerLayer) -> Sequence[Array]:
  """A list of per-layer arrays from a list/tuple, or from an array stacked on axis 0."""
  if isinstance(per_layer, (list, tuple)):
    return list(per_layer)
  per_layer = jnp.asarray(per_layer)
  return [per_layer[i] for i in range(per_layer.shape[0])]


def routed_fraction(probs: Array, mask: Array, token_weights: Optional[Array] = None) -> Array:
  """LtS §2.1 r = Σ M / (B·T) for one layer: forward the hard fraction, gradient of mean(probs)."""
  r_hard = _weighted_mean(jax.lax.stop_gradient(mask), token_weights)
  r_soft = _weighted_mean(probs, token_weights)
  return straight_through(r_hard, r_soft)


def routed_fractions(probs_per_layer: PerLayer, mask_per_layer: PerLayer,
                     token_weights: Optional[Array] = None) -> Array:
  """LtS §2.1 capacities r_i for every layer, shape [L] (see `routed_fraction`)."""
  probs, masks = _layers(probs_per_layer), _layers(mask_per_layer)
  if len(probs) != len(masks):
    raise ValueError(f"{len(probs)} probs vs {len(masks)} masks")
  return jnp.stack([routed_fraction(p, m, token_weights) for p, m in zip(probs, masks)])


def capacity_loss(probs_per_layer: PerLayer, mask_per_layer: PerLayer,
                  target_density: Union[float, Array],
                  token_weights: Optional[Array] = None) -> Array:
  """LtS §2.1 / Alg. 1 line 12: ℓ_aux = Σ_i (r_i − P)^2.

  Args:
    probs_per_layer: per layer, the soft routing probabilities `Gate.probs` [...] (a list, or an
      array stacked on axis 0).
    mask_per_layer: per layer, the router's hard masks `Gate.mask` (before any capacity drops:
      the loss controls the router's decision); same layout as `probs_per_layer`.
    target_density: P, a scalar or one value per layer [L].
    token_weights: optional weights [...] (e.g. 0 for padding) defining which tokens count.

  Returns:
    A scalar. Forward value from the hard masks; gradient 2(r_hard − P)·∂mean(probs).
  """
  r = routed_fractions(probs_per_layer, mask_per_layer, token_weights)
  p = jnp.broadcast_to(jnp.asarray(target_density, jnp.float32), r.shape)
  return jnp.sum(jnp.square(r - p))


# Where a warmed-up router's bias starts routing: P_0 = 1 in the schedule, but σ(logit 0.99) keeps
# the router off σ's flat tail so the capacity loss can pull it down as P_t falls.
WARMUP_INIT_DENSITY = 0.99


def scheduled_density(step: Union[int, Array], target_density: float, warmup_steps: int) -> Array:
  """Dense-to-sparse warm-up: P_t = P + (1 − P)·max(0, 1 − t / warmup_steps); P from then on.

  Not in LtS, whose routers face P from step 0. A router learns to keep a token only once a layer
  helps it, and a layer learns to help only tokens routed to it: at small P the routers of our
  synthetic task settle on tokens a layer helps early and never try the hard ones again. Starting
  dense lets every layer learn on every token first (cf. the dense-to-sparse gate of
  Nie et al. 2021 for MoE); random gating gets the same schedule so compute stays matched.
  """
  if warmup_steps <= 0:
    return jnp.asarray(target_density, jnp.float32)
  # Evaluation and decoding always use P itself (they pass no schedule).
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return jnp.asarray(target_density + (1.0 - target_density) * (1.0 - progress), jnp.float32)


def effective_depth(densities: Array) -> Array:
  """LtS Table 1 "Eff-L": the expected number of layers a token runs, Σ_i r_i (last axis)."""
  return jnp.sum(jnp.asarray(densities, jnp.float32), axis=-1)


def layer_flops_per_token(density: Union[float, Array], *, d_model: int, d_ff: int, seq_len: int,
                          num_heads: int, head_dim: Optional[int] = None,
                          ffn_matrices: int = 2, causal: bool = False,
                          router: bool = True, attn: Union[float, Array] = 1.0,
                          ffn: Union[float, Array] = 1.0) -> Array:
  """Forward FLOPs per token of one SkipLayer decoder layer at routed fraction r (LtS Alg. 1).

  Convention: a matmul with an [m, n] weight costs 2·m·n FLOPs per token; norms, softmax,
  activations and biases are ignored. With d = d_model, a = num_heads·head_dim, T = seq_len
  (keys per query; (T + 1)/2 on average when `causal`), f = d_ff:

    always (every token):   K, V projections 2·(2·d·a)  +  router 2·(2·d)   (if `router`)
    routed tokens only (×r): Q projection 2·d·a + scores 2·T·a + weighted values 2·T·a
                             + output projection 2·a·d + FFN 2·ffn_matrices·d·f

  i.e. 4da + 4d + r·(4da + 4Ta + 2·ffn_matrices·df). `ffn_matrices` = 3 for gated (GLU) FFNs.

  `attn`, `ffn` (1 or 0, or arrays broadcasting with `density`): whether the layer runs its
  attention / FFN branch (a static branch choice, e.g. an execution plan's position): a branch
  that is off costs nothing (attention: its K/V projections too), and the router only counts
  where some branch runs: attn·(4da + r·(4da + 4Ta)) + ffn·r·2·ffn_matrices·df + max(attn, ffn)·4d.
  """
  head_dim = head_dim or d_model // num_heads
  a = num_heads * head_dim
  keys = (seq_len + 1) / 2 if causal else seq_len
  attn = jnp.asarray(attn, jnp.float32)
  ffn = jnp.asarray(ffn, jnp.float32)
  always = attn * 4 * d_model * a + (jnp.maximum(attn, ffn) * 4 * d_model if router else 0.0)
  routed = attn * (4 * d_model * a + 4 * keys * a) + ffn * 2 * ffn_matrices * d_model * d_ff
  return always + jnp.asarray(density, jnp.float32) * routed


def flops_per_token(densities: Union[Sequence[float], Array], *, d_model: int, d_ff: int,
                    seq_len: int, num_heads: int, head_dim: Optional[int] = None,
                    ffn_matrices: int = 2, causal: bool = False, router: bool = True,
                    vocab_size: int = 0, attn: Optional[Union[Sequence[float], Array]] = None,
                    ffn: Optional[Union[Sequence[float], Array]] = None) -> Array:
  """Forward FLOPs per token of a SkipLayer decoder stack (sum of `layer_flops_per_token`).

  Args:
    densities: routed fraction r_i of every layer [L] (1.0 for dense layers); under an execution
      plan, of every depth position [P] (a position that repeats a layer counts again).
    vocab_size: if > 0, adds the output projection 2·d·V.
    attn, ffn: optional [L] (or [P]) 1/0 flags, whether each layer / position runs its attention
      and its FFN branch (default: all run); see `layer_flops_per_token`.
    others: see `layer_flops_per_token`.
  """
  densities = jnp.asarray(densities, jnp.float32)
  per_layer = layer_flops_per_token(
      densities, d_model=d_model, d_ff=d_ff, seq_len=seq_len, num_heads=num_heads, head_dim=head_dim,
      ffn_matrices=ffn_matrices, causal=causal, router=router,
      attn=1.0 if attn is None else jnp.asarray(attn, jnp.float32),
      ffn=1.0 if ffn is None else jnp.asarray(ffn, jnp.float32))
  return jnp.sum(per_layer) + 2 * d_model * vocab_size
