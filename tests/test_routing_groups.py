"""Routing groups (LtS §2.2, issue 15 P2/P4/P7): token pools shared by every dispatch, capacity
over the real tokens only, and sowing under `grouped`."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from configs import lm, skiplayer
from skipjax import eval as eval_lib
from skipjax import models, routing, validation

B, T, D, H = 4, 6, 8, 16
P = 0.5


def _params(key):
  ks = jax.random.split(key, 6)
  w = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[0])
  return dict(q=w(ks[0], (D, D)), k=w(ks[1], (D, D)), v=w(ks[2], (D, D)), o=w(ks[3], (D, D)),
              w1=w(ks[4], (D, H)), w2=w(ks[5], (H, D)))


def _ffn(params, h):
  return jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def _attention(params, x):
  """Causal attention of gathered queries (positions idx in their row) to K/V of the full row."""
  k, v = x @ params["k"], x @ params["v"]

  def branch(x_sel, idx, valid):
    del valid
    scores = jnp.einsum("bcd,bsd->bcs", x_sel @ params["q"], k) / np.sqrt(D)
    visible = jnp.arange(x.shape[1])[None, None, :] <= idx[:, :, None]
    return jnp.einsum("bcs,bsd->bcd", jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1), v) @ params["o"]
  return branch


def _reference(params, x, mask):
  """The layer F(x) = h + FFN(h), h = x + Attn(x), on every token, selected with the mask."""
  idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  h = x + _attention(params, x)(x, idx, None)
  return jnp.where(mask[..., None] > 0, h + _ffn(params, h), 0.0)


@functools.partial(jax.jit, static_argnames=("method",))
def _layer_and_ffn(params, x, mask, w, *, method):
  """F(x) of `dispatch_layer` over 2-row groups (with the gradients of Σ w·F) and over half rows."""
  kw = dict(method=method, capacity_factor=1.0 / P, target_density=P, gsize=2)
  row = lambda params, x: lambda x_sel, idx, valid: x_sel + _attention(params, x)(x_sel, idx, valid)
  point = lambda params: lambda h, idx, valid: h + _ffn(params, h)

  def run(params, x):
    layer = routing.dispatch_layer(row(params, x), point(params), x, mask, group_size=2 * T, **kw)
    return jnp.sum(w * layer.output), layer
  (_, layer), grads = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, x)
  half_rows = routing.dispatch_layer(row(params, x), point(params), x, mask, group_size=T // 2, **kw)
  return (layer, half_rows), grads


def test_groups_equal_the_masked_reference_values_and_gradients():
  keys = jax.random.split(jax.random.key(0), 4)
  params, x = _params(keys[0]), jax.random.normal(keys[1], (B, T, D))
  mask = jax.random.bernoulli(keys[2], P, (B, T)).astype(jnp.float32)
  w = jax.random.normal(keys[3], (B, T, D))
  reference = lambda params, x: (jnp.sum(w * _reference(params, x, mask)), _reference(params, x, mask))
  (_, ref), ref_grads = jax.jit(jax.value_and_grad(reference, (0, 1), has_aux=True))(params, x)
  for method in ("capacity", "grouped"):  # (masked over groups: the model tests below)
    outs, grads = _layer_and_ffn(params, x, mask, w, method=method)
    for out in outs:
      np.testing.assert_array_equal(out.mask, mask)  # nothing dropped (capacity factor 1/P)
      np.testing.assert_allclose(out.output, ref, atol=1e-5, err_msg=method)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=method)


def test_capacity_pools_the_slots_of_whole_row_groups():
  """C = ⌈cf·P·S_group⌉ per group: a busy row uses the slots a quiet row of its group leaves."""
  mask = jnp.array([[1, 1, 1, 1, 1, 1, 0, 1],
                    [0, 0, 1, 0, 0, 0, 0, 0]], jnp.float32)
  x = jnp.arange(16.0).reshape(2, 8, 1)
  run = jax.jit(lambda group_size: routing.dispatch(lambda xs, idx, valid: 2 * xs, x, mask, method="capacity",
                                                    capacity_factor=1.0, target_density=P, group_size=group_size),
                static_argnums=0)
  per_row, pooled = run(0), run(16)
  assert float(per_row.metrics["dropped_tokens"]) == 3.0  # C = 4 per row: row 0 drops 3
  assert float(pooled.metrics["dropped_tokens"]) == 0.0   # C = 8 for both rows: 8 routed
  np.testing.assert_array_equal(pooled.output, 2 * x * mask[..., None])
  np.testing.assert_allclose(pooled.metrics["compute_fraction"], 8 / 16)
  # `grouped` over the same 2-row group: chunks of 3 slots of the pooled 8 routed tokens.
  grouped = jax.jit(lambda m: routing.dispatch(lambda xs, idx, valid: 2 * xs, x, m, method="grouped", gsize=3,
                                               group_size=16))(mask)
  np.testing.assert_array_equal(grouped.output, 2 * x * mask[..., None])
  np.testing.assert_allclose(grouped.metrics["compute_fraction"], 9 / 16)  # 3 chunks of 3


def test_fit_group_size_and_the_layout():
  assert routing.fit_group_size(8, 16, 0) == 16
  assert routing.fit_group_size(8, 16, 4) == 4
  assert routing.fit_group_size(8, 16, 64) == 64            # 4 rows
  assert routing.fit_group_size(2, 16, 64) == 32            # evaluation batch of 2 rows: both
  assert routing.fit_group_size(6, 16, 64) == 32            # gcd(4, 6) = 2 rows
  assert routing.fit_group_size(8, 12, 8) == 12             # no fit inside a row: one row
  x = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
  g = routing.to_routing_groups(x, 6)
  assert g.shape == (1, 6, 4)
  np.testing.assert_array_equal(g[0], x.reshape(6, 4))      # row 0 then row 1
  np.testing.assert_array_equal(routing.from_routing_groups(g, 3), x)
  with pytest.raises(ValueError):
    routing.to_routing_groups(x, 4)                          # neither divides nor spans rows


def test_lts_groups_save_compute_at_p():
  """P2: the lts presets' gsize 1024 = seq_len made each row one always-running chunk (fraction 1).
  The same ratios at tiny size: T = 64, gsize = T, 32-row groups."""
  config = skiplayer.get_config("lts_L6_P0.125")
  s, t = config.model.skip, config.data.seq_len
  assert (s.dispatch, s.gsize, s.group_size) == ("grouped", t, skiplayer.LTS_GROUP_ROWS * t)
  report = routing.effective_groups(config.data.batch_size, t, group_size=s.group_size, gsize=s.gsize,
                                    target_density=0.125, method="grouped")
  assert (report.groups_per_batch, report.tokens_per_group, report.chunks_per_group) == (8, 32 * t, 32)
  assert 0.125 <= report.compute_fraction <= 0.125 + 1.5 / 32
  old = routing.effective_groups(config.data.batch_size, t, group_size=0, gsize=s.gsize, target_density=0.125)
  assert old.compute_fraction == 1.0 and old.chunks_per_group == 1

  tiny_t, rows = 64, skiplayer.LTS_GROUP_ROWS
  x = jnp.ones((2 * rows, tiny_t, 2))
  mask = jax.random.bernoulli(jax.random.key(0), 0.125, (2 * rows, tiny_t)).astype(jnp.float32)
  run = jax.jit(lambda m, group_size: routing.dispatch_layer(
      lambda xs, idx, valid: xs + 1, lambda h, idx, valid: 2 * h, x, m, method="grouped",
      target_density=0.125, gsize=tiny_t, group_size=group_size).metrics, static_argnums=1)
  new, old = run(mask, rows * tiny_t), run(mask, 0)
  assert 0.125 <= float(new["compute_fraction"]) <= 0.125 + 2 / 32
  # Attention stays per row, in chunks of a row's share of gsize (here 2 of 64 tokens): at this tiny
  # T the busiest of 64 rows sets the count (at T = 1024: 0.166, `report.row_compute_fraction`).
  assert float(new["row_compute_fraction"]) < 0.4
  assert float(old["compute_fraction"]) == float(old["row_compute_fraction"]) == 1.0


def test_expected_grouped_fraction_matches_sampling():
  groups, tokens, gsize, p = 8, 512, 32, 0.125
  n = np.random.default_rng(0).binomial(tokens, p, size=(20000, groups))  # routed per group
  chunks = np.maximum(1, np.ceil(n / gsize).max(axis=1))
  np.testing.assert_allclose(routing.expected_grouped_fraction(groups, tokens, gsize, p),
                             np.mean(chunks) * gsize / tokens, atol=3e-3)


@pytest.mark.parametrize("group_size,match", [
    (24, r"config.model.skip.group_size=24 must divide the sequence length 64 or be a multiple"),
    (192, r"config.model.skip.group_size=192 spans 3 rows, which does not divide the batch size 8"),
    (256, r"config.model.skip.group_size=256 gives 2 routing groups per batch, not divisible by the mesh data "
          r"axis \(4\)"),
    (-1, r"config.model.skip.group_size=-1 must be an integer >= 0"),
])
def test_group_size_errors_name_the_field(group_size, match):
  config = lm.get_config("tiny")
  with config.unlocked():
    config.data.update(batch_size=8, seq_len=64)
    config.model.skip.update(router="gumbel", target_density=0.5, group_size=group_size)
    config.mesh.shape = (4, 1)
  with pytest.raises(ValueError, match=match) as err:
    validation.validate(config, 4)
  assert "\n" not in str(err.value)
  with config.unlocked():
    config.model.skip.group_size = 128  # 2 rows: 4 groups over 4 data shards
  validation.validate(config, 4)


# ----------------------------------------------------------------------------- in the model

BASE = models.TransformerConfig(vocab_size=61, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=32)


def _model(**skip):
  kw = dict(router="top1", target_density=0.5, granularity="layer", gsize=4)
  return models.build(dataclasses.replace(BASE, skip=models.SkipConfig(**{**kw, **skip})))


def _init(model, tokens):
  params = nn.meta.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, tokens)["params"])
  return _helpers.perturb_routers(params)


@pytest.fixture(scope="module")
def applied():
  """{method: (logits, state)} of a routed model over 2-row groups, sowing every collection."""
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 61)
  params = _init(_model(), tokens)
  mutable = ["gates", "activations", "intermediates"]
  apply = lambda model: jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=mutable,
                                                      capture_intermediates=True))(params)
  return {method: apply(_model(dispatch=method, group_size=16, capacity_factor=2.0)) for method in routing.METHODS}


def test_model_over_whole_row_groups_equals_masked(applied):
  """The Block's routed layer over 2-row groups (attention per row, FFN over the group) equals
  masked; gradients through the same dispatches: test_groups_equal_the_masked_reference_*."""
  ref, _ = applied["masked"]
  for method in ("capacity", "grouped"):
    out, state = applied[method]
    assert float(state["gates"]["block_0"]["layer_dropped_fraction"][0]) == 0.0
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_capacity_scores_do_not_depend_on_padding():
  """P4: C came from the padded length (and scoring passed no attention mask), so `padded` differed
  from `alone`; now each row keeps ⌈cf·P·n_valid⌉ of its real tokens."""
  model = _model(dispatch="capacity", capacity_factor=0.5)
  params = _init(model, jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  context, option = [int(t) for t in rng.integers(0, 58, 6)], [int(t) for t in rng.integers(0, 58, 3)]
  long = [int(t) for t in rng.integers(0, 58, 25)]
  alone = eval_lib.continuation_logprobs(model, params, [(context, option)], batch_size=1)  # length 8
  padded = eval_lib.continuation_logprobs(model, params, [(context, option), (long, option)], batch_size=4)
  np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)

  def direct(seq, length, rows):  # the model applied without any attention mask (the old scoring)
    inputs = np.zeros((rows, length), np.int32)
    inputs[0, :len(seq) - 1] = seq[:-1]
    logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, inputs)[0], axis=-1)
    return sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(option))

  np.testing.assert_allclose(alone[0], direct(context + option, 8, 1), atol=1e-5)  # no padding: unchanged


def test_grouped_apply_sows_activations_of_chunk_zero(applied):
  """P7: a sow inside grouped's lax.scan/lax.cond leaked a tracer (jit: UnexpectedTracerError);
  now only chunk 0 sows: the FFN activations of the first gsize routed tokens of each group."""
  (_, ref_state), (_, state) = applied["masked"], applied["grouped"]
  ref_hidden = ref_state["activations"]["block_0"]["mlp"]["ffn_hidden"][0]  # [1 group of 2 rows: 2, 16, d_ff]
  (hidden,) = state["activations"]["block_0"]["mlp"]["ffn_hidden"]         # [2 groups, gsize 4, d_ff], chunk 0
  assert ref_hidden.shape == (2, 16, BASE.d_ff) and hidden.shape == (2, 4, BASE.d_ff)
  mask = np.asarray(state["gates"]["block_0"]["layer_mask"][0]).reshape(2, 16) > 0  # [B, T] -> groups
  assert mask.sum(axis=1).min() >= 4
  for g in range(2):
    first = np.flatnonzero(mask[g])[:4]  # the first gsize routed tokens of the group
    np.testing.assert_allclose(hidden[g], ref_hidden[g, first], atol=1e-5)


def test_routing_benchmark_reports_the_lts_preset_groups(capsys):
  """`python -m benchmarks.routing --parts groups`: one row per LtS density, from the presets themselves."""
  from benchmarks import routing as routing_bench
  routing_bench.lts_groups_table()
  out = capsys.readouterr().out
  c = skiplayer.get_config("lts_L24_P0.125")
  g = routing.effective_groups(c.data.batch_size, c.data.seq_len, group_size=c.model.skip.group_size,
                               gsize=c.model.skip.gsize, target_density=0.125, method=c.model.skip.dispatch)
  assert f"| lts_L24_P0.125 | {g.groups_per_batch} | {g.tokens_per_group} | {g.gsize} |" in out
  assert g.compute_fraction < 0.2 and out.count("| 1.000 |") == 3  # one-row groups ran every chunk
