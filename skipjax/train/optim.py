"""Optimizers and learning-rate schedules."""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_cosine(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, cosine decay to `min_lr_ratio·learning_rate`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.num_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def constant_then_rsqrt(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """LtS §3: lr constant for the first `warmup_steps`, then lr·sqrt(warmup/step)."""
  warm = max(cfg.warmup_steps, 1)
  return lambda step: cfg.learning_rate * jnp.sqrt(warm / jnp.maximum(step + 1.0, warm))


def adafactor(schedule: optax.Schedule, decay: float) -> optax.GradientTransformation:
  """Adafactor with β1 = 0 and a *constant* second-moment decay β2 (LtS §3 uses 0.99).

  optax.adafactor's decay is the step-dependent 1 - t^-0.8, so the chain is spelled out with
  a constant `decay_rate_fn`; the remaining steps follow Shazeer & Stern 2018 (update clipping
  at block RMS 1, relative step size scaled by the parameter RMS).
  """
  return optax.chain(
      optax.scale_by_factored_rms(decay_rate=decay, decay_rate_fn=lambda step, rate: rate),
      optax.clip_by_block_rms(1.0),
      optax.scale_by_learning_rate(schedule, flip_sign=False),
      optax.scale_by_param_block_rms(),
      optax.scale(-1.0))


def is_router_path(path) -> bool:
  """Whether a parameter's key path belongs to a router ('router' in its '/'-joined path)."""
  return "router" in jax.tree_util.keystr(path)


def scale_router_updates(multiplier: float) -> optax.GradientTransformation:
  """Multiply the updates of router parameters (`is_router_path`) by `multiplier`, i.e. a router
  learning rate of multiplier × lr (weight decay included, as optax scales it by lr); stateless."""
  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(multiplier, u.dtype) if is_router_path(path) else u, updates)
    return scaled, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict):
  """`config.train` → (GradientTransformation, schedule)."""
  if cfg.optimizer == "adamw":
    schedule = warmup_cosine(cfg)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == "adafactor":
    schedule = constant_then_rsqrt(cfg)
    tx = adafactor(schedule, cfg.adafactor_decay)
  else:
    raise ValueError(f"config.train.optimizer={cfg.optimizer!r} is not one of adamw, adafactor")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  router_lr = cfg.get("router_lr_multiplier", 1.0)
  if router_lr != 1.0:  # (1.0 keeps the optimizer state tree of earlier runs)
    tx = optax.chain(tx, scale_router_updates(router_lr))
  trainable = cfg.get("trainable", "")
  if trainable:
    # Frozen parameters get zero updates (and no optimizer state); clipping sees trainable grads only.
    from skipjax.train.init_from import trainable_labels  # pylint: disable=import-outside-toplevel
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               lambda params: trainable_labels(trainable, params))
  return tx, schedule
