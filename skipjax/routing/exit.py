"""Early-exit decisions: per-token confidence at every exit position, thresholds, exit layers.

Pure functions on arrays; no model knowledge. An exit position l (0-based, l = 0 … L − 1) is the
hidden state after the l-th position of the execution plan; its prediction is the shared head
(final norm + LM head) applied to that state, `skipjax.depth.exits.layer_logits` → [L, B, T, V].

Confidence measures (higher = more confident everywhere, so one rule `c ≥ λ` exits):

  softmax_max  max_v p_v, p = softmax(logits): the maximum probability.
  top2_margin  p_(1) − p_(2), top-1 minus top-2 softmax probability: CALM's "softmax response"
               (Schuster et al. 2022, §3.5 local confidence measures). In [0, 1].
  entropy      −H(p) = Σ_v p_v log p_v in nats, ≤ 0 (the NEGATIVE entropy, so that higher =
               more confident); `normalized=True` gives 1 − H(p)/log V ∈ [0, 1].
  saturation   cos(h_l, h_{l−1}): CALM's "hidden-state saturation" (§3.5), the cosine between the
               hidden state after exit position l and the one before it (h_{−1} = the input of the
               first position, e.g. the embeddings), from hidden states [L + 1, ...]. In [−1, 1].
  learned      sigmoid(⟨w_l, h̄_l⟩ + b_l): CALM's "meta early-exit classifier" (§3.5), one linear
               head per exit position on the final-normed state h̄_l (`learned_confidence`; the
               heads are trained in `skipjax.depth.exit_heads`). In (0, 1). Not in `MEASURES`:
               it needs the heads and the normed states, not the logits.

Decisions:

  exit_layer          the first position l ≥ min_layer with c_l ≥ λ, else the last (L − 1).
  fixed_exit          "always exit at N": every token exits at position N.
  oracle_exit_layer   the consistency oracle (issue 14): the first position whose argmax equals
                      the last position's (`stable=True`: the first from which every later
                      position agrees too). An upper bound for any confidence rule with the same
                      output as the full model at the exit.
  decaying_threshold  CALM's position-decaying threshold λ(λ, t) (§3.5, "decaying threshold").
  active_mask         the still-active gate m_l = [l ≤ exit] [L, ...] (DESIGN.md: early exit is a
                      gate carried from layer to layer).
"""
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

Array = jnp.ndarray

MEASURES = ("softmax_max", "top2_margin", "entropy", "saturation")


class ExitDecision(NamedTuple):
  """Where each token exits; every field has the token shape [...].

  Attributes:
    layer: int32 exit position l ∈ [0, L − 1] (the token runs positions 0 … l).
    early: bool, l < L − 1 (the token skipped at least one position).
    confidence: the confidence at the exit position (None for the oracle, which has none).
  """
  layer: Array
  early: Array
  confidence: Optional[Array] = None


# -- confidence measures -----------------------------------------------------------------------

def _log_probs(logits: Array) -> Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)          # [..., V]


def softmax_max(logits: Array) -> Array:
  """max_v softmax(logits)_v: logits [..., V] → [...] in (0, 1]."""
  return jnp.exp(jnp.max(_log_probs(logits), axis=-1))                     # [...]


def top2_margin(logits: Array) -> Array:
  """CALM §3.5 softmax response p_(1) − p_(2): logits [..., V] (V ≥ 2) → [...] in [0, 1]."""
  if logits.shape[-1] < 2:
    raise ValueError(f"top2_margin needs a vocabulary of at least 2 (logits shape {logits.shape})")
  p = jnp.exp(_log_probs(logits))                                           # [..., V]
  # two max-reductions instead of lax.top_k, which is ~30x slower on CPU at V = 49152
  first = jnp.argmax(p, axis=-1)                                            # [...]
  p1 = jnp.take_along_axis(p, first[..., None], axis=-1)[..., 0]            # [...]
  others = jnp.where(jnp.arange(p.shape[-1]) == first[..., None], -1.0, p)  # [..., V]
  return p1 - jnp.max(others, axis=-1)                                      # [...]


def entropy(logits: Array, normalized: bool = False) -> Array:
  """Negative entropy −H(p) = Σ_v p_v log p_v (nats, ≤ 0): logits [..., V] → [...].

  `normalized=True`: 1 − H(p)/log V ∈ [0, 1] (1 = one-hot, 0 = uniform).
  """
  logp = _log_probs(logits)                                                 # [..., V]
  neg_h = jnp.sum(jnp.exp(logp) * logp, axis=-1)                           # [...]
  if normalized:
    return 1.0 + neg_h / jnp.log(jnp.float32(logits.shape[-1]))
  return neg_h


def saturation(hidden: Array, eps: float = 1e-12) -> Array:
  """CALM §3.5 hidden-state saturation cos(h_l, h_{l−1}): hidden [L + 1, ..., d] → [L, ...].

  Entry l compares the state after exit position l (hidden[l + 1]) with the one before it
  (hidden[l]); hidden[0] is the input of the first position.
  """
  h = hidden.astype(jnp.float32)
  cur, prev = h[1:], h[:-1]                                                 # [L, ..., d]
  dot = jnp.sum(cur * prev, axis=-1)                                        # [L, ...]
  norms = jnp.linalg.norm(cur, axis=-1) * jnp.linalg.norm(prev, axis=-1)    # [L, ...]
  return dot / jnp.maximum(norms, eps)


def learned_confidence(w: Array, b: Array, normed_hidden: Array) -> Array:
  """CALM §3.5 learned meta classifier: sigmoid(⟨w_l, h̄_l⟩ + b_l) [L, ...] in (0, 1).

  w [L, d], b [L]: one linear head per exit position; normed_hidden [L, ..., d]: the state after
  each position through the model's final norm (the input of the shared head's projection).
  """
  h = normed_hidden.astype(jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2 or h.shape[0] != w.shape[0] or h.shape[-1] != w.shape[1]:
    raise ValueError(f"learned exit heads w {w.shape} do not fit hidden states {h.shape} ([L, d] vs [L, ..., d])")
  w = w.reshape((w.shape[0],) + (1,) * (h.ndim - 2) + (w.shape[1],))      # [L, 1..., d]
  b = jnp.asarray(b, jnp.float32).reshape((-1,) + (1,) * (h.ndim - 2))      # [L, 1...]
  return jax.nn.sigmoid(jnp.sum(h * w, axis=-1) + b)                       # [L, ...]


def confidence(measure: str, logits: Optional[Array] = None, hidden: Optional[Array] = None) -> Array:
  """Dispatch by name: per-layer logits [L, ..., V] or hidden states [L + 1, ..., d] → [L, ...]."""
  if measure not in MEASURES:
    raise ValueError(f"exit measure={measure!r} is not one of {MEASURES}")
  if measure == "saturation":
    if hidden is None:
      raise ValueError("exit measure='saturation' needs the hidden states [L + 1, ..., d]")
    return saturation(hidden)
  if logits is None:
    raise ValueError(f"exit measure={measure!r} needs the per-layer logits [L, ..., V]")
  return {"softmax_max": softmax_max, "top2_margin": top2_margin, "entropy": entropy}[measure](logits)


# -- thresholds and decisions ------------------------------------------------------------------

def decaying_threshold(threshold: Union[float, Array], t: Union[int, Array], max_len: int,
                       tau: float) -> Array:
  """CALM's decaying threshold (Schuster et al. 2022, §3.5):

      λ(λ, t) = clip_[0, 1]( 9/10 · λ + 1/10 · exp(−τ · t / N) )

  with t the index of the generated token, N = `max_len` the maximum output length and τ = `tau`
  the temperature (τ = 0 is a constant 9/10 λ + 1/10; larger τ decays faster towards 9/10 λ).
  Broadcasts over `threshold` and `t`.
  """
  if max_len <= 0:
    raise ValueError(f"decaying_threshold max_len={max_len}: must be positive")
  t = jnp.asarray(t, jnp.float32)
  lam = 0.9 * jnp.asarray(threshold, jnp.float32) + 0.1 * jnp.exp(-tau * t / max_len)
  return jnp.clip(lam, 0.0, 1.0)


def _check_min_layer(min_layer: int, num_layers: int) -> None:
  if not 0 <= min_layer < num_layers:
    raise ValueError(f"exit min_layer={min_layer}: must be in [0, {num_layers - 1}] for {num_layers} exit positions")


def exit_layer(confidences: Array, threshold: Union[float, Array], min_layer: int = 0) -> ExitDecision:
  """The first position l ≥ `min_layer` with confidence c_l ≥ λ, else the last (L − 1).

  confidences [L, ...]; `threshold` λ a scalar or an array broadcastable to [...] (e.g. [T], a
  decaying threshold per position). CALM §3 (exit when the local confidence passes λ).
  """
  num_layers = confidences.shape[0]
  _check_min_layer(min_layer, num_layers)
  depth = jnp.arange(num_layers).reshape((num_layers,) + (1,) * (confidences.ndim - 1))  # [L, 1...]
  passes = (confidences >= threshold) & (depth >= min_layer)                             # [L, ...]
  passes = passes.at[-1].set(True)                                                       # the last always exits
  layer = jnp.argmax(passes, axis=0).astype(jnp.int32)                                   # [...] first True
  conf = jnp.take_along_axis(confidences, layer[None], axis=0)[0]                        # [...]
  return ExitDecision(layer, layer < num_layers - 1, conf)


def fixed_exit(num_layers: int, layer: int, shape=()) -> ExitDecision:
  """"Always exit at N" (issue 14): every token of `shape` exits at position `layer`."""
  _check_min_layer(layer, num_layers)
  at = jnp.full(shape, layer, jnp.int32)                                                 # [...]
  return ExitDecision(at, at < num_layers - 1)


def oracle_exit_layer(per_layer_argmax: Array, stable: bool = False) -> ExitDecision:
  """Consistency oracle: the first position whose argmax equals the last position's.

  per_layer_argmax [L, ...] (int, argmax of each position's logits) → ExitDecision [...].
  `stable=False` (issue 14's definition): first l with a_l = a_{L−1}; later positions may
  disagree again. `stable=True`: first l with a_k = a_{L−1} for every k ≥ l (exiting at any later
  position would also be consistent). Always ≤ L − 1 (the last position agrees with itself).
  """
  num_layers = per_layer_argmax.shape[0]
  agree = per_layer_argmax == per_layer_argmax[-1:]                                       # [L, ...]
  if stable:
    # a suffix AND: agree_from[l] = all(agree[l:])
    agree = jnp.flip(jnp.cumprod(jnp.flip(agree, 0).astype(jnp.int32), axis=0), 0) > 0    # [L, ...]
  layer = jnp.argmax(agree, axis=0).astype(jnp.int32)                                    # [...]
  return ExitDecision(layer, layer < num_layers - 1)


def active_mask(layer: Array, num_layers: int) -> Array:
  """The early-exit gate carried through depth: m_l = [l ≤ exit layer], exit [...] → [L, ...] float32."""
  depth = jnp.arange(num_layers).reshape((num_layers,) + (1,) * jnp.ndim(layer))          # [L, 1...]
  return (depth <= layer).astype(jnp.float32)                                             # [L, ...]
