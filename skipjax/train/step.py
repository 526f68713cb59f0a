"""Loss, train step and eval step (pure functions; jitted with shardings by the loop)."""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from skipjax import models, routing
from skipjax.depth import exits
from skipjax.models import executed as executed_lib
from skipjax.models.stack import sown_keep
from skipjax.train.state import LAYERDROP_STREAM, TrainState

Batch = Dict[str, jnp.ndarray]


def token_nll(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """−log p(target) per token, [B, T], in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def sum_aux_losses(variables: Dict[str, Any]) -> jnp.ndarray:
  """Σ of every sown (already weighted) auxiliary loss, e.g. LtS capacity loss λ·ℓ_aux."""
  leaves = jax.tree.leaves(variables.get("aux_loss", {}))
  return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def _plan(model: nn.Module):
  """The model's execution plan when it is not the identity ('' plan), else None."""
  cfg = getattr(model.config, "transformer", model.config)
  return cfg.execution_plan if cfg.plan else None


def routing_metrics(gates: Dict[str, Any], plan=None) -> Dict[str, jnp.ndarray]:
  """Per-layer routed fraction r_i and dropped fraction, and Eff-L (LtS Table 1): the mean over
  tokens of `executed_depth` (Σ_i r_i for whole-layer routing); under an execution `plan` one row
  per position that ran the gate."""
  out = {}
  for name in models.layout.sown_names(gates):
    if name.endswith(("_density", "_dropped_fraction")):
      out[name] = models.per_layer(gates, name, plan)
  depth = executed_depth(gates, plan)
  if depth is not None:
    out["effective_depth"] = jnp.mean(depth)
  # Mixture-of-Depths: agreement of the causal rule with top-k membership, mean over routed layers.
  accuracy = [jnp.mean(v) for path, v in jax.tree_util.tree_leaves_with_path(gates)
              if "mod_causal_accuracy" in jax.tree_util.keystr(path)]
  if accuracy:
    out["mod_causal_accuracy"] = jnp.mean(jnp.stack(accuracy))
  return out


def executed_depth(gates: Dict[str, Any], plan=None) -> Optional[jnp.ndarray]:
  """Layers each token executed, [B, T] (`models.executed`: a layer counts as the fraction of its
  residual blocks that ran, an un-routed block counting as run); None for a dense model."""
  return executed_lib.executed_depth(gates, plan)


def step_rngs(rng: jax.Array, step: jnp.ndarray) -> Dict[str, jax.Array]:
  """Per-step randomness is a pure function of (seed, step): resumption replays it exactly."""
  key = jax.random.fold_in(rng, step)
  dropout, gate = jax.random.split(key)
  return {"dropout": dropout, "gate": gate, "layerdrop": jax.random.fold_in(key, LAYERDROP_STREAM)}


def _early_exit_forward(params, batch: Batch, rngs, schedule, step, *, model: nn.Module,
                        early_exit: exits.EarlyExitConfig, num_steps: int):
  """LayerSkip §4.2 in one forward: (Σ_l ẽ(t, l)·CE_l, last-position CE, variables, metrics)."""
  cfg = model.config
  outs, variables = exits.layer_outputs(cfg, params, batch["inputs"], deterministic=False, rngs=rngs,
                                        mutable=["aux_loss", "gates"], density=schedule.get("density"))
  ce = jnp.mean(exits.exit_nll(outs.logits, batch["targets"]), axis=(1, 2))   # [P]
  weights = early_exit.loss_weights(step, ce.shape[0], num_steps)             # [P] ẽ(t, ·)
  return jnp.sum(weights * ce), ce[-1], variables, {"exit_ce": ce, "exit_weights": weights}


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, early_exit: Optional[exits.EarlyExitConfig] = None,
               num_steps: int = 0) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
  """loss = mean NLL + Σ sown aux losses; one optimizer update.

  With `early_exit` enabled (config.train.early_exit): the NLL term is LayerSkip's early-exit loss
  Σ_l ẽ(t, l)·CE_l at t = state.step of `num_steps` (exits.EarlyExitConfig); `nll` stays the
  last position's CE, and `exit_ce` [P] / `exit_weights` [P] are logged.
  """
  skip = model.config.skip
  schedule = {}
  if skip.density_warmup_steps > 0:
    schedule["density"] = routing.scheduled_density(state.step, skip.target_density, skip.density_warmup_steps)
  early_exit = early_exit if early_exit is not None and early_exit.enabled else None

  def loss_fn(params):
    metrics = {}
    if early_exit is not None:
      main, nll, variables, metrics = _early_exit_forward(
          params, batch, step_rngs(rng, state.step), schedule, state.step, model=model, early_exit=early_exit,
          num_steps=num_steps)
    else:
      logits, variables = model.apply(
          {"params": params}, batch["inputs"], deterministic=False, **schedule,
          rngs=step_rngs(rng, state.step), mutable=["aux_loss", "gates"])
      nll = jnp.mean(token_nll(logits, batch["targets"]))
      main = nll
    aux = sum_aux_losses(variables)
    gates = variables.get("gates", {})
    metrics.update(routing_metrics(gates, _plan(model)))
    keep = sown_keep(gates)
    if keep is not None:  # LayerDrop: fraction of (position, sequence) pairs that ran
      metrics["layerdrop_executed_fraction"] = jnp.mean(keep)
    return main + aux, (nll, aux, metrics)

  (loss, (nll, aux, routed)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "nll": nll, "aux_loss": aux, "grad_norm": optax.tree.norm(grads), **routed}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_rng(rng: Optional[jax.Array], batch_index) -> jax.Array:
  """The key of eval batch `batch_index`: `rng` (default key 0) with the index folded in, so every
  batch draws its own gates (random router, sampled gates) and a re-run draws the same."""
  return jax.random.fold_in(jax.random.key(0) if rng is None else rng, batch_index)


def eval_step(params: Any, batch: Batch, rng: Optional[jax.Array] = None, batch_index=0, *, model: nn.Module,
              num_classes: int = 0, deterministic: bool = True, early_exit: bool = False) -> Dict[str, jnp.ndarray]:
  """Summed NLL and token counts (overall and per difficulty class when the batch has one),
  and with routing the executed depth per token. Routing is deterministic (argmax) unless
  `deterministic=False` (gates sampled as in training, from `rng`; also enables dropout); the
  `random` baseline always draws Bernoulli(P) gates from `rng`. `early_exit`: also the summed
  NLL of every plan position's exit, `exit_nll_sum` [P] (the same forward; the last is `nll_sum`).
  The gate / dropout keys come from `eval_rng(rng, batch_index)` (`batch_index` may be traced).
  `depth_sum`: Σ over tokens of `executed_depth`, whenever some block sowed a gate."""
  rng = eval_rng(rng, batch_index)
  gate_rng, dropout_rng = jax.random.split(rng)
  rngs = {"gate": gate_rng, "dropout": dropout_rng, "layerdrop": jax.random.fold_in(rng, LAYERDROP_STREAM)}
  exit_nll_sum = None
  if early_exit:
    outs, variables = exits.layer_outputs(model.config, params, batch["inputs"], deterministic=deterministic,
                                          rngs=rngs, mutable=["gates"])
    exit_nll_sum = jnp.sum(exits.exit_nll(outs.logits, batch["targets"]), axis=(1, 2))  # [P]
    logits = outs.logits[-1]                                                 # [B, T, V] the model's
  else:
    logits, variables = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                                    mutable=["gates"], rngs=rngs)
  nll = token_nll(logits, batch["targets"])
  depth = executed_depth(variables.get("gates", {}), _plan(model))
  out = {"nll_sum": jnp.sum(nll), "count": jnp.asarray(nll.size, jnp.float32)}
  if exit_nll_sum is not None:
    out["exit_nll_sum"] = exit_nll_sum
  if depth is not None:
    out["depth_sum"] = jnp.sum(depth)
  if num_classes and "difficulty" in batch:
    onehot = jax.nn.one_hot(batch["difficulty"], num_classes, dtype=jnp.float32)
    out["class_nll_sum"] = jnp.einsum("bt,btc->c", nll, onehot)
    out["class_count"] = jnp.sum(onehot, axis=(0, 1))
    if depth is not None:
      out["class_depth_sum"] = jnp.einsum("bt,btc->c", depth, onehot)
  return out
