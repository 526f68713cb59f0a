"""The gated residual block (DESIGN.md): y = x + m ⊙ R(x) for attention and FFN branches.

One Block serves every method; only the gate differs:
  * dense: no gate (m = 1) — the plain pre-/post-LN Transformer layer (LtS Eq. 5);
  * SkipLayer (LtS §2): a learned or random `Router` per layer (`skip.granularity='layer'`,
    y = m·g₁·F(x) + (1−m)·g₀·x, Eq. 1/4) or per residual block ('block', or 'ffn' only), with
    the routed compute run by `routing.dispatch` (masked | capacity | grouped). Under routing
    K/V are computed for every token, queries/attention/FFN only for routed ones (Alg. 1);
  * applied oracle (RR §4.4): `oracle_threshold` > 0 skips R(x) where ‖R(x)‖/‖x‖ < threshold;
  * per-token overrides (oracles, probes): a `gate_override` variable collection
    {'attn': m, 'ffn': m}, or {'layer': m} for a layer-routed block ([B, T] in {0, 1}), forces
    the gate of this block; a name that matches none of the block's gates is an error.
Static decisions (pruning, skip policies) are execution plans (skipjax/depth/plan.py): the
stack passes `branches=(attn, ffn)` and a branch that is off is never traced.
A hard gate m = 0, or a branch that is off, leaves the token unchanged (y = x); for a post-LN
block `post_ln_skip='ln'` gives y = LN(x) instead (RR §4.4: only the skip connection runs, the
norm stays).

Model families are options of the same layers: LayerNorm or RMSNorm (`norm_type`), rotary
positions from the original token positions (`position='rope'`), plain or gated FFN
(`mlp_gated`), grouped-query attention (`num_kv_heads`), per-projection biases and layer scale
(`layer_scale`, LayerScale of Touvron et al. 2021 (CaiT), used by DINOv2: R(x) ← γ ⊙ R(x), γ [d]
per branch).

Sown collections: stats/{attn,ffn}_{input,residual}_norm ‖x‖₂, ‖R(x)‖₂ per token (dense path),
gates/{layer,attn,ffn}_{mask,density,dropped_fraction}, aux_loss/{...}_capacity_loss (λ·(r−P)²).
"""
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from skipjax import routing
from skipjax.layers import MultiHeadAttention, make_ffn, make_norm
from skipjax.models.config import TransformerConfig

LEARNED_ROUTERS = ("gumbel", "top1", "sigmoid")


def _token_norm(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def _all_tokens(x: jnp.ndarray):
  """(idx, valid) that select every token of x [B, T, d]."""
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), bool)


class Block(nn.Module):
  """One Transformer layer whose two residual branches go through a gate hook."""
  config: TransformerConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.ln_attn = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.ln_ffn = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.attn = MultiHeadAttention(
        cfg.d_model, cfg.num_heads, cfg.heads_dim, cfg.use_bias, dtype, cfg.causal, cfg.num_kv_heads,
        cfg.qkv_bias, cfg.out_bias, cfg.rope_theta if cfg.position == "rope" else 0.0, cfg.sliding_window)
    self.mlp = make_ffn(cfg, dtype)
    if cfg.layer_scale:
      scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
      self.ls_attn = self.param("ls_attn", scale_init, (cfg.d_model,), jnp.float32)
      self.ls_ffn = self.param("ls_ffn", scale_init, (cfg.d_model,), jnp.float32)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    s = cfg.skip
    if s.router != "none":
      init_density = routing.WARMUP_INIT_DENSITY if s.density_warmup_steps > 0 else None
      make = lambda name: routing.Router(kind=s.router, temperature=s.temperature, target_density=s.target_density,
                                         init_density=init_density, name=name)
      if s.granularity == "layer":
        self.router = make("router")
      else:
        if s.granularity == "block":
          self.router_attn = make("router_attn")
        self.router_ffn = make("router_ffn")

  # -- gates ---------------------------------------------------------------------------------

  def _router(self, name: str) -> Optional[nn.Module]:
    s = self.config.skip
    if s.router == "none":
      return None
    if name == "layer":
      return self.router if s.granularity == "layer" else None
    if s.granularity == "block" or (s.granularity == "ffn" and name == "ffn"):
      return getattr(self, f"router_{name}")
    return None

  def _gate_names(self) -> Tuple[str, ...]:
    """The names a `gate_override` may give this block."""
    return ("layer",) if self._router("layer") is not None else ("attn", "ffn")

  def _check_overrides(self) -> None:
    given = set(self.variables.get("gate_override", {}))
    bad = sorted(given - set(self._gate_names()))
    if bad:
      s = self.config.skip
      raise ValueError(f"gate_override {bad} of {self.name or 'the block'} matches no gate: its gates are "
                       f"{list(self._gate_names())} (config.model.skip.router={s.router!r}, "
                       f"granularity={s.granularity!r})")

  def _override(self, name: str) -> Optional[jnp.ndarray]:
    if self.has_variable("gate_override", name):
      return self.get_variable("gate_override", name)
    return None

  def _gate(self, name: str, x: jnp.ndarray, density=None) -> Optional[routing.Gate]:
    """The router's gate for `name`, replaced by a `gate_override` mask when one is given."""
    override = self._override(name)
    if override is not None:
      return routing.fixed_gate(override)
    router = self._router(name)
    return None if router is None else router(x, self.deterministic, density)

  def _sow_routing(self, name: str, gate: routing.Gate, d: routing.Dispatched, density=None) -> None:
    self.sow("gates", f"{name}_mask", d.mask)
    self.sow("gates", f"{name}_density", d.metrics["routed_fraction"])
    self.sow("gates", f"{name}_dropped_fraction", d.metrics["dropped_fraction"])
    s = self.config.skip
    if s.router in LEARNED_ROUTERS and self._override(name) is None:
      target = s.target_density if density is None else density
      loss = routing.capacity_loss([gate.probs], [gate.mask], target)
      self.sow("aux_loss", f"{name}_capacity_loss", s.aux_weight * loss)

  def _dispatch(self, fn: Callable, x: jnp.ndarray, gate: routing.Gate) -> routing.Dispatched:
    s = self.config.skip
    return routing.dispatch(fn, x, gate.mask, method=s.dispatch, capacity_factor=s.capacity_factor,
                            target_density=s.target_density, gsize=s.gsize)

  # -- residual branches ---------------------------------------------------------------------

  def _pre(self, ln, x):
    return ln(x) if self.config.norm == "pre" else x

  def _ln(self, name: str):
    return self.ln_attn if name == "attn" else self.ln_ffn

  def _scale(self, name: str, r: jnp.ndarray) -> jnp.ndarray:
    """Layer scale γ ⊙ R(x) (identity without `layer_scale`)."""
    if not self.config.layer_scale:
      return r
    gamma = self.ls_attn if name == "attn" else self.ls_ffn
    return r * gamma.astype(r.dtype)

  def _ffn(self, h: jnp.ndarray, layer_index) -> jnp.ndarray:
    return self._scale("ffn", self.mlp(self._pre(self.ln_ffn, h), layer_index))

  def _branch(self, name: str, x, positions, kv_valid, layer_index) -> Callable:
    """R as a dispatch branch (x_sel [B,C,d], idx [B,C], valid) -> R(x_sel).

    Attention keys/values come from every token of `x` (LtS Alg. 1 line 2); queries only from
    the selected tokens, masked causally by their original positions.
    """
    if name == "ffn":
      return lambda x_sel, idx, valid: self._ffn(x_sel, layer_index)
    k, v = self.attn.project_kv(self._pre(self.ln_attn, x), positions)

    def attention(x_sel, idx, valid):
      q_pos = jnp.take_along_axis(positions, idx, axis=1)
      r = self.attn.attend(self._pre(self.ln_attn, x_sel), q_pos, k, v, positions, kv_valid)
      return self._scale("attn", r)
    return attention

  def _skipped(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """Output of a residual block that does not run: x, or LN(x) for post-LN with post_ln_skip='ln'."""
    if self.config.norm == "post" and self.config.post_ln_skip == "ln":
      return self._ln(name)(x)
    return x

  def _residual(self, name: str, x, positions, kv_valid, layer_index, density=None):
    """One residual block, y = x + m ⊙ R(x) (post-LN: LN(x + R(x)) where m = 1)."""
    fn = self._branch(name, x, positions, kv_valid, layer_index)
    gate = self._gate(name, x, density)
    if gate is None or self.config.norm == "post":
      r = fn(x, *_all_tokens(x))
      self._record(name, x, r)
      r = self.dropout(r, deterministic=self.deterministic)
      y = x + r if self.config.norm == "pre" else self._ln(name)(x + r)
      m = gate.mask if gate is not None else self._oracle(x, r)
      if m is None:
        return y
      self.sow("gates", f"{name}_mask", m)
      return jnp.where(m[..., None] > 0, y, self._skipped(name, x))
    d = self._dispatch(fn, x, gate)
    self._sow_routing(name, gate, d, density)
    r = self.dropout(d.output, deterministic=self.deterministic)
    return routing.gated_residual(x, r, gate, d.mask)

  def _oracle(self, x, r) -> Optional[jnp.ndarray]:
    """RR Eq. 1 applied as a gate: keep R(x) iff ‖R(x)‖₂ / ‖x‖₂ ≥ threshold."""
    threshold = self.config.oracle_threshold
    if not threshold:
      return None
    ratio = _token_norm(r) / jnp.maximum(_token_norm(x), 1e-12)
    return (ratio >= threshold).astype(jnp.float32)

  def _record(self, name: str, x: jnp.ndarray, r: jnp.ndarray) -> None:
    if self.is_mutable_collection("stats"):
      self.sow("stats", f"{name}_input_norm", _token_norm(x))
      self.sow("stats", f"{name}_residual_norm", _token_norm(r))

  def _skip_layer(self, x, positions, kv_valid, layer_index, density=None, branches=(True, True)):
    """LtS §2.3 / Alg. 1: the whole layer F(x) runs only for routed tokens (Eq. 1/4); F has only
    the branches that are on."""
    gate = self._gate("layer", x, density)
    attention = self._branch("attn", x, positions, kv_valid, layer_index) if branches[0] else None

    def layer(x_sel, idx, valid):
      h = x_sel + attention(x_sel, idx, valid) if attention is not None else x_sel
      return h + self._ffn(h, layer_index) if branches[1] else h

    d = self._dispatch(layer, x, gate)
    self._sow_routing("layer", gate, d, density)
    return routing.gated_layer_output(x, self.dropout(d.output, deterministic=self.deterministic), gate, d.mask)

  def __call__(self, x, positions, kv_valid=None, layer_index=0, density=None, branches=(True, True)):
    """Full-sequence forward. x [B,T,d], positions [B,T], kv_valid [B,T] or None.

    `density`: the scheduled target density P_t (`routing.scheduled_density`) for the capacity
    loss and random gating; None means `config.skip.target_density`.
    `branches`: static (attention, FFN) flags of the execution plan; an off branch is not traced.
    """
    self._check_overrides()
    if self._router("layer") is not None:
      if not any(branches):
        return x
      return self._skip_layer(x, positions, kv_valid, layer_index, density, branches)
    for name, on in zip(("attn", "ffn"), branches):
      x = (self._residual(name, x, positions, kv_valid, layer_index, density) if on else self._skipped(name, x))
    return x

  # -- decoding (LtS Alg. 2) -----------------------------------------------------------------

  def _maybe(self, m: jnp.ndarray, fn: Callable, x: jnp.ndarray, *extra) -> jnp.ndarray:
    """fn(x, *extra) where m = 1, else 0. At batch 1 the skipped compute does not run (`lax.cond`)."""
    if x.shape[:2] == (1, 1):  # (the init call of decode mode sees the full length)
      return nn.cond(m.reshape(()) > 0, fn, lambda mdl, x, *_: jnp.zeros_like(x), self, x, *extra)
    return jnp.where(m[..., None] > 0, fn(self, x, *extra), jnp.zeros_like(x))

  def decode(self, x, index, layer_index=0, branches=(True, True), repeat: int = 0, write_mask=None,
             kv_only: bool = False):
    """One decoding step with the KV cache: x [B,1,d] at cache slot `index` (or a chunk [B,T,d]).

    K/V of the current token are always written to the cache; Q/attention/FFN run only where
    the router routes the token (LtS Alg. 2, deterministic argmax routing). `branches` as in
    `__call__` (an off attention branch has no cache); `repeat` k > 0: the k-th repetition of
    this slot in the plan keeps its own cache (`cached_key_k`, `cached_value_k`).
    `write_mask` [B,T]: only those tokens write K/V (`MultiHeadAttention.decode_step`);
    `kv_only`: write the K/V of x and return x unchanged (a token that skips this layer keeps its
    state, and later tokens read K/V projected from it: CALM's state propagation).
    """
    self._check_overrides()
    cache = f"_{repeat}" if repeat else ""
    if kv_only:
      if branches[0]:
        self.attn.decode_step(self._pre(self.ln_attn, x), index, attend=False, cache=cache, write_mask=write_mask)
      return x
    ffn = lambda mdl, h: mdl._ffn(h, layer_index)
    # Routed attention: the normed input that wrote K/V outside the cond is also the query's, so
    # the cond does not norm x a second time (the fixed per-layer cost, issue 14 item 7).
    attend = lambda mdl, h, q: mdl._scale("attn", mdl.attn.attend_cached(q, index, cache))
    if self._router("layer") is not None:
      if not any(branches):
        return x
      gate = self._gate("layer", x)
      q = self._pre(self.ln_attn, x) if branches[0] else x
      if branches[0]:
        self.attn.decode_step(q, index, attend=False, cache=cache, write_mask=write_mask)

      def layer(mdl, h, q):
        h = h + attend(mdl, h, q) if branches[0] else h
        return h + ffn(mdl, h) if branches[1] else h
      self.sow("gates", "layer_mask", gate.mask)
      return routing.gated_layer_output(x, self._maybe(gate.mask, layer, x, q), gate)
    if branches[0]:
      gate = self._gate("attn", x)
      q = self._pre(self.ln_attn, x)
      if gate is None:
        a = self._scale("attn", self.attn.decode_step(q, index, cache=cache, write_mask=write_mask))
        x = x + a if self.config.norm == "pre" else self.ln_attn(x + a)
      else:
        self.attn.decode_step(q, index, attend=False, cache=cache, write_mask=write_mask)
        self.sow("gates", "attn_mask", gate.mask)
        x = routing.gated_residual(x, self._maybe(gate.mask, attend, x, q), gate)
    else:
      x = self._skipped("attn", x)
    if not branches[1]:
      return self._skipped("ffn", x)
    gate = self._gate("ffn", x)
    if gate is None:
      f = ffn(self, x)
      return x + f if self.config.norm == "pre" else self.ln_ffn(x + f)
    self.sow("gates", "ffn_mask", gate.mask)
    return routing.gated_residual(x, self._maybe(gate.mask, ffn, x), gate)
