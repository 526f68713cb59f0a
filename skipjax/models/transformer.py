"""Decoder-only Transformer LM: embeddings, N gated residual blocks, final norm, head."""
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax.depth import plan as plan_lib
from skipjax.layers import LearnedPositions, SinusoidalPositions, make_norm, token_embedding
from skipjax.models import stack
from skipjax.models.block import Block
from skipjax.models.config import TransformerConfig

# Collections a block may write; scanned layers stack each of them along a leading layer axis.
LAYER_COLLECTIONS = ("params", "cache", "stats", "gates", "aux_loss", "activations", "intermediates",
                     "gate_override")
_kernel_init = nn.initializers.normal(stddev=0.02)


class _ScannedLayer(nn.Module):
  """Adapter giving Block the (carry, xs) -> (carry, ys) signature of nn.scan."""
  config: TransformerConfig
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, x, layer_index, keep, positions, kv_valid, index, density, ffn_kernels=None):
    """`keep` [B]: this layer's LayerDrop decisions (stack.layerdrop_keep), None when nothing drops;
    `ffn_kernels`: the FF kernels tied across layers (stack.tied_ffn_kernels), broadcast to every layer."""
    block = Block(self.config, self.deterministic, ffn_kernels=ffn_kernels, name="block")
    if self.decode:
      return block.decode(x, index, layer_index), None
    run = lambda blk, h: blk(h, positions, kv_valid, layer_index, density)
    skip = (lambda blk, h: blk(h, positions, kv_valid, layer_index, density, (False, False))
            ) if stack.skip_runs_norms(self.config) else (lambda blk, h: h)
    return stack.run_or_skip(self.config, self, keep, block, x, run, skip), None


class Transformer(nn.Module):
  """`apply({'params': p}, tokens[int32 B×T])` → logits [B, T, V] (float32)."""
  config: TransformerConfig

  def _positions(self, tokens, positions, decode: bool):
    batch, length = tokens.shape
    if not decode:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      return positions, None
    initialized = self.has_variable("cache", "index")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = index.value
    if initialized:
      index.value = start + length
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    return positions, start

  def _blocks(self, x, positions, kv_valid, index, density, deterministic: bool, decode: bool, hook=None):
    """The blocks along `config.plan` (scanned layers: see `_scanned`)."""
    cfg = self.config
    stack.check_overrides(self.variables.get("gate_override", {}), cfg)
    if cfg.scan_layers:
      if hook is not None:
        raise ValueError("a depth hook (early exit) needs scan_layers=False (skipjax.models.layout.to_loop)")
      return self._scanned(x, positions, kv_valid, index, density, deterministic, decode)

    def call(block, x, entry, repeat):
      if decode:
        return block.decode(x, index, entry.slot, entry.branches, repeat)
      return block(x, positions, kv_valid, entry.slot, density, entry.branches)
    return stack.walk(cfg, deterministic, x, call, self, decode, hook, index)

  def _scanned(self, x, positions, kv_valid, index, density, deterministic: bool, decode: bool):
    """`nn.scan` over the plan's positions, the stacked params [L, ...] gathered by slot.

    A plan whose positions all run both branches is served by one scan body: position p reads
    slot s_p of every stacked parameter (and of a scan-layout `gate_override`), so reordered,
    repeated and shared slots are a gather and their gradients add up on the slot (the gather's
    transpose). Params are created in the identity layout ([L, ...], as without a plan); sown
    collections are stacked per position [P, ...]. Branch plans are refused by TransformerConfig,
    KV-cache decoding under a non-identity plan here (its cache would be per position).
    """
    cfg = self.config
    plan = cfg.execution_plan
    identity = plan_lib.is_identity(plan, cfg.num_layers)
    if decode and not identity:
      raise ValueError(f"config.model.plan={cfg.plan!r}: KV-cache decoding of a scanned model serves only the "
                       "identity plan; decode with scan_layers=False (skipjax.models.layout.to_loop)")
    init = self.is_initializing()
    slots = np.arange(cfg.num_layers) if identity or init else np.array([e.slot for e in plan])  # [P]
    # LayerDrop decisions [P, B] are drawn here, as in the loop, and scanned along with the slot index.
    keep = stack.layerdrop_keep(self, cfg, deterministic, x.shape[0], decode)
    layer = nn.remat(_ScannedLayer, prevent_cse=False) if cfg.remat else _ScannedLayer
    scanned = nn.scan(
        layer, variable_axes={c: 0 for c in LAYER_COLLECTIONS},
        split_rngs={"params": True, "dropout": True, "gate": True},
        in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=len(slots),
        metadata_params={nn.PARTITION_NAME: "layers"})
    if not (identity or init):
      gather = lambda tree: jax.tree.map(lambda a: a[slots], tree)  # [L, ...] -> [P, ...]
      scanned = nn.map_variables(scanned, ("params", "gate_override"), trans_in_fn=gather)
    layers = scanned(cfg, deterministic, decode, name="layers")
    kernels = stack.tied_ffn_kernels(cfg)  # one shared slot outside the scanned [L, ...] params (SS §3.1)
    x, _ = layers(x, jnp.asarray(slots), keep, positions, kv_valid, index, density, kernels)
    return x

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               attention_mask: Optional[jnp.ndarray] = None, *, deterministic: bool = True,
               decode: bool = False, density: Optional[jnp.ndarray] = None,
               depth_hook: Optional[Callable] = None) -> jnp.ndarray:
    """`density`: scheduled routing density P_t (training with `skip.density_warmup_steps`).

    `depth_hook(position: stack.Position, x, head: Head) -> x` runs every plan position in place
    of the plain walk (early exit: skipjax/decode/early_exit.py); `head` is the shared head
    (final norm + LM head) for exits after any position. The logits are the head of what the
    last position returns.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    embed = token_embedding(cfg.vocab_size, cfg.embed_proj_dim or cfg.d_model, dtype, name="embed")
    x = embed(tokens)
    if cfg.embed_proj_dim:
      x = nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, name="project_in",
                   kernel_init=nn.with_logical_partitioning(_kernel_init, (None, "embed")))(x)
    positions, index = self._positions(tokens, positions, decode)
    if cfg.position == "learned":
      x = x + LearnedPositions(cfg.max_len, cfg.d_model, cfg.position_offset, dtype, name="pos_embed")(positions)
    elif cfg.position == "sinusoidal":
      x = x + SinusoidalPositions(cfg.max_len, cfg.d_model, dtype)(positions)
    # position='rope' adds nothing here: the blocks rotate q/k at `positions` (layers/attention.py).
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    head = self._head(embed)
    hook = None if depth_hook is None else (lambda position, x: depth_hook(position, x, head))
    x = self._blocks(x, positions, attention_mask, index, density, deterministic, decode, hook)
    return head.logits(x)

  def _head(self, embed) -> "Head":
    """The shared head's modules (created here, called wherever the head is applied)."""
    cfg = self.config
    dtype = cfg.compute_dtype
    norm = (make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.layer_norm_affine, dtype, name="ln_final")
            if cfg.final_norm else (lambda h: h))
    project_out = nn.Dense(cfg.embed_proj_dim, use_bias=False, dtype=dtype, name="project_out",
                           kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", None))
                           ) if cfg.embed_proj_dim else (lambda h: h)
    out = embed.attend if cfg.tie_embeddings else nn.Dense(
        cfg.vocab_size, use_bias=False, dtype=dtype, name="lm_head",
        kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", "vocab")))
    return Head(norm, lambda h: out(project_out(norm(h))).astype(jnp.float32))


class Head(NamedTuple):
  """The shared head: `norm(h)` the final norm, `logits(h)` [..., V] float32 = LM head(project_out(norm(h)))."""
  norm: Callable
  logits: Callable
