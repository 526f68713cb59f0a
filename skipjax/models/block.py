"""The gated residual block (DESIGN.md): y = x + m ⊙ R(x) for attention and FFN branches.

One Block serves every method; only the gate differs:
  * dense: no gate (m = 1) — the plain pre-/post-LN Transformer layer (LtS Eq. 5);
  * SkipLayer (LtS §2): a learned or random `Router` per layer (`skip.granularity='layer'`,
    y = m·g₁·F(x) + (1−m)·g₀·x, Eq. 1/4) or per residual block ('block', or 'ffn' only), with
    the routed compute run by `routing.dispatch` (masked | capacity | grouped). Under routing
    K/V are computed for every token, queries/attention/FFN only for routed ones (Alg. 1).
    `skip.gate_form='residual'` makes a routed layer y = x + m·g₁·(F(x) − x) (only layer
    granularity has a choice: a residual block is always y = x + m·g₁·R(x)); a `highway`
    router gives y = T·H(x) + (1 − T)·x with H = R(x) per block, F(x) per layer;
  * Mixture-of-Depths (Raposo et al. 2024, `skip.router='mod'`, `_mod_layer`): expert-choice
    top-⌊P·T⌋ of a scalar router weight r per sequence, y = x + m·r·(F(x) − x); a causal rule
    (aux BCE or predictor) for decoding and deterministic evaluation (skipjax/routing/mod.py);
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
from typing import Callable, Mapping, Optional, Tuple

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
  # SS §3.1: the FF kernels tied across layers (`layers.TiedKernels`, created above the blocks by
  # the stack) when config.ffn.tied; this block then owns only its FFN biases.
  ffn_kernels: Optional[Mapping[str, jnp.ndarray]] = None

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.ln_attn = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.ln_ffn = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, dtype)
    self.attn = MultiHeadAttention(
        cfg.d_model, cfg.num_heads, cfg.heads_dim, cfg.use_bias, dtype, cfg.causal, cfg.num_kv_heads,
        cfg.qkv_bias, cfg.out_bias, cfg.rope_theta if cfg.position == "rope" else 0.0, cfg.sliding_window)
    self.mlp = make_ffn(cfg, dtype, kernels=self.ffn_kernels)
    if cfg.layer_scale:
      scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
      self.ls_attn = self.param("ls_attn", scale_init, (cfg.d_model,), jnp.float32)
      self.ls_ffn = self.param("ls_ffn", scale_init, (cfg.d_model,), jnp.float32)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    s = cfg.skip
    if s.router == "mod":  # Mixture-of-Depths: its own scalar router (and predictor), `_mod_layer`
      self.mod_router = routing.MoDRouter(dtype=dtype, name="mod_router")
      if s.mod_causal == "predictor":
        self.mod_predictor = routing.MoDPredictor(dtype=dtype, name="mod_predictor")
    elif s.router != "none":
      # skip.router_bias_init='target' starts the bias at logit(P) even under a density warm-up (issue 15 P3).
      warm = s.density_warmup_steps > 0 and s.router_bias_init == "warmup"
      init_density = routing.WARMUP_INIT_DENSITY if warm else None
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
    if s.router in ("none", "mod"):  # (MoD has no `Gate` router: `_mod_layer`)
      return None
    if name == "layer":
      return self.router if s.granularity == "layer" else None
    if s.granularity == "block" or (s.granularity == "ffn" and name == "ffn"):
      return getattr(self, f"router_{name}")
    return None

  def _gate_names(self) -> Tuple[str, ...]:
    """The names a `gate_override` may give this block."""
    if self.config.skip.router == "mod":
      return ("layer",)
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
    return None if router is None else router(self._router_input(name, x), self.deterministic, density)

  def _router_input(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """What the router reads: the stream x, or with skip.router_input='norm' the block's pre-norm
    LN(x) (ln_attn for the layer / attention router, ln_ffn for the FFN router), so its logits do
    not grow with the residual stream's scale."""
    if self.config.skip.router_input == "norm":
      return (self.ln_ffn if name == "ffn" else self.ln_attn)(x)
    return x

  def _combine(self, name: str, x: jnp.ndarray, out: jnp.ndarray, gate: routing.Gate, mask=None) -> jnp.ndarray:
    """The gated output of `name` from its computed output `out` (F(x) for 'layer', R(x) for a
    residual block): the highway form T·H(x) + (1 − T)·x for a `highway` router; else LtS Eq. 1/4
    or its residual form (skip.gate_form) for a layer, y = x + m·g₁·R(x) for a residual block."""
    if self.config.skip.router == "highway" and self._override(name) is None:
      return routing.gated_highway(x, out, gate, mask)
    if name == "layer":
      return routing.gated_layer_output(x, out, gate, mask, form=self.config.skip.gate_form)
    return routing.gated_residual(x, out, gate, mask)

  def _sow_routing(self, name: str, gate: routing.Gate, d: routing.Dispatched, density=None) -> None:
    self.sow("gates", f"{name}_mask", d.mask)
    self.sow("gates", f"{name}_density", d.metrics["routed_fraction"])
    self.sow("gates", f"{name}_dropped_fraction", d.metrics["dropped_fraction"])
    s = self.config.skip
    if s.router in LEARNED_ROUTERS and self._override(name) is None:
      target = s.target_density if density is None else density
      loss = routing.capacity_loss([gate.probs], [gate.mask], target)
      self.sow("aux_loss", f"{name}_capacity_loss", s.aux_weight * loss)

  def _dispatch(self, fn: Callable, x: jnp.ndarray, gate: routing.Gate, kv_valid=None, pointwise: bool = False,
                traced: Optional[Callable] = None) -> routing.Dispatched:
    """`routing.dispatch` of one residual branch: a pointwise one (FFN) over the routing groups of
    `skip.group_size` tokens, attention per batch row (chunks: a row's share of gsize). Padding
    (kv_valid 0) is never routed and does not count towards capacity (issue 15 P4)."""
    s = self.config.skip
    b, t = x.shape[:2]
    group = routing.fit_group_size(b, t, s.group_size)
    gsize = s.gsize if pointwise else routing.row_gsize(min(s.gsize, group), t, group)
    return routing.dispatch(fn, x, gate.mask, method=s.dispatch, capacity_factor=s.capacity_factor,
                            target_density=s.target_density, gsize=gsize, group_size=group if pointwise else 0,
                            valid=kv_valid, traced_branch_fn=traced)

  def _quiet(self, build: Callable) -> Optional[Callable]:
    """The branch `build(mdl)` for `grouped`'s chunks inside lax.scan/lax.cond (issue 15 P7).

    Built on a functional copy of this block that reads this block's params (so gradients
    flow as usual) and writes no variables: a sow there (activations, captured intermediates)
    would leak a tracer. Only the unconditional chunk 0 sows. None unless dispatch='grouped'.
    """
    if self.config.skip.dispatch != "grouped":
      return None

    def branch(*args):  # traced after chunk 0 ran, so at init the params exist by now
      variables = {"params": self.variables.get("params", {})}
      return nn.apply(lambda mdl, *a: build(mdl)(*a), self.clone(parent=None))(variables, *args)
    return branch

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

  def _ffn(self, h: jnp.ndarray, layer_index, valid: Optional[jnp.ndarray] = None,
           num_sequences: Optional[int] = None) -> jnp.ndarray:
    """The FFN branch on h [G, C, d]; for SS Eq. 3: `valid` [G, C] the tokens that really run it,
    `num_sequences` the batch size B that h's routing groups come from (default G)."""
    return self._scale("ffn", self.mlp(self._pre(self.ln_ffn, h), layer_index, valid, num_sequences))

  def _branch(self, name: str, x, positions, kv_valid, layer_index, kv=None) -> Callable:
    """R as a dispatch branch (x_sel [B,C,d], idx [B,C], valid) -> R(x_sel).

    Attention keys/values come from every token of `x` (LtS Alg. 1 line 2; or `kv` = (K, V)
    when already projected); queries only from the selected tokens, masked causally by their
    original positions.
    """
    if name == "ffn":
      return lambda x_sel, idx, valid: self._ffn(x_sel, layer_index, valid, x.shape[0])
    k, v = kv if kv is not None else self.attn.project_kv(self._pre(self.ln_attn, x), positions)

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
    kv = self.attn.project_kv(self._pre(self.ln_attn, x), positions) if name == "attn" else None
    fn = self._branch(name, x, positions, kv_valid, layer_index, kv)
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
    traced = self._quiet(lambda mdl: mdl._branch(name, x, positions, kv_valid, layer_index, kv))
    d = self._dispatch(fn, x, gate, kv_valid, pointwise=name == "ffn", traced=traced)
    self._sow_routing(name, gate, d, density)
    r = self.dropout(d.output, deterministic=self.deterministic)
    return self._combine(name, x, r, gate, d.mask)

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
    the branches that are on.

    F is dispatched in two parts (`routing.dispatch_layer`): h = x + Attn(x) per batch row (its
    queries attend to their row's K/V), then h + FFN(h) over the routing groups
    (`skip.group_size`), on exactly the tokens whose attention ran.
    """
    gate = self._gate("layer", x, density)
    kv = self.attn.project_kv(self._pre(self.ln_attn, x), positions) if branches[0] else None

    def row(mdl):  # x ↦ h, the attention part (the FFN's skip when the plan has no FFN)
      attention = mdl._branch("attn", x, positions, kv_valid, layer_index, kv)

      def fn(x_sel, idx, valid):
        h = mdl._add("attn", x_sel, attention(x_sel, idx, valid))
        return h if branches[1] else mdl._skipped("ffn", h)
      return fn

    def point(mdl):  # h ↦ F, the FFN part (after the attention's skip when the plan has no attention)
      def fn(h, idx, valid):
        h = h if branches[0] else mdl._skipped("attn", h)
        return mdl._add("ffn", h, mdl._ffn(h, layer_index, valid, x.shape[0]))
      return fn

    s = self.config.skip
    parts = [(part(self), self._quiet(part)) if on else (None, None) for part, on in zip((row, point), branches)]
    d = routing.dispatch_layer(parts[0][0], parts[1][0], x, gate.mask, method=s.dispatch,
                               capacity_factor=s.capacity_factor, target_density=s.target_density, gsize=s.gsize,
                               group_size=s.group_size, valid=kv_valid, traced_row_fn=parts[0][1],
                               traced_point_fn=parts[1][1])
    self._sow_routing("layer", gate, d, density)
    return self._combine("layer", x, self.dropout(d.output, deterministic=self.deterministic), gate, d.mask)

  def _add(self, name: str, x: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
    """x + R(x); post-LN: LN(x + R(x)) (so a routed post-LN layer's F(x) keeps its norms)."""
    return x + r if self.config.norm == "pre" else self._ln(name)(x + r)

  def __call__(self, x, positions, kv_valid=None, layer_index=0, density=None, branches=(True, True)):
    """Full-sequence forward. x [B,T,d], positions [B,T], kv_valid [B,T] or None.

    `density`: the scheduled target density P_t (`routing.scheduled_density`) for the capacity
    loss and random gating; None means `config.skip.target_density`.
    `branches`: static (attention, FFN) flags of the execution plan; an off branch is not traced.
    """
    self._check_overrides()
    if self.config.skip.router == "mod":
      return self._mod_layer(x, positions, kv_valid, layer_index, branches)
    if self._router("layer") is not None:
      if not any(branches):
        return x
      return self._skip_layer(x, positions, kv_valid, layer_index, density, branches)
    for name, on in zip(("attn", "ffn"), branches):
      x = (self._residual(name, x, positions, kv_valid, layer_index, density) if on else self._skipped(name, x))
    return x

  # -- Mixture-of-Depths (Raposo et al. 2024; skipjax/routing/mod.py) ------------------------

  def _mod_routed(self, layer_index) -> bool:
    """Whether this layer routes: every k-th (`skip.mod_every`, layer i iff i % k == k − 1); others are dense."""
    k = self.config.skip.mod_every
    # (k > 1 has a static layer index: TransformerConfig refuses it with scan_layers / remat)
    return k == 1 or int(layer_index) % k == k - 1

  def _mod_scores(self, x: jnp.ndarray):
    """(router weight w(r) [B,T], causal-rule logits [B,T]): w(r) = r or σ(r) (`skip.mod_weight`; σ is
    monotone, so top-k of w(r) is top-k of r); the logits are r itself (`mod_causal='aux_loss'`) or the
    auxiliary predictor's (`'predictor'`, which reads the router's input through a stop-gradient)."""
    s = self.config.skip
    u = self._router_input("layer", x)
    r = self.mod_router(u)
    return routing.mod.output_weight(r, s.mod_weight), (self.mod_predictor(u) if s.mod_causal == "predictor" else r)

  def _mod_residual(self, x, positions, kv_valid, layer_index, branches) -> Callable:
    """The layer's residual f = F(x) − x (pre-LN: attention, then FFN) as a dispatch branch; K/V from every token."""
    attention = self._branch("attn", x, positions, kv_valid, layer_index) if branches[0] else None

    def residual(x_sel, idx, valid):
      a = attention(x_sel, idx, valid) if attention is not None else jnp.zeros_like(x_sel)
      return a + self._ffn(x_sel + a, layer_index, valid, x.shape[0]) if branches[1] else a
    return residual

  def _mod_layer(self, x, positions, kv_valid, layer_index, branches):
    """MoD Eq. 1 at layer granularity: y = x + m·r·f(x), f = F(x) − x (attention + FFN), r = w_θᵀx.

    m: training (and `skip.mod_eval='topk'`) the expert-choice top-C of r per sequence,
    C = ⌊P·T⌋ (padding excluded, `routing.mod.row_capacity`), always run on the C gathered tokens
    (`routing.topk_dispatch`). Deterministic with `mod_eval='causal'` (default): the causal rule
    σ(logit) > 0.5, exactly as KV-cache decoding (`_mod_decode`). A `gate_override` {'layer': m}
    replaces m. A per-token m (causal rule, override) runs by `skip.dispatch='masked'` (every
    token) or else the grouped dispatch (no token dropped). Sown: aux_loss/mod_bce (weight ·
    BCE of the causal logits against top-k membership), gates/mod_causal_accuracy (their
    agreement), gates/layer_{mask,density,dropped_fraction}. Layers that `mod_every` leaves dense
    give y = F(x) (m = 1, r = 1). K/V come from every token (LtS Alg. 1, as the decoding cache);
    the paper attends among the routed tokens only.
    """
    if not any(branches):
      return x
    s = self.config.skip
    fn = self._mod_residual(x, positions, kv_valid, layer_index, branches)
    override = self._override("layer")
    valid = None if kv_valid is None else kv_valid.astype(bool)
    compact = "masked" if s.dispatch == "masked" else "grouped"
    if not self._mod_routed(layer_index):
      weight = jnp.ones(x.shape[:2], jnp.float32)
      d = routing.dispatch(fn, x, weight if override is None else override, method="masked")
    else:
      weight, logits = self._mod_scores(x)
      num_slots = routing.mod.capacity(x.shape[1], s.target_density)
      row_slots = None if valid is None else routing.mod.row_capacity(valid, s.target_density)
      if override is None and (not self.deterministic or s.mod_eval == "topk"):
        d = routing.topk_dispatch(fn, x, weight, num_slots, valid, row_slots)
        targets = d.mask
      else:
        targets = routing.mod.topk_mask(weight, num_slots, valid, row_slots)
        m = override if override is not None else (
            routing.mod.causal_decision(logits) * (1.0 if valid is None else valid))
        d = routing.dispatch(fn, x, m, method=compact, gsize=s.gsize, target_density=s.target_density)
      self.sow("gates", "mod_causal_accuracy", routing.mod.agreement(logits, targets, valid))
      self.sow("aux_loss", "mod_bce", s.mod_aux_weight * routing.mod.bce_loss(logits, targets, valid))
    self.sow("gates", "layer_mask", d.mask)
    self.sow("gates", "layer_density", d.metrics["routed_fraction"])
    self.sow("gates", "layer_dropped_fraction", d.metrics["dropped_fraction"])
    return routing.mod.mod_output(x, self.dropout(d.output, deterministic=self.deterministic), weight, d.mask)

  def _mod_decode(self, x, index, layer_index, branches, cache: str, write_mask):
    """MoD decoding step: K/V of every token are written (LtS Alg. 2); Q/attention/FFN run where
    the causal rule routes (σ(logit) > 0.5, at batch 1 under `lax.cond`); y = x + m·r·f(x)."""
    if not any(branches):
      return x
    q = self._pre(self.ln_attn, x) if branches[0] else x
    if branches[0]:
      self.attn.decode_step(q, index, attend=False, cache=cache, write_mask=write_mask)

    def residual(mdl, h, q):
      a = mdl._scale("attn", mdl.attn.attend_cached(q, index, cache)) if branches[0] else jnp.zeros_like(h)
      return a + mdl._ffn(h + a, layer_index) if branches[1] else a

    override = self._override("layer")
    if self._mod_routed(layer_index):
      weight, logits = self._mod_scores(x)
      m = routing.mod.causal_decision(logits) if override is None else override
      f = self._maybe(m, residual, x, q)
    else:
      weight = jnp.ones(x.shape[:2], jnp.float32)
      m = weight if override is None else override
      f = residual(self, x, q) if override is None else self._maybe(m, residual, x, q)
    self.sow("gates", "layer_mask", m)
    return routing.mod.mod_output(x, f, weight, m)

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
    if self.config.skip.router == "mod":
      return self._mod_decode(x, index, layer_index, branches, cache, write_mask)
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
        h = mdl._add("attn", h, attend(mdl, h, q)) if branches[0] else mdl._skipped("attn", h)
        return mdl._add("ffn", h, ffn(mdl, h)) if branches[1] else mdl._skipped("ffn", h)
      self.sow("gates", "layer_mask", gate.mask)
      return self._combine("layer", x, self._maybe(gate.mask, layer, x, q), gate)
    if branches[0]:
      gate = self._gate("attn", x)
      q = self._pre(self.ln_attn, x)
      if gate is None:
        a = self._scale("attn", self.attn.decode_step(q, index, cache=cache, write_mask=write_mask))
        x = x + a if self.config.norm == "pre" else self.ln_attn(x + a)
      else:
        self.attn.decode_step(q, index, attend=False, cache=cache, write_mask=write_mask)
        self.sow("gates", "attn_mask", gate.mask)
        x = self._combine("attn", x, self._maybe(gate.mask, attend, x, q), gate)
    else:
      x = self._skipped("attn", x)
    if not branches[1]:
      return self._skipped("ffn", x)
    gate = self._gate("ffn", x)
    if gate is None:
      f = ffn(self, x)
      return x + f if self.config.norm == "pre" else self.ln_ffn(x + f)
    self.sow("gates", "ffn_mask", gate.mask)
    return self._combine("ffn", x, self._maybe(gate.mask, ffn, x), gate)
