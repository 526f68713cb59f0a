"""Learned early-exit classifier: one linear head per exit position (issue 14, item 1).

CALM (Schuster et al. 2022, §3.5, "meta early-exit classifier"): a light classifier, trained on
a FROZEN model with the consistency oracle as labels, predicts whether exiting at a layer keeps
the full model's prediction. Here (issue 14) one linear head per exit position: head l reads
h̄_l, the state after plan position l through the model's final norm (the input of the shared
head's output projection; the raw state for `final_norm=False`):

    c_l = sigmoid(⟨w_l, h̄_l⟩ + b_l) ∈ (0, 1)        (`skipjax.routing.exit.learned_confidence`)

and is trained with binary cross-entropy (mean over tokens and positions) on the labels

    y_l = [argmax g(h_l) = argmax g(h_{P−1})]         (g the shared head, P plan positions).

The last position's label is always 1 and a token always exits there (`exit_layer`), so it is
EXCLUDED from the training loss: its head stays at w = 0, b = 0 (c = 1/2); `evaluate_exit_heads`
still reports it.

Heads are a plain dict {'w': [P, d] float32, 'b': [P] float32}; `routing.exit.exit_layer(c, λ)`
turns their confidences into exits like any other measure. Saved as .npz with a JSON `meta`
(num_positions, d_model, plan).
"""
import functools
import json
import os
import tempfile
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from skipjax import models
from skipjax.depth import exits
from skipjax.depth import plan as plan_lib
from skipjax.layers import make_norm
from skipjax.routing import exit as exit_lib

Heads = Dict[str, jnp.ndarray]


class ExitHeadData(NamedTuple):
  """Features and labels of one batch (P plan positions).

  Attributes:
    features: [P, B, T, d] float32, h̄_l (the final-normed state after each position).
    labels: [P, B, T] float32 ∈ {0, 1}, the consistency oracle y_l.
    weights: [B, T] float32 token weights (batch['weights'], else ones).
  """
  features: jnp.ndarray
  labels: jnp.ndarray
  weights: jnp.ndarray


# -- features and labels -----------------------------------------------------------------------

def normed_states(cfg: models.TransformerConfig, params, hidden: jnp.ndarray) -> jnp.ndarray:
  """h̄_l: `exits.layer_outputs(...).hidden` [P + 1, B, T, d] → [P, B, T, d] float32.

  The model's own final norm module (`ln_final`, built as in models/transformer.py) applied with
  its params to the state after each position; the raw states when `cfg.final_norm` is False.
  """
  h = hidden[1:]                                                            # [P, B, T, d]
  if cfg.final_norm:
    norm = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, cfg.compute_dtype)
    norm_params = nn.meta.unbox(params).get("ln_final", {})                 # none when affine=False
    h = norm.apply({"params": norm_params}, h)
  return h.astype(jnp.float32)


def oracle_labels(logits: jnp.ndarray) -> jnp.ndarray:
  """Consistency-oracle labels y_l = [argmax logits_l = argmax logits_{P−1}]: [P, ..., V] → [P, ...] float32."""
  top = jnp.argmax(logits, axis=-1)                                         # [P, ...]
  return (top == top[-1:]).astype(jnp.float32)


def features_and_labels(cfg: models.TransformerConfig, params, batch: Mapping[str, Any]) -> ExitHeadData:
  """One forward of the frozen model: h̄_l [P, B, T, d], y_l [P, B, T] and token weights [B, T].

  Wrapped in `stop_gradient`: nothing downstream can reach the model params.
  """
  inputs = jnp.asarray(batch["inputs"], jnp.int32)                          # [B, T]
  out = exits.layer_outputs(cfg, params, inputs, batch.get("positions"))
  features = jax.lax.stop_gradient(normed_states(cfg, params, out.hidden))  # [P, B, T, d]
  labels = jax.lax.stop_gradient(oracle_labels(out.logits))                 # [P, B, T]
  weights = (jnp.asarray(batch["weights"], jnp.float32) if "weights" in batch
             else jnp.ones(inputs.shape, jnp.float32))                      # [B, T]
  return ExitHeadData(features, labels, weights)


# -- heads and loss ----------------------------------------------------------------------------

def init_exit_heads(num_positions: int, d_model: int, seed: int = 0, scale: float = 1e-2) -> Heads:
  """{'w': [P, d] ~ N(0, scale²), 'b': [P] = 0}; the last position's head is all zeros (never trained)."""
  w = scale * jax.random.normal(jax.random.key(seed), (num_positions, d_model), jnp.float32)
  return {"w": w.at[-1].set(0.0), "b": jnp.zeros((num_positions,), jnp.float32)}


def head_logits(heads: Heads, features: jnp.ndarray) -> jnp.ndarray:
  """⟨w_l, h̄_l⟩ + b_l: features [P, ..., d] → [P, ...] float32 (the classifier's logit)."""
  w = heads["w"].reshape((heads["w"].shape[0],) + (1,) * (features.ndim - 2) + (heads["w"].shape[1],))
  b = heads["b"].reshape((-1,) + (1,) * (features.ndim - 2))
  return jnp.sum(features * w, axis=-1) + b                                 # [P, ...]


def head_confidence(heads: Heads, features: jnp.ndarray) -> jnp.ndarray:
  """c_l = sigmoid(⟨w_l, h̄_l⟩ + b_l) [P, ...]: the learned exit measure."""
  return exit_lib.learned_confidence(heads["w"], heads["b"], features)


def _bce(heads: Heads, data: ExitHeadData) -> jnp.ndarray:
  """Per-position weighted mean BCE [P] (CALM §3.5: the classifier's cross-entropy to the oracle)."""
  bce = optax.sigmoid_binary_cross_entropy(head_logits(heads, data.features), data.labels)  # [P, B, T]
  w = data.weights[None]                                                    # [1, B, T]
  return jnp.sum(bce * w, axis=(1, 2)) / jnp.maximum(jnp.sum(data.weights), 1e-12)  # [P]


def bce_loss(heads: Heads, data: ExitHeadData) -> jnp.ndarray:
  """The training loss: mean over positions 0 … P − 2 (the last is excluded) of the weighted BCE."""
  per_position = _bce(heads, data)                                          # [P]
  return jnp.mean(per_position[:-1]) if per_position.shape[0] > 1 else jnp.zeros((), jnp.float32)


def exit_head_loss(heads: Heads, cfg: models.TransformerConfig, params, batch: Mapping[str, Any]) -> jnp.ndarray:
  """`bce_loss` from the model end to end (features under stop_gradient: zero gradient to `params`)."""
  return bce_loss(heads, features_and_labels(cfg, params, batch))


def confidence(cfg: models.TransformerConfig, params, heads: Heads, batch: Mapping[str, Any]) -> jnp.ndarray:
  """The learned confidence c_l [P, B, T] of `batch['inputs']` under the frozen model."""
  return head_confidence(heads, _feature_fn(cfg)(params, batch).features)


def _check_heads(heads: Heads, num_positions: int, d_model: int, where: str) -> None:
  w, b = np.shape(heads["w"]), np.shape(heads["b"])
  if w != (num_positions, d_model) or b != (num_positions,):
    raise ValueError(f"{where}: exit heads w {w}, b {b} do not fit the model: expected w ({num_positions}, "
                     f"{d_model}), b ({num_positions},)")


# -- training and evaluation -------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _feature_fn(cfg: models.TransformerConfig):
  """One jitted `features_and_labels` per config (training and evaluation share its compile)."""
  return jax.jit(lambda p, b: features_and_labels(cfg, p, b))


def train_exit_heads(cfg: models.TransformerConfig, params, batches: Sequence[Mapping[str, Any]], *,
                     steps: int, learning_rate: float = 1e-2, seed: int = 0,
                     heads: Optional[Heads] = None) -> Tuple[Heads, np.ndarray]:
  """CALM §3.5 meta classifier: fit the heads with Adam on the frozen model's oracle labels.

  Each batch ({'inputs' [B, T], optional 'positions', 'weights'}) is run through the model once
  (jit; features and labels cached on device: P·B·T·d float32 per batch); step s trains on the
  batch at index s of a per-epoch permutation drawn from `seed`. `params` are never updated.
  Returns (heads, history [steps] float32 of the training loss before each step).
  """
  if steps < 1:
    raise ValueError(f"exit heads steps={steps}: must be ≥ 1")
  if not batches:
    raise ValueError("exit heads: no training batches")
  num_positions = len(cfg.execution_plan)
  if heads is None:
    heads = init_exit_heads(num_positions, cfg.d_model, seed)
  _check_heads(heads, num_positions, cfg.d_model, "train_exit_heads")
  features = _feature_fn(cfg)
  cache: Dict[int, ExitHeadData] = {}
  opt = optax.adam(learning_rate)
  opt_state = opt.init(heads)

  @jax.jit
  def step(heads, opt_state, data):
    loss, grads = jax.value_and_grad(bce_loss)(heads, data)
    updates, opt_state = opt.update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  order = []
  history = np.zeros(steps, np.float32)
  for s in range(steps):
    if not order:
      order = list(rng.permutation(len(batches)))
    i = int(order.pop())
    if i not in cache:
      cache[i] = features(params, batches[i])
    heads, opt_state, loss = step(heads, opt_state, cache[i])
    history[s] = float(loss)
  return heads, history


@jax.jit
def _eval_sums(heads: Heads, data: ExitHeadData, threshold: jnp.ndarray):
  """Token-weighted sums [P] of one batch for `evaluate_exit_heads`, and the total weight."""
  w = data.weights[None]                                                    # [1, B, T]
  pred = (head_confidence(heads, data.features) >= threshold).astype(jnp.float32)  # [P, B, T]
  total = lambda a: jnp.sum(a * w, axis=(1, 2))                             # [P]
  return {"correct": total((pred == data.labels).astype(jnp.float32)), "positive": total(data.labels),
          "predicted": total(pred), "loss": _bce(heads, data) * jnp.sum(data.weights)}, jnp.sum(data.weights)


def evaluate_exit_heads(cfg: models.TransformerConfig, params, heads: Heads,
                        batches: Sequence[Mapping[str, Any]], threshold: float = 0.5) -> Dict[str, np.ndarray]:
  """Per-position metrics [P] over `batches` (token-weighted), predicting y_l = 1 where c_l ≥ threshold.

  accuracy: of that prediction vs the oracle labels; positive_rate: mean y_l; predicted_rate:
  mean [c_l ≥ threshold]; constant_accuracy: max(positive_rate, 1 − positive_rate), the best
  constant predictor; loss: the BCE. The last position is included (its labels are all 1).
  """
  _check_heads(heads, len(cfg.execution_plan), cfg.d_model, "evaluate_exit_heads")
  features = _feature_fn(cfg)
  acc, weight = None, 0.0
  for batch in batches:
    s, n = _eval_sums(heads, features(params, batch), jnp.float32(threshold))
    s = {k: np.asarray(v, np.float64) for k, v in s.items()}
    acc = s if acc is None else {k: acc[k] + s[k] for k in acc}
    weight += float(n)
  if acc is None or weight <= 0:
    raise ValueError("evaluate_exit_heads: no tokens (empty batches or all weights 0)")
  positive = acc["positive"] / weight
  return {"accuracy": acc["correct"] / weight, "positive_rate": positive, "predicted_rate": acc["predicted"] / weight,
          "constant_accuracy": np.maximum(positive, 1.0 - positive), "loss": acc["loss"] / weight,
          "tokens": np.float64(weight)}


# -- save / load -------------------------------------------------------------------------------

def heads_meta(cfg: models.TransformerConfig) -> Dict[str, Any]:
  """What a heads file records about its model: num_positions, d_model, plan (canonical string)."""
  plan = cfg.execution_plan
  return {"num_positions": len(plan), "d_model": int(cfg.d_model), "plan": plan_lib.to_string(plan)}


def save_exit_heads(path: str, heads: Heads, meta: Mapping[str, Any]) -> None:
  """Write heads and `meta` (must hold num_positions, d_model, plan; e.g. `heads_meta(cfg)`) to .npz atomically."""
  missing = [k for k in ("num_positions", "d_model", "plan") if k not in meta]
  if missing:
    raise ValueError(f"save_exit_heads {path}: meta lacks {missing[0]!r}")
  _check_heads(heads, int(meta["num_positions"]), int(meta["d_model"]), f"save_exit_heads {path}")
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".exit_heads.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, w=np.asarray(heads["w"], np.float32), b=np.asarray(heads["b"], np.float32),
               meta=np.asarray(json.dumps(dict(meta), sort_keys=True)))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_exit_heads(path: str, cfg: Optional[models.TransformerConfig] = None) -> Tuple[Heads, Dict[str, Any]]:
  """(heads, meta) from a `save_exit_heads` file; with `cfg`, checks positions, d_model and plan.

  Raises a one-line ValueError naming the file for a missing/unreadable file or a mismatch.
  """
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      w, b = np.asarray(z["w"], np.float32), np.asarray(z["b"], np.float32)
      meta = json.loads(str(z["meta"]))
  except (OSError, ValueError, KeyError, EOFError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"exit heads file {path}: not a readable exit-heads .npz ({reason})") from None
  where = f"exit heads file {path}"
  if w.ndim != 2 or b.shape != (w.shape[0],):
    raise ValueError(f"{where}: w {w.shape} and b {b.shape} are not [P, d] and [P]")
  if (meta.get("num_positions"), meta.get("d_model")) != w.shape:
    raise ValueError(f"{where}: meta num_positions={meta.get('num_positions')}, d_model={meta.get('d_model')} "
                     f"disagree with w {w.shape}")
  if cfg is not None:
    want = heads_meta(cfg)
    _check_heads({"w": w, "b": b}, want["num_positions"], want["d_model"], where)
    if meta.get("plan") != want["plan"]:
      raise ValueError(f"{where}: trained for plan {meta.get('plan')!r}, the model runs plan {want['plan']!r}")
  return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, meta
