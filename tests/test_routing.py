"""Tests for skipjax.routing: gates (LtS Eq. 3/4, ST-Gumbel), dispatch (§2.2), capacity loss."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from skipjax import routing
from skipjax.routing.dispatch import default_gsize

G, S, D, H = 3, 7, 8, 16  # S = 7 is not divisible by GSIZE = 3
GSIZE = 3
P = 0.5
NO_DROP_CF = 1.0 / P  # capacity C = S: nothing can be dropped


# ----------------------------------------------------------------------------- helpers


def _ffn_params(key, d=D, h=H):
  k1, k2 = jax.random.split(key)
  return dict(w1=jax.random.normal(k1, (d, h)) / np.sqrt(d),
              w2=jax.random.normal(k2, (h, d)) / np.sqrt(h))


def _attn_params(key, d=D):
  ks = jax.random.split(key, 4)
  return {n: jax.random.normal(k, (d, d)) / np.sqrt(d) for n, k in zip("qkvo", ks)}


def _ffn_branch(params, x):
  del x

  def branch(x_sel, idx, valid):
    del idx, valid
    return jax.nn.gelu(x_sel @ params["w1"]) @ params["w2"]

  return branch


def _attn_branch(params, x):
  """Causal attention of the gathered queries against K/V of the FULL sequence (LtS Alg. 1)."""
  k, v = x @ params["k"], x @ params["v"]  # every token, via closure
  kv_pos = jnp.arange(x.shape[1])

  def branch(x_sel, idx, valid):
    del valid
    q = x_sel @ params["q"]
    scores = jnp.einsum("gcd,gsd->gcs", q, k) / np.sqrt(q.shape[-1])
    visible = kv_pos[None, None, :] <= idx[:, :, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
    return jnp.einsum("gcs,gsd->gcd", weights, v) @ params["o"]

  return branch


BRANCHES = {"ffn": (_ffn_params, _ffn_branch), "attn": (_attn_params, _attn_branch)}


def _dense_reference(branch, params, x, mask):
  """Branch on every token at its own position, then select with the mask."""
  idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  out = BRANCHES[branch][1](params, x)(x, idx, jnp.ones(x.shape[:2], bool))
  return jnp.where(mask[..., None] > 0, out, 0.0)


def _mask_case(name, key):
  m = np.asarray(jax.random.bernoulli(key, 0.5, (G, S)), np.float32)
  if name == "random":
    pass
  elif name == "none_routed":
    m[:] = 0
  elif name == "all_routed":
    m[:] = 1
  elif name == "one_group_empty":
    m[1] = 0
  elif name == "late_tokens_only":  # only chunk 0 is non-empty after compaction
    m[:] = 0
    m[:, -2:] = 1
  return jnp.asarray(m)


def _logits_for(mask, key):
  """Router logits whose argmax is `mask`, with varied margins (so top1's g is non-trivial)."""
  a = jax.random.uniform(key, mask.shape, minval=0.2, maxval=2.0)
  return jnp.stack([jnp.zeros_like(a), jnp.where(mask > 0, a, -a)], axis=-1)


def _combined(params, x, gate, *, method, branch):
  """Dispatch the branch, then both combines (whole layer, Eq. 1/4; residual branch)."""
  out = routing.dispatch(BRANCHES[branch][1](params, x), x, gate.mask, method=method,
                         capacity_factor=NO_DROP_CF, target_density=P, gsize=GSIZE)
  ys = (routing.gated_layer_output(x, out.output, gate, out.mask),
        routing.gated_residual(x, out.output, gate, out.mask))
  return ys, (out.output, out.mask)


# One compilation per (method, branch), shared by every mask case and gate kind: the gate is an
# input, so gradients w.r.t. the gate coefficients (scale_on/scale_off) are compared directly.
@functools.partial(jax.jit, static_argnames=("method", "branch"))
def _values_and_grads(params, x, gate, w_layer, w_res, *, method, branch):
  fn = functools.partial(_combined, method=method, branch=branch)
  ys, vjp, aux = jax.vjp(fn, params, x, gate, has_aux=True)
  grads_layer = vjp((w_layer, jnp.zeros_like(w_res)))
  grads_res = vjp((jnp.zeros_like(w_layer), w_res))
  return ys, aux, (grads_layer, grads_res)


def _run_all_methods(branch, params, x, gate, key):
  w_layer, w_res = jax.random.normal(key, (2,) + x.shape)
  return {method: _values_and_grads(params, x, gate, w_layer, w_res, method=method,
                                    branch=branch)
          for method in routing.METHODS}


def _assert_methods_agree(results):
  (ys_ref, (out_ref, _), grads_ref) = results["masked"]
  for method, (ys, (out, _), grads) in results.items():
    np.testing.assert_allclose(out, out_ref, atol=1e-5, err_msg=method)
    for y, y_ref in zip(ys, ys_ref):
      np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg=method)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      np.testing.assert_allclose(g, g_ref, atol=1e-5, err_msg=f"{method} grad")


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("branch", ["ffn", "attn"])
@pytest.mark.parametrize("case", ["random", "none_routed", "all_routed", "one_group_empty",
                                  "late_tokens_only"])
def test_dispatch_methods_agree_values_and_gradients(branch, case):
  keys = jax.random.split(jax.random.key(sum(map(ord, branch + case))), 5)
  params = BRANCHES[branch][0](keys[0])
  x = jax.random.normal(keys[1], (G, S, D))
  mask = _mask_case(case, keys[2])
  logits = _logits_for(mask, keys[3])
  gate = routing.top1_gate(logits)
  np.testing.assert_array_equal(gate.mask, mask)
  results = _run_all_methods(branch, params, x, gate, keys[4])
  _assert_methods_agree(results)
  ref_out = _dense_reference(branch, params, x, mask)
  g = jax.nn.softmax(logits, axis=-1)
  for method, ((y_layer, y_res), (out, eff_mask), grads) in results.items():
    np.testing.assert_array_equal(eff_mask, mask)  # nothing dropped
    np.testing.assert_allclose(out, ref_out, atol=1e-5, err_msg=method)
    # Eq. 4 by hand: g1·F at routed tokens, g0·x elsewhere; residual: x + g1·R at routed.
    np.testing.assert_allclose(
        y_layer, jnp.where(mask[..., None] > 0, g[..., 1:] * ref_out, g[..., :1] * x), atol=1e-5)
    np.testing.assert_allclose(y_res, x + mask[..., None] * g[..., 1:] * ref_out, atol=1e-5)
  # The gate coefficients do receive gradient (where they are used).
  gate_grads = results["masked"][2][0][2]
  assert np.all((np.asarray(gate_grads.scale_on) != 0) == (np.asarray(mask) > 0))
  assert np.all((np.asarray(gate_grads.scale_off) != 0) == (np.asarray(mask) == 0))


@pytest.mark.parametrize("branch", ["ffn", "attn"])
def test_dispatch_methods_agree_with_st_gumbel_gate(branch):
  keys = jax.random.split(jax.random.key(7), 5)
  params = BRANCHES[branch][0](keys[0])
  x = jax.random.normal(keys[1], (G, S, D))
  gate = routing.gumbel_gate(jax.random.normal(keys[2], (G, S, 2)), keys[3], temperature=0.5)
  results = _run_all_methods(branch, params, x, gate, keys[4])
  _assert_methods_agree(results)
  m = np.asarray(gate.mask)[..., None] > 0
  for (y_layer, y_res), (out, _), _ in results.values():
    # ST forward is exact: y is exactly F(x) where routed, exactly x where skipped.
    np.testing.assert_array_equal(y_layer, jnp.where(m, out, x))
    np.testing.assert_array_equal(y_res, jnp.where(m, x + out, x))


def test_unrouted_positions_do_not_leak_gradient_into_branch():
  x = jax.random.normal(jax.random.key(0), (G, S, D))
  mask = _mask_case("random", jax.random.key(1))

  def loss(x_in, method):
    out = routing.dispatch(lambda xs, i, v: xs ** 2, x_in, mask, method=method,
                           capacity_factor=NO_DROP_CF, target_density=P, gsize=GSIZE).output
    return jnp.sum(out)

  for method in routing.METHODS:
    g = jax.jit(jax.grad(loss), static_argnums=1)(x, method)
    np.testing.assert_allclose(g, 2 * x * mask[..., None], atol=1e-6)


def test_capacity_drops_the_later_overflow_tokens_and_counts_them():
  mask = jnp.array([[1, 1, 0, 1, 1, 1, 0, 1],
                    [0, 1, 0, 0, 0, 0, 0, 1]], jnp.float32)
  assert routing.capacity_slots(8, 0.5, 0.75) == 3  # C = ceil(0.75 · 0.5 · 8)
  x = jax.random.normal(jax.random.key(0), (2, 8, 4))
  branch = lambda xs, idx, valid: 2.0 * xs + idx[..., None].astype(xs.dtype)
  run = jax.jit(lambda x, m, method: routing.dispatch(
      branch, x, m, method=method, capacity_factor=0.75, target_density=0.5, gsize=3),
                static_argnums=2)
  out = run(x, mask, "capacity")
  expected_mask = np.array([[1, 1, 0, 1, 0, 0, 0, 0],
                            [0, 1, 0, 0, 0, 0, 0, 1]], np.float32)
  np.testing.assert_array_equal(out.mask, expected_mask)
  assert out.mask.dtype == mask.dtype
  assert float(out.metrics["dropped_tokens"]) == 3.0
  np.testing.assert_allclose(out.metrics["dropped_fraction"], 3 / 8)
  np.testing.assert_allclose(out.metrics["routed_fraction"], 5 / 16)
  np.testing.assert_allclose(out.metrics["compute_fraction"], 3 / 8)
  full = 2.0 * x + jnp.arange(8.0)[None, :, None]
  np.testing.assert_allclose(out.output, jnp.where(expected_mask[..., None] > 0, full, 0.0),
                             atol=1e-6)
  # Combined with a top1 gate (scale_off = g0 ≠ 1): dropped tokens pass x through exactly.
  gate = routing.top1_gate(_logits_for(mask, jax.random.key(1)))
  y = routing.gated_layer_output(x, out.output, gate, out.mask)
  dropped = (np.asarray(mask) - expected_mask) > 0
  np.testing.assert_array_equal(np.asarray(y)[dropped], np.asarray(x)[dropped])
  y_res = routing.gated_residual(x, out.output, gate, out.mask)
  np.testing.assert_array_equal(np.asarray(y_res)[dropped], np.asarray(x)[dropped])
  # Other methods never drop.
  for method in ("masked", "grouped"):
    other = run(x, mask, method)
    np.testing.assert_array_equal(other.mask, mask)
    assert float(other.metrics["dropped_tokens"]) == 0.0


def test_capacity_matches_masked_on_its_effective_mask_incl_gradients():
  keys = jax.random.split(jax.random.key(3), 4)
  params = _attn_params(keys[0])
  x = jax.random.normal(keys[1], (G, S, D))
  mask = _mask_case("random", keys[2])

  def loss(params, x, method, m):
    out = routing.dispatch(_attn_branch(params, x), x, m, method=method, capacity_factor=0.6,
                           target_density=P)
    return jnp.sum(jnp.sin(out.output)), out.mask

  grad_fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)
  (_, eff), g_cap = grad_fn(params, x, "capacity", mask)
  assert float(jnp.sum(mask - eff)) > 0  # something was dropped
  (_, _), g_ref = grad_fn(params, x, "masked", eff)
  for a, b in zip(jax.tree.leaves(g_cap), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_grouped_dispatch_uses_cond_inside_scan_and_skips_empty_chunks():
  x = jax.random.normal(jax.random.key(0), (G, 10, D))
  params = _ffn_params(jax.random.key(1))

  def run(x, mask):
    out = routing.dispatch(_ffn_branch(params, x), x, mask, method="grouped", gsize=GSIZE)
    return jnp.sum(out.output), out.metrics["compute_fraction"]

  mask = jnp.ones((G, 10))
  jaxpr = str(jax.make_jaxpr(run)(x, mask))
  assert "scan" in jaxpr and "cond" in jaxpr
  grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, m: run(x, m)[0]))(x, mask))
  assert "scan" in grad_jaxpr and "cond" in grad_jaxpr
  # Count branch executions at run time: 4 chunks of 3 slots for 10 tokens.
  calls = []

  def counting_branch(xs, idx, valid):
    jax.debug.callback(lambda: calls.append(1))
    return xs * 2.0

  run_counting = jax.jit(lambda m: routing.dispatch(counting_branch, x, m, method="grouped",
                                                     gsize=GSIZE).output)

  def count(mask):
    calls.clear()
    jax.block_until_ready(run_counting(mask))
    jax.effects_barrier()
    return len(calls)

  assert count(jnp.ones((G, 10))) == 4
  few = jnp.zeros((G, 10)).at[0, 9].set(1).at[2, 4:7].set(1)  # ≤ 3 routed per group
  assert count(few) == 1
  assert count(jnp.zeros((G, 10)).at[1, :4].set(1)) == 2  # 4 routed in one group: 2 chunks
  _, frac = jax.jit(run)(x, few)
  np.testing.assert_allclose(frac, G * GSIZE / (G * 10))


def test_routing_groups_for_pointwise_branches():
  x = jax.random.normal(jax.random.key(0), (2, 12, D))
  mask = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 12)).astype(jnp.float32)
  xg, mg = routing.to_routing_groups(x, 4), routing.to_routing_groups(mask, 4)
  assert xg.shape == (6, 4, D) and mg.shape == (6, 4)
  np.testing.assert_array_equal(routing.from_routing_groups(xg, 12), x)
  params = _ffn_params(jax.random.key(2))
  run = jax.jit(lambda xg, mg: routing.dispatch(_ffn_branch(params, None), xg, mg,
                                                 method="grouped", gsize=2).output)
  out = run(xg, mg)
  ref = _dense_reference("ffn", params, x, mask)
  np.testing.assert_allclose(routing.from_routing_groups(out, 12), ref, atol=1e-5)
  with pytest.raises(ValueError):
    routing.to_routing_groups(x, 5)


class _SkipFFN(nn.Module):
  """A minimal SkipLayer around a Dense branch (model-like use of Router + dispatch)."""
  method: str

  @nn.compact
  def __call__(self, x, deterministic=False):
    gate = routing.Router(kind="gumbel", target_density=P)(x, deterministic)
    dense = nn.Dense(x.shape[-1])
    out = routing.dispatch(lambda xs, i, v: nn.gelu(dense(xs)), x, gate.mask, method=self.method,
                           capacity_factor=NO_DROP_CF, target_density=P, gsize=GSIZE)
    return routing.gated_layer_output(x, out.output, gate, out.mask)


def test_flax_module_branch_inits_and_differentiates_through_grouped_dispatch():
  x = jax.random.normal(jax.random.key(0), (G, S, D))
  rngs = {"params": jax.random.key(1), "gate": jax.random.key(2)}
  # Init through `grouped` (scan + cond): params are created by the unconditional first chunk.
  variables = _SkipFFN("grouped").init(rngs, x)  # eager on purpose: no outer trace
  assert all(not isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(variables))
  masked_shapes = jax.eval_shape(_SkipFFN("masked").init, rngs, x)
  assert jax.tree.structure(masked_shapes) == jax.tree.structure(variables)
  grads, ys = [], []
  for method in ("masked", "grouped"):
    fn = lambda p: jnp.sum(_SkipFFN(method).apply(p, x, rngs={"gate": jax.random.key(3)}) ** 2)
    y, g = jax.jit(jax.value_and_grad(fn))(variables)
    ys.append(y)
    grads.append(g)
  for y, g in zip(ys[1:], grads[1:]):
    np.testing.assert_allclose(y, ys[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads[0])):
      np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- routers


def test_st_gumbel_forward_is_exactly_binary():
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 64, D))
  router = routing.Router(kind="gumbel", temperature=0.5, target_density=0.3)
  params = jax.jit(router.init)({"params": jax.random.key(1), "gate": jax.random.key(2)}, x)
  params = {"params": {**params["params"], "kernel": params["params"]["kernel"].replace_boxed(
      params["params"]["kernel"].value * 50.0)}}  # large logits: saturated soft values
  for apply in (router.apply, jax.jit(router.apply)):
    gate = apply(params, x, rngs={"gate": jax.random.key(3)})
    assert set(np.unique(gate.mask)) <= {0.0, 1.0}
    assert 0 < float(gate.mask.mean()) < 1
    np.testing.assert_array_equal(gate.scale_on, gate.mask)
    np.testing.assert_array_equal(gate.scale_off, 1.0 - gate.mask)
    assert gate.mask.dtype == jnp.float32
    assert set(np.unique(gate.scale_on)) <= {0.0, 1.0}
  # The ST value is exact under grad too (value_and_grad traces the custom JVP).
  logits = jax.random.normal(jax.random.key(4), (100, 2)) * 3
  val, _ = jax.jit(jax.value_and_grad(
      lambda l: routing.gumbel_gate(l, jax.random.key(5), 0.3).scale_on.sum()))(logits)
  gate = jax.jit(routing.gumbel_gate, static_argnums=2)(logits, jax.random.key(5), 0.3)
  assert float(val) == float(gate.mask.sum())


def test_st_gumbel_deterministic_is_noise_free_argmax():
  x = jax.random.normal(jax.random.key(0), (2, 50, D))
  router = routing.Router(kind="gumbel", target_density=0.5)
  params = jax.jit(router.init, static_argnames="deterministic")(
      {"params": jax.random.key(1)}, x, deterministic=True)
  params = jax.tree.map(lambda p: p * 30.0, params)
  apply = jax.jit(router.apply, static_argnames="deterministic")
  gate = apply(params, x, deterministic=True)  # no 'gate' rng needed
  p = params["params"]
  logits = x @ p["kernel"].value + p["bias"].value
  np.testing.assert_array_equal(gate.mask, (logits[..., 1] > logits[..., 0]).astype(np.float32))
  np.testing.assert_allclose(gate.probs, jax.nn.softmax(logits)[..., 1], rtol=1e-5)
  sampled = apply(params, x, rngs={"gate": jax.random.key(2)})
  assert np.any(np.asarray(sampled.mask) != np.asarray(gate.mask))


def test_st_gumbel_gradient_is_the_soft_relaxation_gradient():
  logits = jax.random.normal(jax.random.key(0), (5, 40, 2))
  w = jax.random.normal(jax.random.key(1), (5, 40, 2))
  key, tau = jax.random.key(2), 0.7

  def st(l):
    gate = routing.gumbel_gate(l, key, tau)
    return jnp.sum(w[..., 0] * gate.scale_off + w[..., 1] * gate.scale_on)

  def soft(l):
    noise = jax.random.gumbel(key, l.shape, jnp.float32)
    return jnp.sum(w * jax.nn.softmax((l + noise) / tau, axis=-1))

  np.testing.assert_allclose(jax.jit(jax.grad(st))(logits), jax.jit(jax.grad(soft))(logits),
                             atol=1e-6)
  # Forward differs from the soft value (it is the hard sample).
  assert not np.isclose(float(st(logits)), float(soft(logits)))


def test_st_gumbel_route_rate_matches_probs():
  logits = jax.random.normal(jax.random.key(0), (200_000, 2))
  gate = routing.gumbel_gate(logits, jax.random.key(1), temperature=0.3)
  np.testing.assert_allclose(gate.mask.mean(), gate.probs.mean(), atol=0.005)


def test_top1_gate_scales_by_softmax_eq4():
  x = jax.random.normal(jax.random.key(0), (3, 9, D))
  router = routing.Router(kind="top1", use_bias=False)
  params = jax.jit(router.init)(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p * 40.0, params)
  gate = jax.jit(router.apply)(params, x)
  kernel = np.asarray(params["params"]["kernel"].value, np.float64)
  a = np.asarray(jax.random.normal(jax.random.key(2), (D, D)))
  xn = np.asarray(x, np.float64)
  f = np.tanh(xn @ a)
  logits = xn @ kernel
  g = np.exp(logits - logits.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  routed = np.argmax(logits, -1) == 1
  expected = np.where(routed[..., None], g[..., 1:] * f, g[..., :1] * xn)
  assert 0 < routed.mean() < 1
  np.testing.assert_array_equal(gate.mask, routed.astype(np.float32))
  y = routing.gated_layer_output(x, jnp.tanh(x @ a), gate)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_sigmoid_gate_threshold(threshold):
  logits = jax.random.normal(jax.random.key(0), (1000, 2))
  gate = routing.gate_from_logits(logits, "sigmoid", threshold=threshold)
  p = jax.nn.sigmoid(logits[:, 1] - logits[:, 0])
  np.testing.assert_array_equal(gate.mask, (p > threshold).astype(np.float32))
  np.testing.assert_allclose(gate.scale_on, p, rtol=1e-6)
  np.testing.assert_allclose(gate.scale_off, 1 - p, rtol=1e-6)
  if threshold == 0.5:  # σ(l1 − l0) = softmax(l)[1]: same as top1
    top1 = routing.top1_gate(logits)
    np.testing.assert_array_equal(gate.mask, top1.mask)
    np.testing.assert_allclose(gate.scale_on, top1.scale_on, atol=1e-6)


def test_random_gate_rate_and_identical_param_trees():
  x = jnp.ones((50, 400, D))
  trees = {}
  for kind in routing.KINDS:
    router = routing.Router(kind=kind, target_density=0.3)
    variables = jax.jit(router.init)({"params": jax.random.key(0), "gate": jax.random.key(1)},
                                     x[:1])
    trees[kind] = jax.tree.structure(variables)
    gate = jax.jit(router.apply)(variables, x, rngs={"gate": jax.random.key(2)})
    assert gate.mask.shape == x.shape[:-1]
    if kind == "random":
      np.testing.assert_allclose(gate.mask.mean(), 0.3, atol=0.01)
      np.testing.assert_allclose(gate.probs, 0.3)
      np.testing.assert_array_equal(gate.scale_on, 1.0)
    if kind == "none":
      for a in (gate.mask, gate.scale_on, gate.scale_off, gate.probs):
        np.testing.assert_array_equal(a, 1.0)
  assert len(set(trees.values())) == 1
  with pytest.raises(ValueError):
    routing.Router(kind="bogus").init(jax.random.key(0), x[:1])


def test_router_params_are_logically_partitioned_and_biased_toward_target():
  x = jax.random.normal(jax.random.key(0), (2000, D))
  router = routing.Router(kind="gumbel", target_density=0.2)
  variables = jax.jit(router.init)({"params": jax.random.key(1), "gate": jax.random.key(2)}, x)
  assert variables["params"]["kernel"].names == ("embed", None)
  assert variables["params"]["kernel"].value.shape == (D, 2)
  gate = jax.jit(router.apply)(variables, x, rngs={"gate": jax.random.key(3)})
  np.testing.assert_allclose(gate.mask.mean(), 0.2, atol=0.04)


# ----------------------------------------------------------------------------- capacity


def test_capacity_loss_value_and_gradient():
  key = jax.random.split(jax.random.key(0), 3)
  probs = jax.random.uniform(key[0], (3, 4, 10))
  masks = jax.random.bernoulli(key[1], 0.4, (3, 4, 10)).astype(jnp.float32)
  weights = (jax.random.uniform(key[2], (4, 10)) > 0.2).astype(jnp.float32)
  target = jnp.array([0.2, 0.5, 0.8])
  w = np.asarray(weights)
  r_hard = (np.asarray(masks) * w).sum((1, 2)) / w.sum()
  loss = routing.capacity_loss(probs, masks, target, weights)
  np.testing.assert_allclose(loss, np.sum((r_hard - np.asarray(target)) ** 2), rtol=1e-5)
  # list input and scalar P.
  np.testing.assert_allclose(routing.capacity_loss(list(probs), list(masks), 0.3),
                             np.sum((np.asarray(masks).mean((1, 2)) - 0.3) ** 2), rtol=1e-5)
  # r is straight-through: forward hard, Jacobian of the soft fraction.
  r = routing.routed_fractions(probs, masks, weights)
  np.testing.assert_allclose(r, r_hard, rtol=1e-6)
  soft = lambda p: jnp.sum(p * weights, axis=(1, 2)) / jnp.sum(weights)
  st_jacobian = jax.jit(jax.jacobian(lambda p: routing.routed_fractions(p, masks, weights)))
  np.testing.assert_allclose(st_jacobian(probs), jax.jit(jax.jacobian(soft))(probs), atol=1e-7)
  grad = jax.jit(jax.grad(lambda p: routing.capacity_loss(p, masks, target, weights)))(probs)
  _, vjp = jax.vjp(soft, probs)
  (expected,) = vjp(2.0 * (jnp.asarray(r_hard, jnp.float32) - target))
  np.testing.assert_allclose(grad, expected, atol=1e-7)
  assert np.all(np.asarray(jax.grad(lambda m: routing.capacity_loss(probs, m, 0.5))(masks)) == 0)


@pytest.mark.parametrize("kind", ["gumbel", "top1"])
def test_capacity_loss_alone_drives_rates_to_target(kind):
  targets = jnp.array([0.2, 0.5, 0.8])
  num_layers = targets.shape[0]
  x = jax.random.normal(jax.random.key(0), (num_layers, 2048, D))
  router = routing.Router(kind=kind, target_density=0.5)
  init = jax.vmap(lambda k, xi: router.init({"params": k, "gate": k}, xi))
  params = init(jax.random.split(jax.random.key(1), num_layers), x)
  params = jax.tree.map(lambda p: p * 10.0, params)  # a bit of input dependence
  opt = optax.adam(0.05)

  def gates(params, rng):
    rngs = jax.random.split(rng, num_layers)
    return jax.vmap(lambda p, xi, k: router.apply(p, xi, rngs={"gate": k}))(params, x, rngs)

  def loss(params, rng):
    gate = gates(params, rng)
    return routing.capacity_loss(gate.probs, gate.mask, targets)

  @jax.jit
  def step(params, state, rng):
    grads = jax.grad(loss)(params, rng)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for rng in jax.random.split(jax.random.key(2), 200):
    params, state = step(params, state, rng)
  r = gates(params, jax.random.key(3)).mask.mean(axis=-1)
  np.testing.assert_allclose(r, targets, atol=0.05)


def test_effective_depth_and_flops():
  np.testing.assert_allclose(routing.effective_depth(jnp.array([0.5, 0.25, 1.0, 0.25])), 2.0)
  d, t = 64, 32
  dense = routing.flops_per_token([1.0] * 3, d_model=d, d_ff=4 * d, seq_len=t, num_heads=4,
                                  router=False)
  np.testing.assert_allclose(dense, 3 * (24 * d * d + 4 * t * d))  # the 2·12d² convention
  skipped = routing.flops_per_token([0.0] * 3, d_model=d, d_ff=4 * d, seq_len=t, num_heads=4)
  np.testing.assert_allclose(skipped, 3 * (4 * d * d + 4 * d))  # K/V + router always
  half = routing.layer_flops_per_token(0.5, d_model=d, d_ff=4 * d, seq_len=t, num_heads=4,
                                       causal=True, ffn_matrices=3)
  expected = 4 * d * d + 4 * d + 0.5 * (4 * d * d + 4 * (t + 1) / 2 * d + 6 * d * 4 * d)
  np.testing.assert_allclose(half, expected)
  with_vocab = routing.flops_per_token([1.0], d_model=d, d_ff=4 * d, seq_len=t, num_heads=4,
                                       router=False, vocab_size=100)
  np.testing.assert_allclose(with_vocab, 24 * d * d + 4 * t * d + 2 * d * 100)


def test_dispatch_rejects_bad_arguments():
  x = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError):
    routing.dispatch(lambda a, b, c: a, x, jnp.ones((2, 5)))
  with pytest.raises(ValueError):
    routing.dispatch(lambda a, b, c: a, x, jnp.ones((2, 4)), method="sparse")
  assert default_gsize(128, 0.25) == 8
