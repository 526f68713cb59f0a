"""Layer importance measures for static depth pruning (issue 13; Aussie AI survey, "static layer pruning").

Every measure is a function `(cfg, params, batches, ...)` of a model config, its params (loop or
scan layout) and calibration batches (`{'inputs', 'targets'}` [N, T], one dict or a list) and
returns `Scores`: `layer` [L] and, where the measure is defined per residual block, `block`
[L, 2] (index 0 = attention, 1 = FFN). **Sign convention: higher = more important** (prune
the lowest); `raw` keeps each paper's own quantity and `Scores.direction` says which way the
paper reads it.

  ratio    RR Eq. 1 (Dotzel et al. 2024): median over tokens of ‖R(x)‖₂/‖x‖₂, from the profiler's
           sown norms; per layer the median over the tokens of both its blocks. Paper: higher =
           the block changes the stream more. Same sign.
  bi       ShortGPT Block Influence (Men et al. 2024, Eq. 3): BI_i = 1 − E_t cos(x_{i,t}, x_{i+1,t}),
           layer (block) input vs output hidden state, averaged over tokens. Paper: remove lowest BI.
  angular  Gromov et al. 2024 §3.2: d(x^ℓ, x^{ℓ+n}) = arccos(cos(x^ℓ_T, x^{ℓ+n}_T))/π on the last
           token T of each sequence, averaged over sequences; prune layers ℓ* … ℓ*+n−1 with ℓ* the
           argmin. `layer` is d for n = 1 (higher = more important); `raw` has d for the given n.
  sleb     SLEB (Song et al. 2024, Alg. 1): greedy; each step removes the unit whose removal gives
           the lowest calibration NLL, recomputed after every removal. Returns the removal order;
           `layer`/`block` = the step at which a unit was removed (earlier = less important; units
           never removed score num_steps).
  ppl      Shortened LLaMA PPL criterion (Kim et al. 2024 §3.2): the calibration NLL (log PPL) of
           the model with unit i removed. Paper: remove the units whose removal gives the lowest
           PPL — the same sign (higher NLL without it = more important).
  taylor   Shortened LLaMA Taylor+ (Kim et al. 2024 §3.2): first-order loss change of zeroing a
           weight, |∂L/∂W ⊙ W|, summed over the unit's weights (`form='elementwise'`, the paper's
           Σ|w·g|) or |Σ w·g| (`form='sum'`). Paper: remove the lowest. "+" is the heuristic of
           never removing the first/last blocks (`skipjax.depth.prune --protect_first/last`).

Units are removed with execution plans (`skipjax.depth.plan`): one jitted forward per plan.
Hidden states are read by intercepting every `Block.__call__` (its input and output), under a
plan that runs each layer as two positions, attention then FFN, so the state between the two
blocks is seen too. Models with a non-identity plan are refused (measure the model it runs).
"""
import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import plan as plan_lib
from skipjax.models import layout
from skipjax.models.block import Block
from skipjax.profile import ratios as ratios_lib

MEASURES = ("ratio", "bi", "angular", "sleb", "ppl", "taylor")
GRANULARITIES = ("layer", "block")
BRANCHES = ("attn", "ffn")
# Parameters of a Block that belong to its attention / FFN branch (the rest, routers, to the layer).
BRANCH_PARAMS = {"ln_attn": 0, "attn": 0, "ls_attn": 0, "ln_ffn": 1, "mlp": 1, "ls_ffn": 1}
PAPER_DIRECTION = {
    "ratio": "higher ratio = larger update = more important (RR Eq. 1)",
    "bi": "remove the lowest Block Influence (ShortGPT)",
    "angular": "prune the n-block starting at argmin_l d(x^l, x^(l+n)) (Gromov et al.)",
    "sleb": "remove, greedily, the block whose removal gives the lowest NLL (SLEB)",
    "ppl": "remove the blocks whose removal gives the lowest PPL (Shortened LLaMA)",
    "taylor": "remove the lowest |dL/dW * W| sum (Shortened LLaMA Taylor+)",
}
Batches = Union[Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]]]
Unit = Union[int, Tuple[int, int]]  # a layer, or (layer, branch) with branch 0 = attn, 1 = ffn


@dataclasses.dataclass
class Scores:
  """Importance per layer [L] (and per block [L, 2]); higher = more important."""
  measure: str
  layer: np.ndarray
  block: Optional[np.ndarray] = None
  raw: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def direction(self) -> str:
    return PAPER_DIRECTION[self.measure]

  def to_json(self) -> Dict[str, Any]:
    out = {"measure": self.measure, "sign": "higher = more important", "paper": self.direction,
           "layer": np.asarray(self.layer).tolist()}
    if self.block is not None:
      out["block"] = np.asarray(self.block).tolist()
    out["raw"] = jax.tree.map(lambda v: np.asarray(v).tolist() if isinstance(v, (np.ndarray, jax.Array)) else v,
                              self.raw)
    return out


# -- model plumbing ----------------------------------------------------------------------------

def blocks_config(cfg) -> models.TransformerConfig:
  return cfg.transformer if isinstance(cfg, models.EncoderConfig) else cfg


def _replace_blocks(cfg, **changes):
  if isinstance(cfg, models.EncoderConfig):
    return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, **changes))
  return dataclasses.replace(cfg, **changes)


def measuring_config(cfg):
  """The loop-layout (scan_layers=False, remat=False) identity-plan config the measures run."""
  blocks = blocks_config(cfg)
  if blocks.skip.router == "random":
    raise ValueError("config.model.skip.router='random': importance measures need a deterministic model")
  if not plan_lib.is_identity(blocks.execution_plan, blocks.num_layers):
    raise ValueError(f"config.model.plan={blocks.plan!r}: importance measures need the identity plan "
                     "(prune a model that runs all of its layers)")
  return _replace_blocks(cfg, scan_layers=False, remat=False, plan="")


def loop_params(params) -> Dict[str, Any]:
  """Params unboxed, in the loop layout (`block_{i}`)."""
  return layout.to_loop(nn.meta.unbox(params))


def with_plan(cfg, plan: plan_lib.PlanLike):
  blocks = blocks_config(cfg)
  return _replace_blocks(cfg, plan=plan_lib.to_string(plan_lib.resolve(plan, blocks.num_layers)))


def as_batches(batches: Batches) -> List[Dict[str, np.ndarray]]:
  if isinstance(batches, Mapping):
    batches = [batches]
  batches = [dict(b) for b in batches]
  if not batches:
    raise ValueError("calibration: no batches")
  return batches


def _is_decoder(cfg) -> bool:
  return not isinstance(cfg, models.EncoderConfig)


def _apply_kwargs(cfg, batch) -> Dict[str, Any]:
  if not _is_decoder(cfg) and "attention_mask" in batch:
    return {"attention_mask": jnp.asarray(batch["attention_mask"])}
  return {}


def _token_weights(batch) -> np.ndarray:
  """[N, T] weights of the tokens to average over (attention_mask, else weights, else 1)."""
  for key in ("attention_mask", "weights"):
    if key in batch:
      return np.asarray(batch[key], np.float64)
  return np.ones(np.asarray(batch["inputs"]).shape[:2], np.float64)


def units(num_layers: int, granularity: str) -> List[Unit]:
  if granularity == "layer":
    return list(range(num_layers))
  if granularity == "block":
    return [(i, b) for i in range(num_layers) for b in range(2)]
  raise ValueError(f"--granularity={granularity!r} is not one of {GRANULARITIES}")


def removal_plan(num_layers: int, removed: Sequence[Unit]) -> plan_lib.Plan:
  """The plan without `removed` layers (ints) or blocks ((layer, branch)); a layer whose two
  blocks are both removed has no position."""
  off = {(u, b) for u in removed if isinstance(u, (int, np.integer)) for b in range(2)}
  off |= {tuple(u) for u in removed if not isinstance(u, (int, np.integer))}
  entries = tuple(plan_lib.PlanEntry(i, (i, 0) not in off, (i, 1) not in off) for i in range(num_layers))
  return plan_lib.validate(tuple(e for e in entries if e.runs), num_layers)


@functools.lru_cache(maxsize=256)
def _nll_fn(cfg, jit: bool = True):
  """(params, inputs, targets, weights) → (Σ weighted NLL, Σ weights), jitted once per config/plan
  (`jit=False`: eager, for tiny models where compiling each plan costs more than running it)."""
  model = models.build(cfg)

  def run(params, inputs, targets, weights):
    logits = model.apply({"params": params}, inputs)                         # [B, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]   # [B, T]
    return jnp.sum(nll * weights), jnp.sum(weights)
  return jax.jit(run) if jit else run


def _check_decoder(cfg, measure: str) -> None:
  if not _is_decoder(cfg):
    raise ValueError(f"--measure={measure} needs a language model (decoder); {cfg.model_type} has no NLL")


def calibration_nll(cfg, params, batches: Batches, plan: Optional[plan_lib.PlanLike] = None,
                    jit: bool = True) -> float:
  """Mean next-token NLL over the calibration tokens of the model run under `plan`."""
  _check_decoder(cfg, "ppl")
  run_cfg = measuring_config(cfg) if plan is None else with_plan(measuring_config(cfg), plan)
  fn = _nll_fn(run_cfg, jit)
  params = loop_params(params)
  total, count = 0.0, 0.0
  for b in as_batches(batches):
    s, c = fn(params, jnp.asarray(b["inputs"], jnp.int32), jnp.asarray(b["targets"], jnp.int32),
              jnp.asarray(_token_weights(b), jnp.float32))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1e-12)


@functools.lru_cache(maxsize=16)
def _hidden_fn(cfg):
  """Jitted (params, inputs, kwargs) → [P + 1, B, T, d]: the input of the first plan position,
  then the output of every position (Block.__call__ intercepted)."""
  model = models.build(cfg)

  def run(params, inputs, kwargs):
    seen = []

    def grab(next_fun, args, kw, context):
      out = next_fun(*args, **kw)
      if isinstance(context.module, Block) and context.method_name == "__call__":
        if not seen:
          seen.append(args[0])
        seen.append(out)
      return out
    with nn.intercept_methods(grab):
      model.apply({"params": params}, inputs, **kwargs)
    return jnp.stack([h.astype(jnp.float32) for h in seen])
  return jax.jit(run)


def split_plan(num_layers: int) -> plan_lib.Plan:
  """Each layer as two positions, attention then FFN (same forward as the identity plan)."""
  return tuple(plan_lib.PlanEntry(i, a, not a) for i in range(num_layers) for a in (True, False))


def hidden_states(cfg, params, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """[2L + 1, B, T, d] fp32: x_0 (input of layer 0), then after each attention and each FFN
  block, so layer i's input is [2i], its mid state [2i + 1], its output [2i + 2]."""
  cfg = measuring_config(cfg)
  blocks = blocks_config(cfg)
  if blocks.skip.router != "none" and blocks.skip.granularity == "layer":
    raise ValueError("config.model.skip.granularity='layer': a layer-routed model gates attention and FFN together, "
                     "so it has no state between them (hidden-state measures need a dense or block-routed model)")
  num_layers = blocks.num_layers
  # A split position leaves its off branch as identity (a post-LN 'ln' skip would add a norm).
  run_cfg = _replace_blocks(with_plan(cfg, split_plan(num_layers)), post_ln_skip="identity")
  return np.asarray(_hidden_fn(run_cfg)(loop_params(params), jnp.asarray(batch["inputs"]),
                                        _apply_kwargs(cfg, batch)))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """cos over the last axis, float64."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), np.finfo(np.float64).tiny)
  return np.clip(np.sum(a * b, axis=-1) / den, -1.0, 1.0)


# -- measures ----------------------------------------------------------------------------------

def residual_ratio(cfg, params, batches: Batches) -> Scores:
  """RR Eq. 1: median ‖R(x)‖₂/‖x‖₂ over tokens per block [L, 2]; per layer over both blocks."""
  cfg = measuring_config(cfg)
  model, p = models.build(cfg), loop_params(params)
  rs, masks = [], []
  for b in as_batches(batches):
    rs.append(ratios_lib.residual_ratios(model, p, jnp.asarray(b["inputs"]), jit=True, **_apply_kwargs(cfg, b)))
    masks.append(_token_weights(b) > 0)
  r, mask = np.concatenate(rs, axis=2), np.concatenate(masks, axis=0)      # [L, 2, N, T], [N, T]
  block = ratios_lib.per_block(r, mask)["median"]                             # [L, 2]
  layer = np.median(r[..., mask].reshape(r.shape[0], -1), axis=-1)          # [L]
  return Scores("ratio", layer, block, {"median_ratio_block": block, "median_ratio_layer": layer})


def block_influence(cfg, params, batches: Batches) -> Scores:
  """ShortGPT Eq. 3: BI_i = 1 − E_t cos(x_i,t, x_{i+1},t) per layer, and per block (attention:
  layer input vs mid state, FFN: mid state vs layer output)."""
  sums, count = None, 0.0
  for b in as_batches(batches):
    h = hidden_states(cfg, params, b)                                         # [2L+1, B, T, d]
    w = _token_weights(b)                                                     # [B, T]
    cos_block = _cosine(h[:-1], h[1:])                                        # [2L, B, T]
    cos_layer = _cosine(h[:-2:2], h[2::2])                                    # [L, B, T]
    s = np.concatenate([(cos_block * w).sum((1, 2)), (cos_layer * w).sum((1, 2))])
    sums, count = (s if sums is None else sums + s), count + w.sum()
  mean_cos = sums / count
  num_layers = len(mean_cos) // 3
  block = 1.0 - mean_cos[:2 * num_layers].reshape(num_layers, 2)
  layer = 1.0 - mean_cos[2 * num_layers:]
  return Scores("bi", layer, block, {"bi_layer": layer, "bi_block": block})


def _last_valid(batch) -> np.ndarray:
  w = _token_weights(batch) > 0
  return w.shape[1] - 1 - np.argmax(w[:, ::-1], axis=1)                      # [B]


def angular_distances(cfg, params, batches: Batches, n: int = 1) -> np.ndarray:
  """Gromov et al. §3.2: d(x^ℓ, x^{ℓ+n}) = arccos(cos)/π of the last token, averaged over
  sequences, for ℓ = 0 … L − n → [L − n + 1] (x^ℓ is the input of layer ℓ)."""
  num_layers = blocks_config(cfg).num_layers
  if not 1 <= n <= num_layers:
    raise ValueError(f"angular distance over n={n} layers: the model has {num_layers}")
  sums, count = np.zeros(num_layers - n + 1), 0
  for b in as_batches(batches):
    h = hidden_states(cfg, params, b)[::2]                                    # [L+1, B, T, d]
    last = h[:, np.arange(h.shape[1]), _last_valid(b)]                        # [L+1, B, d]
    d = np.arccos(_cosine(last[:-n], last[n:])) / np.pi                       # [L-n+1, B]
    sums, count = sums + d.sum(1), count + d.shape[1]
  return sums / count


def angular_distance(cfg, params, batches: Batches, n: int = 1) -> Scores:
  """`layer`: d for single layers (n = 1); `raw`: d over n-layer blocks and ℓ* = argmin."""
  single = angular_distances(cfg, params, batches, 1)
  blocks = single if n == 1 else angular_distances(cfg, params, batches, n)
  start = int(np.argmin(blocks))
  return Scores("angular", single, None, {"n": n, "distances": blocks, "start": start,
                                          "layers": list(range(start, start + n))})


def best_start(cfg, params, batches: Batches, n: int) -> int:
  """Gromov et al.: ℓ* = argmin_ℓ d(x^ℓ, x^{ℓ+n}); prune layers ℓ* … ℓ* + n − 1."""
  return int(np.argmin(angular_distances(cfg, params, batches, n)))


def _unit_key(u: Unit):
  return int(u) if isinstance(u, (int, np.integer)) else [int(u[0]), BRANCHES[u[1]]]


def _unit_scores(num_layers: int, granularity: str, values: Dict[Unit, float], default: float):
  """{unit: value} → (layer [L], block [L, 2] or None); a layer's score at block granularity
  is the larger of its blocks'."""
  if granularity == "layer":
    return np.asarray([values.get(i, default) for i in range(num_layers)], np.float64), None
  block = np.asarray([[values.get((i, b), default) for b in range(2)] for i in range(num_layers)], np.float64)
  return block.max(1), block


def ppl_drop_one(cfg, params, batches: Batches, granularity: str = "layer", jit: bool = True) -> Scores:
  """Shortened LLaMA PPL criterion: calibration NLL with unit i removed (higher = more important)."""
  _check_decoder(cfg, "ppl")
  num_layers = blocks_config(cfg).num_layers
  nll = {u: calibration_nll(cfg, params, batches, removal_plan(num_layers, [u]), jit)
         for u in units(num_layers, granularity)}
  layer, block = _unit_scores(num_layers, granularity, nll, np.nan)
  base = calibration_nll(cfg, params, batches, jit=jit)
  return Scores("ppl", layer, block, {"granularity": granularity, "base_nll": base,
                                      "nll_without": layer if block is None else block})


def sleb(cfg, params, batches: Batches, num_remove: int, granularity: str = "layer",
         candidates: Optional[Sequence[Unit]] = None, jit: bool = True) -> Scores:
  """SLEB Alg. 1: greedy removal by lowest calibration NLL, re-evaluated after each removal.

  `raw['order']` is the removal order (layers, or [layer, 'attn'|'ffn']), `raw['nll']` the NLL
  after each step. Block granularity treats each attention / FFN block as a unit.
  """
  _check_decoder(cfg, "sleb")
  num_layers = blocks_config(cfg).num_layers
  pool = [u if isinstance(u, (int, np.integer)) else tuple(u) for u in
          (units(num_layers, granularity) if candidates is None else candidates)]
  if not 0 <= num_remove <= len(pool) or (granularity == "layer" and num_remove >= num_layers):
    raise ValueError(f"--drop={num_remove}: SLEB can remove 0 … {min(len(pool), num_layers - 1)} "
                     f"{granularity}s of this model")
  removed, nlls = [], []
  for _ in range(num_remove):
    trial = {}
    for u in pool:
      if u in removed:
        continue
      try:
        plan = removal_plan(num_layers, removed + [u])
      except ValueError:  # nothing left to run
        continue
      trial[u] = calibration_nll(cfg, params, batches, plan, jit)
    best = min(trial, key=lambda u: (trial[u], str(u)))
    removed.append(best)
    nlls.append(trial[best])
  step = {u: float(k) for k, u in enumerate(removed)}
  layer, block = _unit_scores(num_layers, granularity, step, float(num_remove))
  return Scores("sleb", layer, block, {"granularity": granularity, "order": [_unit_key(u) for u in removed],
                                       "nll": nlls, "base_nll": calibration_nll(cfg, params, batches, jit=jit)})


@functools.lru_cache(maxsize=8)
def _grad_fn(cfg):
  model = models.build(cfg)

  def loss(params, inputs, targets, weights):
    logits = model.apply({"params": params}, inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights)
  return jax.jit(jax.grad(loss))


def loss_gradients(cfg, params, batches: Batches) -> Dict[str, Any]:
  """∂L/∂W of the mean calibration NLL L (all tokens of all batches), loop layout."""
  _check_decoder(cfg, "taylor")
  cfg = measuring_config(cfg)
  p = loop_params(params)
  batches = as_batches(batches)
  count = sum(float(_token_weights(b).sum()) for b in batches)
  grads = None
  for b in batches:
    g = _grad_fn(cfg)(p, jnp.asarray(b["inputs"], jnp.int32), jnp.asarray(b["targets"], jnp.int32),
                      jnp.asarray(_token_weights(b), jnp.float32))
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return jax.tree.map(lambda g: g / count, grads)


def taylor(cfg, params, batches: Batches, form: str = "elementwise") -> Scores:
  """Shortened LLaMA Taylor: per unit Σ_w |w·∂L/∂w| ('elementwise', the paper) or |Σ_w w·∂L/∂w|
  ('sum'); both are in `raw`, `form` picks the score."""
  if form not in ("elementwise", "sum"):
    raise ValueError(f"taylor form={form!r} is not 'elementwise' or 'sum'")
  grads = loss_gradients(cfg, params, batches)
  p = loop_params(params)
  num_layers = blocks_config(cfg).num_layers
  elem, signed = np.zeros((num_layers, 3)), np.zeros((num_layers, 3))  # columns: attn, ffn, other
  for i in range(num_layers):
    name = layout.block_name(i)
    for key, sub in p[name].items():
      col = BRANCH_PARAMS.get(key, 2)
      for w, g in zip(jax.tree.leaves(sub), jax.tree.leaves(grads[name][key])):
        wg = np.asarray(w, np.float64) * np.asarray(g, np.float64)
        elem[i, col] += np.abs(wg).sum()
        signed[i, col] += wg.sum()
  raw = {"form": form, "elementwise_layer": elem.sum(1), "elementwise_block": elem[:, :2],
         "sum_layer": np.abs(signed.sum(1)), "sum_block": np.abs(signed[:, :2])}
  return Scores("taylor", raw[f"{form}_layer"], raw[f"{form}_block"], raw)


def measure(name: str, cfg, params, batches: Batches, granularity: str = "layer", num_remove: int = 1,
            **kwargs) -> Scores:
  """Dispatch by `--measure` name."""
  if name == "ratio":
    return residual_ratio(cfg, params, batches)
  if name == "bi":
    return block_influence(cfg, params, batches)
  if name == "angular":
    return angular_distance(cfg, params, batches, n=num_remove)
  if name == "sleb":
    return sleb(cfg, params, batches, num_remove, granularity, **kwargs)
  if name == "ppl":
    return ppl_drop_one(cfg, params, batches, granularity, **kwargs)
  if name == "taylor":
    return taylor(cfg, params, batches, **kwargs)
  raise ValueError(f"--measure={name!r} is not one of {MEASURES}")
