"""The training loop: config → data → model → sharded step → metrics / checkpoints / plots."""
import functools
import json
import math
import os
import sys
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from skipjax import data as data_lib
from skipjax import models, plots, routing, validation
from skipjax.depth import exits as exits_lib, plan as plan_lib
from skipjax.train import checkpoint as checkpoint_lib
from skipjax.train import init_from as init_from_lib
from skipjax.train import metrics as metrics_lib
from skipjax.train import optim, sharding, state as state_lib, step as step_lib
from skipjax.train import workdir as workdir_lib

VOCAB_MULTIPLE = 64


def resolve_vocab(config: ml_collections.ConfigDict, data_vocab: int) -> None:
  """`config.model.vocab_size=0` → the data's vocabulary rounded up to a multiple of 64."""
  with config.unlocked():
    if config.model.vocab_size == 0:
      config.model.vocab_size = -(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  if config.model.vocab_size < data_vocab:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the data's "
                     f"vocabulary ({data_vocab} tokens from config.data.source={config.data.source!r})")


def device_batch(batch: Dict[str, np.ndarray], batch_sharding) -> Dict[str, jax.Array]:
  """Global host batch → sharded arrays; each process contributes its slice of rows."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding)
  rows = next(iter(batch.values())).shape[0] // jax.process_count()
  lo = jax.process_index() * rows
  return {k: jax.make_array_from_process_local_data(batch_sharding, v[lo:lo + rows]) for k, v in batch.items()}


class NonFinite(Exception):
  """Raised inside the loop; turned into FloatingPointError once the checkpointer has closed."""

  def __init__(self, step: int, what: str):
    super().__init__(step, what)
    self.step, self.what = step, what


def _check_metrics(step: int, metrics: Dict[str, jax.Array]) -> None:
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise NonFinite(step, f"training loss (loss={loss}, grad_norm={grad_norm})")


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _check_params(step: int, params) -> None:
  """The state about to be saved: an update can make weights non-finite at a finite loss."""
  if not bool(_all_finite(params)):
    raise NonFinite(step, "parameters after the update")


def _stopped_message(error: NonFinite, ckpt: checkpoint_lib.Checkpointer) -> str:
  committed = ckpt.committed_steps()  # after close(): every save has committed or failed
  last = (f"the last good checkpoint is step {committed[-1]} in {ckpt.directory}" if committed
          else f"no checkpoint was committed in {ckpt.directory}")
  return (f"non-finite {error.what} at step {error.step}; stopped, {last} (a non-finite state is never saved; "
          f"check config.train.learning_rate, weight_decay and grad_clip)")


# Stream id folded into the run's seed key to derive the eval gate key (step.eval_rng folds in the batch).
EVAL_STREAM = 0x4556


def evaluate(eval_fn, params, eval_ds, num_batches: int, batch_sharding,
             rng: Optional[jax.Array] = None) -> Dict[str, float]:
  """Held-out perplexity (and per-difficulty-class loss when the data has classes) and, when the
  model routes, `eval_executed_depth`: mean layers executed per token (`step.executed_depth`;
  `eval_depth` is the same number under its older name). `eval_fn(params, batch, rng, i)` is
  `step.eval_step`: batch i draws its gates from `step.eval_rng(rng, i)` (default rng: key 0)."""
  totals: Dict[str, np.ndarray] = {}
  rng = jax.random.key(0) if rng is None else rng
  n = min(num_batches, eval_ds.num_batches) if eval_ds.num_batches else num_batches
  for i in range(n):
    batch = {k: v for k, v in eval_ds.batch(i).items() if k in ("inputs", "targets", "difficulty")}
    out = jax.device_get(eval_fn(params, device_batch(batch, batch_sharding), rng, jnp.asarray(i, jnp.int32)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
  loss = float(totals["nll_sum"] / totals["count"])
  result = {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}
  if "depth_sum" in totals:
    result["eval_executed_depth"] = result["eval_depth"] = float(totals["depth_sum"] / totals["count"])
  for p, exit_sum in enumerate(totals.get("exit_nll_sum", ())):  # config.train.early_exit: every exit
    result[f"eval_exit_loss_{p}"] = float(exit_sum / totals["count"])
  if "class_nll_sum" in totals:
    for c, name in enumerate(data_lib.DIFFICULTY_CLASSES):
      if totals["class_count"][c] > 0:
        result[f"eval_loss_{name}"] = float(totals["class_nll_sum"][c] / totals["class_count"][c])
        if "class_depth_sum" in totals:
          result[f"eval_depth_{name}"] = float(totals["class_depth_sum"][c] / totals["class_count"][c])
  return result


def _position_densities(record: Dict[str, float], plan) -> list:
  """Routed fraction of each plan position from the logged densities (`step.routing_metrics`: one
  row per position that ran the gate): `layer_density` (layer routing), else the FFN's
  `ffn_density` where the FFN runs and `attn_density` elsewhere (block / FFN routing); 1.0 where
  nothing was logged."""
  rows = {name: iter(record[name]) for name in ("layer_density", "attn_density", "ffn_density") if name in record}
  out = []
  for e in plan:
    ran = {"layer_density": e.runs, "attn_density": e.attn, "ffn_density": e.ffn}
    values = {name: float(next(it)) for name, it in rows.items() if ran[name]}  # consumes this position's rows
    out.append(values.get("layer_density", values.get("ffn_density", values.get("attn_density", 1.0))))
  return out


def flops_per_token(config: ml_collections.ConfigDict, record: Dict[str, float]) -> Optional[float]:
  """Analytic forward FLOPs/token at the logged densities (routing.flops_per_token), counting each
  position of `config.model.plan` with the branches it runs (plan_lib.branch_flags)."""
  m = config.model
  plan = plan_lib.parse(m.get("plan", ""), m.num_layers)
  attn, ffn = plan_lib.branch_flags(plan)
  return float(routing.flops_per_token(
      np.asarray(_position_densities(record, plan)), d_model=m.d_model,
      d_ff=models.config.FFNConfig.from_dict(m.get("ffn", None)).hidden(m.d_model, m.d_ff), seq_len=config.data.seq_len,
      num_heads=m.num_heads, head_dim=m.head_dim or None, ffn_matrices=3 if m.get("mlp_gated", False) else 2,
      causal=True, router=m.skip.router != "none", vocab_size=m.vocab_size, attn=attn, ffn=ffn))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Train `config` in `workdir`, resuming from its latest intact checkpoint if there is one.

  The workdir is locked for the run (a second run in it is refused); a resume whose config
  differs from the stored config.json outside `workdir_lib.RESUME_MAY_CHANGE` is refused before
  anything is written; with `config.init_from` a fresh run starts from another model's weights.
  """
  if config.get("init_from"):  # the rest is validated once the source's model config is applied
    validation.validate_train(config.train)
    init_from_lib.source_kind(config.init_from)
  else:
    validation.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _prepare_config(config: ml_collections.ConfigDict, workdir: str):
  """init_from model config, resume check (before anything is written), data, vocab.

  Returns (train_ds, eval_ds)."""
  stored = workdir_lib.read_config(workdir)
  resuming = bool(checkpoint_lib.Checkpointer.committed_steps_in(workdir))
  if config.get("init_from"):
    # A resumed run continues from its own checkpoint: its architecture is the stored one.
    same = resuming and stored is not None and stored.get("init_from") == config.init_from
    init_from_lib.apply_model_config(config, stored["model"] if same else None)
    validation.validate(config, jax.device_count())
  if resuming and stored is not None:
    auto_vocab = ("model.vocab_size",) if config.model.vocab_size == 0 else ()  # resolved from the data below
    workdir_lib.check_resume(workdir, stored, config, ignore=auto_vocab)
  elif stored is not None:
    logging.info("%s has a config.json but no checkpoint (a run stopped before its first save): starting over",
                 workdir)
  train_ds = data_lib.get_dataset(config.data, split="train", seed=config.seed, workdir=workdir)
  eval_ds = data_lib.get_dataset(config.data, split="eval", seed=config.seed, workdir=workdir)
  resolve_vocab(config, train_ds.vocab_size)
  validation.validate_mesh(config, jax.device_count())
  if resuming and stored is not None:
    workdir_lib.check_resume(workdir, stored, config)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config)
  return train_ds, eval_ds


def _train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  train_ds, eval_ds = _prepare_config(config, workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config.model)
  tx, schedule = optim.make_optimizer(config.train)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  example = jnp.zeros((1, config.data.seq_len), jnp.int32)
  state, state_shardings = state_lib.create_train_state(model, tx, init_rng, example, mesh)
  num_params, num_trainable = init_from_lib.parameter_counts(config.train.trainable, state.params)
  if num_trainable == 0:
    raise ValueError(f"config.train.trainable={config.train.trainable!r} matches no parameter (paths look like "
                     f"{init_from_lib.example_paths(state.params)})")
  logging.info("parameters: %d total, %d trainable", num_params, num_trainable)

  ckpt = checkpoint_lib.Checkpointer(workdir, config.train.checkpoint_every_steps, config.train.keep_checkpoints)
  writer = None
  try:
    restored = ckpt.restore_latest_intact(state_lib.abstract_like(state, state_shardings))
    if restored is not None:
      state = restored
      logging.info("resumed from checkpoint step %d in %s", int(jax.device_get(state.step)), ckpt.directory)
    elif config.get("init_from"):
      state = state.replace(params=init_from_lib.overlay_params(config.init_from, state.params,
                                                                state_shardings.params,
                                                                getattr(model.config, "execution_plan", None)))
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, tensorboard_events=is_main)
    last = _loop(config, model, tx, schedule, state, state_shardings, mesh, train_rng, train_ds, eval_ds, ckpt,
                 writer, start, {"num_params": num_params, "num_trainable_params": num_trainable})
  except NonFinite as e:
    ckpt.close()
    raise FloatingPointError(_stopped_message(e, ckpt)) from None
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  if is_main:
    records = metrics_lib.read_metrics(workdir)
    plots.loss_curve(records, os.path.join(workdir, "plots", "loss.png"))
    if any("eval_depth_hard" in r for r in records):
      plots.depth_by_class(records, data_lib.DIFFICULTY_CLASSES, os.path.join(workdir, "plots", "depth_by_class.png"))
  return last


def _loop(config, model, tx, schedule, state, state_shardings, mesh, train_rng, train_ds, eval_ds, ckpt, writer,
          start: int, constants: Dict[str, float]) -> Dict[str, float]:
  is_main = jax.process_index() == 0
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  early_exit = exits_lib.EarlyExitConfig.from_config(config.train.get("early_exit", None))
  p_train = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, early_exit=early_exit,
                                      num_steps=config.train.num_steps),
                    in_shardings=(state_shardings, batch_sharding, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  p_eval = jax.jit(functools.partial(step_lib.eval_step, model=model, num_classes=len(data_lib.DIFFICULTY_CLASSES),
                                     early_exit=early_exit.enabled),
                   in_shardings=(state_shardings.params, batch_sharding, replicated, replicated),
                   out_shardings=replicated)
  eval_rng = jax.random.fold_in(jax.random.key(config.seed), EVAL_STREAM)

  cfg = config.train
  tokens_per_step = config.data.batch_size * config.data.seq_len
  bar = tqdm(total=cfg.num_steps, initial=start, disable=not (cfg.progress_bar and sys.stderr.isatty()),
             desc="train", unit="step")
  pending = None
  last: Dict[str, float] = {}
  t0, t0_step = time.time(), start
  for i in range(start, cfg.num_steps):
    step = i + 1
    batch = {k: v for k, v in train_ds.batch(i).items() if k in ("inputs", "targets")}
    state, metrics = p_train(state, device_batch(batch, batch_sharding), train_rng)
    if pending is not None:  # checked one step late so the host never stalls the device
      _check_metrics(*pending)
    pending = (step, metrics)
    bar.update(1)
    do_log = step % cfg.log_every_steps == 0 or step == cfg.num_steps
    do_eval = step % cfg.eval_every_steps == 0 or step == cfg.num_steps
    do_save = ckpt.should_save(step) or step == cfg.num_steps
    if not (do_log or do_eval or do_save):
      continue
    _check_metrics(*pending)
    pending = None
    record = {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
    if do_log:
      elapsed = time.time() - t0
      record["learning_rate"] = float(schedule(i))
      record["steps_per_sec"] = (step - t0_step) / max(elapsed, 1e-9)
      record["tokens_per_sec"] = record["steps_per_sec"] * tokens_per_step
      record["flops_per_token"] = flops_per_token(config, record)
      record.update(constants)
      t0, t0_step = time.time(), step
    if do_save:
      _check_params(step, state.params)
    if do_eval:
      record.update(evaluate(p_eval, state.params, eval_ds, cfg.eval_batches, batch_sharding, eval_rng))
    if do_log or do_eval:
      last = record
      if is_main:
        writer.write(step, record)
      bar.set_postfix(loss=f"{record['loss']:.3f}")
      logging.info("step %d: %s", step, json.dumps(
          {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}))
    if do_save:
      ckpt.save(step, state, force=step == cfg.num_steps)
  bar.close()
  return last
