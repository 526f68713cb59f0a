"""The decoder LM: decode with KV cache, layouts, sown statistics, positions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from skipjax import models

BASE = dict(vocab_size=61, d_model=32, num_heads=4, num_layers=3, d_ff=64, max_len=16)


def _init(cfg, tokens):
  model = models.build(cfg)
  return model, nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])


@pytest.mark.parametrize("overrides", [
    {}, {"scan_layers": True}, {"norm": "post", "final_norm": False},
    {"position": "sinusoidal", "tie_embeddings": False, "activation": "fliprelu"},
    {"embed_proj_dim": 24, "position_offset": 2, "use_bias": False},
    # Llama/Qwen2-style: RoPE, GQA, RMSNorm, SwiGLU, q/k/v bias only, untied head.
    {"position": "rope", "rope_theta": 500.0, "num_kv_heads": 2, "norm_type": "rmsnorm", "mlp_gated": True,
     "activation": "silu", "use_bias": False, "qkv_bias": True, "tie_embeddings": False},
    # Multi-query, head_dim ≠ d / heads, sliding window, layer scale, scanned layers.
    {"position": "rope", "num_kv_heads": 1, "head_dim": 6, "sliding_window": 5, "layer_scale": True,
     "scan_layers": True},
])
def test_decode_with_cache_reproduces_full_forward(overrides):
  cfg = models.TransformerConfig(**{**BASE, **overrides})
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  model, params = _init(cfg, tokens)
  full = model.apply({"params": params}, tokens)
  cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), decode=True)["cache"]
  np.testing.assert_allclose(_helpers.decode_step_by_step(model, params, cache, tokens), full, atol=2e-5)


def test_scan_and_loop_layouts_compute_the_same_function():
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  loop_model, loop_params = _init(models.TransformerConfig(**BASE), tokens)
  scan_model = models.build(models.TransformerConfig(**BASE, scan_layers=True))
  scan_params = models.layout.to_scan(loop_params)
  assert scan_params["layers"]["block"]["mlp"]["wi"]["kernel"].shape[0] == 3
  np.testing.assert_allclose(scan_model.apply({"params": scan_params}, tokens),
                             loop_model.apply({"params": loop_params}, tokens), atol=1e-5)


def test_sown_residual_norms_are_the_block_branches():
  cfg = models.TransformerConfig(**BASE)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  model, params = _init(cfg, tokens)
  _, state = model.apply({"params": params}, tokens, mutable=["stats", "intermediates"])
  x_norm = models.per_layer(state["stats"], "attn_input_norm")
  r_norm = models.per_layer(state["stats"], "attn_residual_norm")
  assert x_norm.shape == r_norm.shape == (3, 2, 12)
  # Independent check of layer 0: its input is embeddings + positions.
  x0 = jnp.take(params["embed"]["embedding"], tokens, axis=0) + params["pos_embed"]["embedding"][:12]
  np.testing.assert_allclose(x_norm[0], jnp.linalg.norm(x0, axis=-1), rtol=1e-5)
  block = models.Block(cfg)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  h = block.apply({"params": params["block_0"]}, x0, method=lambda b, x: b.ln_attn(x))
  a = block.apply({"params": params["block_0"]}, h, pos, method=lambda b, h, p: b.attn(h, p))
  np.testing.assert_allclose(r_norm[0], jnp.linalg.norm(a, axis=-1), rtol=1e-5)


def test_positions_and_padding_mask_give_left_padding_invariance():
  cfg = models.TransformerConfig(**BASE, position_offset=2)
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 61)
  model, params = _init(cfg, tokens)
  plain = model.apply({"params": params}, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 10), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = model.apply({"params": params}, padded, positions, mask)
  np.testing.assert_allclose(out[:, 3:], plain, atol=1e-5)


def test_bfloat16_activations_keep_float32_params():
  cfg = models.TransformerConfig(**BASE, dtype="bfloat16")
  tokens = jnp.ones((1, 8), jnp.int32)
  model, params = _init(cfg, tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_unknown_model_field_is_named():
  with pytest.raises(ValueError, match="config.model.num_layer is not a model field"):
    models.build({"num_layer": 3})


@pytest.mark.parametrize("rule", ["identity", "ln"])
def test_post_ln_skip_rule(rule):
  """A skipped post-LN attention block gives y = x ('identity') or y = LN(x) ('ln', RR §4.4)."""
  cfg = models.TransformerConfig(**BASE, norm="post", final_norm=False, post_ln_skip=rule)
  block = models.Block(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  params = nn.meta.unbox(block.init(jax.random.key(1), x, pos)["params"])
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  m = jnp.array([[1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1]], jnp.float32)
  out = block.apply({"params": params, "gate_override": {"attn": m, "ffn": jnp.ones_like(m)}}, x, pos)
  run = lambda fn, *a: block.apply({"params": params}, *a, method=fn)
  a = run(lambda b, x, p: b.attn(x, p), x, pos)
  skipped = x if rule == "identity" else run(lambda b, x: b.ln_attn(x), x)
  h = jnp.where(m[..., None] > 0, run(lambda b, x: b.ln_attn(x), x + a), skipped)
  want = run(lambda b, h: b.ln_ffn(h + b.mlp(h)), h)
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_post_ln_skip_is_validated():
  from skipjax.validation import validate_model
  import ml_collections
  m = ml_collections.ConfigDict({**BASE, "head_dim": 0, "activation": "gelu", "norm": "post", "position": "learned",
                                 "dtype": "float32", "dropout_rate": 0.0, "post_ln_skip": "layernorm",
                                 "skip": {"router": "none", "dispatch": "masked", "granularity": "layer",
                                          "target_density": 1.0, "gsize": 4, "capacity_factor": 1.0,
                                          "temperature": 1.0}})
  with pytest.raises(ValueError, match="config.model.post_ln_skip='layernorm'"):
    validate_model(m)
