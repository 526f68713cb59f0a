"""Learned oracle imitation (RR §5 future work): one linear router per residual block, trained
on the block input of a frozen model to predict the residual-ratio oracle's decision.

Targets: keep[l, b, n] = r ≥ threshold from the dense run (RR §4.3). Router (l, b):
p(keep | x) = σ(w·(x − μ)/σ_x + c), i.e. a linear layer on the block input x with the feature
standardisation folded in; trained with Adam on binary cross entropy. When the routers drive
skipping, each block's mask is decided on the input it actually sees (earlier skips included):
a Flax method interceptor replaces the Block's gate (`Block._gate`, the hook every gate goes
through) with the router's hard decision, so the whole model stays one forward pass.
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from skipjax import models, routing
from skipjax.models.block import Block
from skipjax.profile.applied import cost, forward, valid_tokens
from skipjax.profile.oracle import oracle_keep
from skipjax.profile.ratios import BRANCHES

Routers = Dict[str, jnp.ndarray]  # {'w': [L, 2, d], 'b': [L, 2]} on the raw block input


def _branch_call(context, args) -> Tuple[int, int]:
  """(layer, branch) when this intercepted call is a Block asking for an attn/ffn gate."""
  if (isinstance(context.module, Block) and context.method_name == "_gate" and args
      and args[0] in BRANCHES and context.module.name.startswith("block_")):
    return int(context.module.name.split("_")[1]), BRANCHES.index(args[0])
  return None


def block_inputs(cfg, params, batch: Dict[str, Any]) -> jnp.ndarray:
  """Input x of every residual block (dense run) → [L, 2, B, T, d] float32."""
  model = models.build(cfg)

  def run(params, batch):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      where = _branch_call(context, args)
      if where is not None:
        captured[where] = args[1].astype(jnp.float32)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      forward(model, params, batch)
    return jnp.stack([jnp.stack([captured[(i, b)] for b in range(2)]) for i in range(cfg.num_layers)])

  return jax.jit(run)(params, batch)


def train_routers(features: jnp.ndarray, keep: np.ndarray, steps: int = 300, learning_rate: float = 1e-2,
                  weight_decay: float = 1e-2, seed: int = 0) -> Routers:
  """Fit router (l, b) on features [L, 2, N, d] to keep [L, 2, N] (BCE, AdamW, full batch)."""
  features = jnp.asarray(features, jnp.float32)
  labels = jnp.asarray(keep, jnp.float32)
  mu = features.mean(2, keepdims=True)
  sigma = features.std(2, keepdims=True) + 1e-6
  z = (features - mu) / sigma
  init_rate = jnp.clip(labels.mean(-1), 1e-3, 1 - 1e-3)
  theta = {"w": 0.01 * jax.random.normal(jax.random.key(seed), features.shape[:2] + features.shape[-1:]),
           "c": jnp.log(init_rate / (1 - init_rate))}
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(theta):
    logits = jnp.einsum("lbnd,lbd->lbn", z, theta["w"]) + theta["c"][..., None]
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

  @jax.jit
  def step(theta, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(theta)
    updates, opt_state = tx.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss

  opt_state = tx.init(theta)
  for _ in range(steps):
    theta, opt_state, _ = step(theta, opt_state)
  w = theta["w"] / sigma[:, :, 0]
  return {"w": w, "b": theta["c"] - jnp.einsum("lbd,lbd->lb", mu[:, :, 0], w)}


def router_keep(routers: Routers, features: jnp.ndarray) -> jnp.ndarray:
  """Hard decisions of the routers on features [L, 2, ..., d] → bool [L, 2, ...]."""
  logits = jnp.einsum("lb...d,lbd->lb...", features, routers["w"])
  return logits + routers["b"].reshape(routers["b"].shape + (1,) * (logits.ndim - 2)) > 0


def routed_forward(cfg, params, batch: Dict[str, Any], routers: Routers):
  """The model with every residual block gated by its router on its actual input.
  Returns (output, keep [L, 2, B, T] float)."""
  model = models.build(cfg)

  def run(params, batch, routers):
    decided = {}

    def interceptor(next_fun, args, kwargs, context):
      where = _branch_call(context, args)
      if where is None:
        return next_fun(*args, **kwargs)
      i, b = where
      x = args[1].astype(jnp.float32)
      mask = (x @ routers["w"][i, b] + routers["b"][i, b] > 0).astype(jnp.float32)
      decided[where] = mask
      return routing.fixed_gate(mask)

    with nn.intercept_methods(interceptor):
      out, _ = forward(model, params, batch)
    keep = jnp.stack([jnp.stack([decided[(i, b)] for b in range(2)]) for i in range(cfg.num_layers)])
    return out, keep

  return jax.jit(run)(params, batch, routers)


def _split(batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Sequences for training / held-out evaluation (first half / second half; all if B = 1)."""
  idx = np.arange(batch_size)
  if batch_size < 2:
    return idx, idx
  return idx[: batch_size // 2], idx[batch_size // 2:]


def majority_baseline(train_keep: np.ndarray, test_keep: np.ndarray) -> Tuple[float, np.ndarray]:
  """Held-out accuracy of the per-block majority class, the class fixed on the training labels
  [L, 2, N_train] and scored on the test labels [L, 2, N_test] → (overall, per block [L, 2])."""
  majority = np.asarray(train_keep).mean(-1) >= 0.5  # [L, 2]
  hits = np.asarray(test_keep) == majority[..., None]
  return float(hits.mean()), hits.mean(-1)


def imitation(cfg, params, batch: Dict[str, Any], ratios: np.ndarray, threshold: float, steps: int = 300,
              seed: int = 0) -> Dict[str, Any]:
  """Train routers on the first half of the sequences, report held-out accuracy against the
  majority-class baseline (per block and overall), and the cost (perplexity / drift) when the
  routers drive skipping vs. when the applied oracle does, on the whole batch."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  valid = valid_tokens(batch)
  valid = np.ones(ratios.shape[-2:], bool) if valid is None else valid
  keep = oracle_keep(ratios, threshold)
  feats = block_inputs(cfg, params, batch)
  train, test = _split(ratios.shape[2])
  sel = lambda a, rows: np.asarray(a)[:, :, rows][:, :, valid[rows]]
  routers = train_routers(sel(feats, train), sel(keep, train), steps=steps, seed=seed)
  pred = np.asarray(router_keep(routers, feats))
  correct = sel(pred == keep, test)
  train_acc = float(sel(pred == keep, train).mean())
  majority, majority_block = majority_baseline(sel(keep, train), sel(keep, test))

  dense_out = forward(models.build(cfg), params, batch)[0]
  routed_out, routed_keep = routed_forward(cfg, params, batch, routers)
  from skipjax.profile.applied import applied_oracle  # pylint: disable=import-outside-toplevel
  oracle_row = applied_oracle(cfg, params, batch, [threshold])["curve"][0]["applied"]
  return {"threshold": float(threshold), "steps": steps,
          "accuracy": float(correct.mean()), "train_accuracy": train_acc, "majority_baseline": majority,
          "accuracy_per_block": correct.mean(-1).tolist(), "majority_per_block": majority_block.tolist(),
          "keep_rate": float(keep[..., valid].mean()),
          "routed": {**cost(cfg, routed_out, batch, dense_out),
                     "skipped_fraction": float(1 - np.asarray(routed_keep)[..., valid].mean())},
          "oracle_applied": oracle_row, "dense": cost(cfg, dense_out, batch, dense_out)}
