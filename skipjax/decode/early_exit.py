"""Early exit in KV-cache decoding: per-token exits, KV policies, per-example exits (issue 14).

A token runs the plan positions 0 … e and exits after position e, where the first exit position
whose confidence c_e ≥ λ (CALM, Schuster et al. 2022 §3: local confidence measures) — or the
last one. Its prediction is the shared head (final norm + LM head) of the state after e
(LayerSkip §4.2 / CALM §3). Early exit is a gate carried from layer to layer (DESIGN.md): the
still-active mask; a token that exited keeps its state (identity layers), and the plan walk
calls `_Hook` at every position (`Transformer(..., depth_hook=)`), so the model's own blocks
and head run — no second model.

Decisions (`ExitRule`): a measure of `skipjax.routing.exit` (softmax_max, top2_margin, entropy —
normalised to [0, 1] here so one λ scale fits —, saturation), `learned` (one linear head per
exit position, `skipjax.depth.exit_heads`), or `fixed` ("always exit at N"); a minimum exit
position, exits only every k-th position, and CALM's position-decaying threshold.

KV-cache policies for the positions a token did not run (`policy`):
  * `propagate` — CALM's state propagation: the exited state h_e is the input of every later
    position, whose K/V are projected from it (the K/V write of a skipped layer in LtS Alg. 2 is
    the same rule: its input is the unchanged state). Later tokens read those approximate K/V.
  * `recompute` — the K/V are left missing and computed when a later token first runs that
    position: the missing earlier tokens (a contiguous run of the most recent ones, since a
    token completes every earlier token up to its own depth) run the position in one chunk with
    the current token (causal within the chunk, `MultiHeadAttention.decode_step` with a write
    mask), from their stored states. Every cached K/V is then the full model's. The chunk holds
    the last `max_pending` tokens: a token whose oldest window entry is still incomplete runs
    every position (flushing the window), so nothing is ever left missing.
  * `full` — every position runs for every token (the K/V are the full model's; nothing saved);
    only the prediction exits. The same tokens as `recompute` when its window never forces a token
    deeper (max_pending ≥ the tokens generated): the upper bound on quality for the exit rule.

Batches: each row exits at its own position (no whole-batch minimum as in CALM's
implementation); a position's compute runs under `nn.cond` only while some row is still active
(`propagate`: the skipped branch writes only the K/V; `recompute`: the chunk runs only while
some row has a missing token at that position). Shapes are static.

`exit_forward` is the teacher-forced counterpart (a full forward over given tokens with the same
hook): per-token exits and the logits at the exit, for perplexity against the mean exit position.
"""
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.decode import generation
from skipjax.routing import exit as exit_lib

Params = Any
POLICIES = ("propagate", "recompute", "full")
MEASURES = exit_lib.MEASURES + ("learned", "fixed")


@dataclasses.dataclass(frozen=True)
class ExitRule:
  """When a token exits (static, hashable).

  measure: one of MEASURES; threshold: λ (exit where c ≥ λ; `fixed` ignores it);
  min_layer: the first plan position that may exit; every: only positions p with (p + 1) % every
  == 0 may exit (the last position always ends the token); decay_tau: None for a constant λ,
  else CALM's decaying threshold λ_t = clip(0.9 λ + 0.1 exp(−τ t / N)) over the generated
  token t of N (`routing.exit.decaying_threshold`); fixed_layer: `fixed` exits at this position.
  """
  measure: str = "softmax_max"
  threshold: float = 0.9
  min_layer: int = 0
  every: int = 1
  decay_tau: Optional[float] = None
  fixed_layer: int = 0

  def validate(self, num_positions: int, exit_heads=None) -> "ExitRule":
    if self.measure not in MEASURES:
      raise ValueError(f"exit measure={self.measure!r} is not one of {MEASURES}")
    if not 0 <= self.min_layer < num_positions:
      raise ValueError(f"exit min_layer={self.min_layer}: must be in 0..{num_positions - 1} (plan positions)")
    if self.every < 1:
      raise ValueError(f"exit every={self.every}: must be ≥ 1")
    if self.measure == "fixed" and not 0 <= self.fixed_layer < num_positions:
      raise ValueError(f"exit fixed_layer={self.fixed_layer}: must be in 0..{num_positions - 1} (plan positions)")
    if self.decay_tau is not None and self.decay_tau < 0:
      raise ValueError(f"exit decay_tau={self.decay_tau}: must be ≥ 0")
    if self.measure == "learned":
      if exit_heads is None:
        raise ValueError("exit measure='learned' needs exit_heads (skipjax.depth.exit_heads)")
      if np.shape(exit_heads["w"])[0] != num_positions:
        raise ValueError(f"exit_heads have {np.shape(exit_heads['w'])[0]} heads for {num_positions} plan positions")
    return self

  def can_exit(self, p: int, num_positions: int) -> bool:
    """Whether position p decides (the last position ends every token anyway)."""
    if p >= num_positions - 1:
      return False
    if self.measure == "fixed":
      return p == self.fixed_layer
    return p >= self.min_layer and (p + 1) % self.every == 0

  def threshold_at(self, t, num_new: int, threshold=None) -> jnp.ndarray:
    """λ_t for generated token t of `num_new` (constant without `decay_tau`); `threshold`
    (possibly traced) replaces `self.threshold`."""
    lam = self.threshold if threshold is None else threshold
    if self.decay_tau is None:
      return jnp.asarray(lam, jnp.float32)
    return exit_lib.decaying_threshold(lam, t, max(num_new, 1), self.decay_tau)


def _confidence(rule: ExitRule, p: int, head, h_prev, h, exit_heads) -> jnp.ndarray:
  """c_p [B, T] of the state h [B, T, d] after position p (h_prev: its input)."""
  if rule.measure == "fixed":
    return jnp.ones(h.shape[:2], jnp.float32)                                       # exits at fixed_layer
  if rule.measure == "saturation":
    return exit_lib.saturation(jnp.stack([h_prev, h]))[0]                           # [B, T]
  if rule.measure == "learned":
    w, b = jnp.asarray(exit_heads["w"][p], jnp.float32), jnp.asarray(exit_heads["b"][p], jnp.float32)
    return jax.nn.sigmoid(jnp.einsum("btd,d->bt", head.norm(h).astype(jnp.float32), w) + b)
  logits = head.logits(h)                                                           # [B, T, V]
  if rule.measure == "entropy":
    return exit_lib.entropy(logits, normalized=True)
  return exit_lib.confidence(rule.measure, logits=logits)


class _Hook:
  """The early-exit gate through one apply (`Transformer(..., depth_hook=self)`).

  Tokens [B, T]: T = 1 while decoding, the sequence for `exit_forward`. `allow` [B, T] bool:
  tokens that may exit early. After the apply: `layer` [B, T] exit position, `confidence`
  [B, T], `ran` [P, B, T] positions each token ran; with `recompute` also the updated window
  (`hist`, `depth`) and `recomputed` [B] block runs spent on earlier tokens.
  """

  def __init__(self, rule: ExitRule, policy: str, num_positions: int, threshold, exit_heads, allow,
               window=None):
    self.rule, self.policy, self.num_positions = rule, policy, num_positions
    self.threshold, self.exit_heads, self.allow = threshold, exit_heads, allow
    self.window = window  # recompute: (hist [B, S, d], depth [B, S], start, cur, index); see _window_step
    self.active = jnp.ones(allow.shape, bool)                                        # [B, T]
    self.layer = jnp.full(allow.shape, num_positions - 1, jnp.int32)
    self.confidence = jnp.zeros(allow.shape, jnp.float32)
    self.h_exit = None
    self.ran = []
    self.recomputed = jnp.zeros(allow.shape[:1], jnp.int32)

  def __call__(self, pos, x, head):
    p = pos.position
    if p == 0 and self.window is not None:
      x = self._open_window(x)                                                       # [B, C, d]
    prev = self._current(x)                                                          # [B, T, d]
    if self.h_exit is None:
      self.h_exit = prev
    active = self.active
    self.ran.append(jnp.ones_like(active) if self.policy == "full" else active)
    if self.policy == "full":
      x = pos.run(pos.block, x)
    elif self.window is not None:
      x = self._recompute(pos, x, active)
    elif pos.index is not None:  # propagate while decoding: all exited -> only the K/V of the frozen state
      kv = lambda blk, h: blk.decode(h, pos.index, pos.entry.slot, pos.entry.branches, pos.repeat, kv_only=True)
      y = nn.cond(jnp.any(active), pos.run, kv, pos.block, x)
      x = jnp.where(active[..., None], y, x)
    else:
      x = jnp.where(active[..., None], pos.run(pos.block, x), x)
    h = self._current(x)
    if self.rule.can_exit(p, self.num_positions):
      self._decide(p, head, prev, h)
    if p == self.num_positions - 1:
      last = active
      if self.rule.measure != "fixed":  # the confidence of tokens that ran every position
        c = _confidence(self.rule, p, head, prev, h, self.exit_heads)
        self.confidence = jnp.where(last, c, self.confidence)
      self.h_exit = jnp.where(last[..., None], h, self.h_exit)
      if self.window is not None:
        self._close_window(x)
      return self.h_exit
    return x

  def _decide(self, p, head, prev, h):
    """Rows still active whose confidence passes λ exit after position p."""
    active = self.active
    c = jax.lax.cond(jnp.any(active), lambda: _confidence(self.rule, p, head, prev, h, self.exit_heads),
                     lambda: jnp.zeros(active.shape, jnp.float32))                   # [B, T]
    exits = active & self.allow & (c >= self.threshold)
    self.layer = jnp.where(exits, p, self.layer)
    self.confidence = jnp.where(exits, c, self.confidence)
    self.h_exit = jnp.where(exits[..., None], h, self.h_exit)
    self.active = active & ~exits

  # -- recompute: the window of the last tokens --------------------------------------------

  def _current(self, x):
    if self.window is None:
      return x
    return jax.lax.dynamic_slice_in_dim(x, self.window["cur"], 1, axis=1)             # [B, 1, d]

  def _open_window(self, x):
    w = self.window
    chunk = jax.lax.dynamic_slice_in_dim(w["hist"], w["start"], w["size"], axis=1)   # [B, C, d]
    w["depth_c"] = jax.lax.dynamic_slice_in_dim(w["depth"], w["start"], w["size"], axis=1)  # [B, C]
    w["slots"] = w["start"] + jnp.arange(w["size"], dtype=jnp.int32)                 # [C]
    w["depth_c"] = jnp.where(w["slots"][None, :] == w["index"], 0, w["depth_c"])
    return jax.lax.dynamic_update_slice_in_dim(chunk, x.astype(chunk.dtype), w["cur"], axis=1)

  def _recompute(self, pos, x, active):
    """Position p for the current token and every earlier token of the window still missing it."""
    w, p = self.window, pos.position
    act = active[:, 0]                                                               # [B]
    slots = w["slots"][None, :]                                                      # [1, C]
    missing = (w["depth_c"] <= p) & (slots < w["index"]) & act[:, None]              # [B, C]
    write = missing | ((slots == w["index"]) & act[:, None])                         # [B, C]
    blk_args = (pos.entry.slot, pos.entry.branches, pos.repeat)

    def single(blk, h):
      cur = jax.lax.dynamic_slice_in_dim(h, w["cur"], 1, axis=1)                      # [B, 1, d]
      y = blk.decode(cur, w["index"], *blk_args, write_mask=act[:, None])
      return jax.lax.dynamic_update_slice_in_dim(h, y, w["cur"], axis=1)

    chunk = lambda blk, h: blk.decode(h, w["start"], *blk_args, write_mask=write)     # [B, C, d]
    skip = lambda blk, h: h
    branch = jnp.where(jnp.any(act), jnp.where(jnp.any(missing), 2, 1), 0)
    y = nn.switch(branch, [skip, single, chunk], pos.block, x)
    self.recomputed = self.recomputed + jnp.sum(missing, axis=1).astype(jnp.int32)
    w["depth_c"] = jnp.where(write, p + 1, w["depth_c"])
    return jnp.where(write[..., None], y, x)

  def _close_window(self, x):
    w = self.window
    w["hist"] = jax.lax.dynamic_update_slice_in_dim(w["hist"], x.astype(w["hist"].dtype), w["start"], axis=1)
    w["depth"] = jax.lax.dynamic_update_slice_in_dim(w["depth"], w["depth_c"], w["start"], axis=1)


class EarlyExitResult(NamedTuple):
  """Output of `generate`.

  tokens: [B, Tp+N] int32; generated: [B, N] int32.
  exit_layer: [B, N] int32, the plan position each generated token exited after (P − 1 = none).
  confidence: [B, N] float32, the measure at that position (λ decides against it).
  executed: [N, P, B] float32, the positions the step of each generated token ran for it
    (`full`: all of them; the K/V-only writes of `propagate` are not counted).
  recomputed: [B, N] int32, `recompute`: block runs spent in that step on earlier tokens' missing
    positions (0 for the other policies).
  logits: [B, N, V] float32 of each generated token (at its exit) when asked for, else None.
  """
  tokens: jnp.ndarray
  generated: jnp.ndarray
  exit_layer: jnp.ndarray
  confidence: jnp.ndarray
  executed: jnp.ndarray
  recomputed: jnp.ndarray
  logits: Optional[jnp.ndarray] = None


def _check(model: nn.Module, rule: ExitRule, policy: str, exit_heads) -> int:
  cfg = model.config
  if not isinstance(cfg, models.TransformerConfig):
    raise ValueError(f"early exit needs a decoder LM (TransformerConfig), got {type(cfg).__name__}")
  if cfg.scan_layers:
    raise ValueError("early exit needs scan_layers=False (convert params with skipjax.models.layout.to_loop)")
  if policy not in POLICIES:
    raise ValueError(f"exit policy={policy!r} is not one of {POLICIES}")
  num_positions = len(cfg.execution_plan)
  rule.validate(num_positions, exit_heads)
  return num_positions


@functools.partial(jax.jit, static_argnames=("model", "rule", "policy", "max_new_tokens", "max_pending",
                                             "temperature", "return_logits"))
def _generate(params, prompt, exit_heads, rng, threshold, *, model, rule, policy, max_new_tokens, max_pending,
              temperature, return_logits):
  """`threshold` λ is traced (one compile serves every λ); `rule` carries the rest."""
  batch, prompt_len = prompt.shape
  num_positions = len(model.config.execution_plan)
  max_len = model.config.max_len
  cache = generation.init_cache(model, batch)
  if prompt_len > 1:  # the prompt but its last token, in one cached chunk through every position
    _, state = model.apply({"params": params, "cache": cache}, prompt[:, :-1], decode=True, mutable=["cache"])
    cache = state["cache"]
  buf = jnp.concatenate([prompt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
  window = None
  if policy == "recompute":
    size = min(max_pending + 1, max_len)
    window = {"hist": jnp.zeros((batch, max_len, model.config.d_model), model.config.compute_dtype),
              "depth": jnp.where(jnp.arange(max_len) < prompt_len - 1, num_positions, 0)[None].repeat(batch, 0)}

  def step(carry, t):
    cache, buf, window = carry
    index = prompt_len - 1 + t
    token = jax.lax.dynamic_slice_in_dim(buf, index, 1, axis=1)                      # [B, 1]
    allow = jnp.ones((batch, 1), bool)
    hook_window = None
    if window is not None:
      start = jnp.clip(index - (size - 1), 0, max_len - size)
      oldest = jax.lax.dynamic_index_in_dim(window["depth"], start, axis=1, keepdims=False)  # [B]
      # the oldest entry leaves the window after this step: if incomplete, this token runs every position
      leaves = (start == index - (size - 1)) & (start + size < max_len)
      allow = ~(leaves & (oldest < num_positions))[:, None]                          # [B, 1]
      hook_window = {**window, "start": start, "cur": index - start, "index": index, "size": size}
    lam = rule.threshold_at(t, max_new_tokens, threshold)
    hook = _Hook(rule, policy, num_positions, lam, exit_heads, allow, hook_window)
    logits, state = model.apply({"params": params, "cache": cache}, token, decode=True, depth_hook=hook,
                                mutable=["cache"])
    logits = logits[:, -1]                                                           # [B, V]
    nxt = generation.sample_next(logits, jax.random.fold_in(rng, t), temperature)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], index + 1, axis=1)
    if window is not None:
      window = {"hist": hook_window["hist"], "depth": hook_window["depth"]}
    out = (hook.layer[:, 0], hook.confidence[:, 0], jnp.stack(hook.ran)[:, :, 0].astype(jnp.float32),
           hook.recomputed, logits if return_logits else None)
    return (state["cache"], buf, window), out

  (_, buf, _), (layer, conf, ran, recomputed, logits) = jax.lax.scan(step, (cache, buf, window),
                                                                     jnp.arange(max_new_tokens))
  return EarlyExitResult(buf, buf[:, prompt_len:], layer.T, conf.T, ran, recomputed.T,
                         None if logits is None else jnp.swapaxes(logits, 0, 1))


def generate(model: nn.Module, params: Params, prompt_tokens, max_new_tokens: int, *, rule: ExitRule,
             policy: str = "propagate", exit_heads=None, max_pending: int = 8, temperature: float = 0.0,
             rng: Optional[jax.Array] = None, return_logits: bool = False) -> EarlyExitResult:
  """Decoding with per-token early exit (CALM §3) under a KV-cache `policy`.

  Args:
    model: a decoder `Transformer` with the loop layout; its `config.max_len` holds Tp + N slots.
    params: its parameters.
    prompt_tokens: [B, Tp] int32 (one prompt length for all rows; the prompt runs every position).
    max_new_tokens: N ≥ 1.
    rule: an `ExitRule`.
    policy: 'propagate' | 'recompute' | 'full' (module docstring).
    exit_heads: {'w': [P, d], 'b': [P]} for the 'learned' measure.
    max_pending: `recompute`: earlier tokens a step may complete (the window is max_pending + 1).
    temperature: 0 = greedy; > 0 samples (needs `rng`).
    return_logits: also return the logits of every generated token.
  """
  _check(model, rule, policy, exit_heads)
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be [batch, prompt_len ≥ 1], got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be ≥ 1")
  if prompt.shape[1] + max_new_tokens > model.config.max_len:
    raise ValueError(f"config.model.max_len={model.config.max_len} is smaller than prompt length {prompt.shape[1]} "
                     f"+ max_new_tokens {max_new_tokens}")
  if max_pending < 1:
    raise ValueError(f"max_pending={max_pending}: must be ≥ 1")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng")
  heads = None if exit_heads is None else {k: jnp.asarray(exit_heads[k], jnp.float32) for k in ("w", "b")}
  rng = jax.random.key(0) if rng is None else rng
  threshold = jnp.asarray(rule.threshold, jnp.float32)
  return _generate(params, prompt, heads, rng, threshold, model=model, rule=dataclasses.replace(rule, threshold=0.0),
                   policy=policy, max_new_tokens=int(max_new_tokens), max_pending=int(max_pending),
                   temperature=float(temperature), return_logits=bool(return_logits))


class ExitForward(NamedTuple):
  """Output of `exit_forward`: logits [B, T, V] at each token's exit, exit_layer [B, T], confidence [B, T]."""
  logits: jnp.ndarray
  exit_layer: jnp.ndarray
  confidence: jnp.ndarray


def exit_forward(model: nn.Module, params: Params, tokens, *, rule: ExitRule, policy: str = "propagate",
                 exit_heads=None, allow=None) -> ExitForward:
  """Teacher-forced early exit over `tokens` [B, T]: every token exits by `rule` (position t uses
  λ_t of `rule.threshold_at(t, T)`). `propagate`: exited tokens keep their state at later positions
  (whose attention reads K/V projected from it), exactly what `generate` computes with the same
  decisions; `recompute` / `full`: the states run on (the full model's K/V), the logits are the
  shared head at the exit. `allow` [B, T] bool: tokens that may exit (default all).
  """
  num_positions = _check(model, rule, policy, exit_heads)
  tokens = jnp.asarray(tokens, jnp.int32)
  allow = jnp.ones(tokens.shape, bool) if allow is None else jnp.broadcast_to(jnp.asarray(allow, bool), tokens.shape)
  threshold = rule.threshold_at(jnp.arange(tokens.shape[1])[None, :], tokens.shape[1])   # [1, T]
  heads = None if exit_heads is None else {k: jnp.asarray(exit_heads[k], jnp.float32) for k in ("w", "b")}
  hook = _Hook(rule, "propagate" if policy == "propagate" else "full", num_positions, threshold, heads, allow)
  logits = model.apply({"params": params}, tokens, depth_hook=hook)
  return ExitForward(logits, hook.layer, hook.confidence)
