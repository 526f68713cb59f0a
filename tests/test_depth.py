"""Importance measures and pruned checkpoints (skipjax/depth/importance.py, prune.py).

Every measure is checked against a reference built without plans or interception: the blocks run
one at a time (`Block.apply` on each layer's params, attention and FFN separately) from
embeddings computed in numpy, and the LM head in numpy.
"""
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skipjax import models
from skipjax.convert import export
from skipjax.depth import importance, prune
from skipjax.models.block import Block

L, V, D, T, N = 3, 32, 16, 8, 4


@pytest.fixture(scope="module")
def tiny():
  cfg = models.TransformerConfig(vocab_size=V, d_model=D, num_heads=2, num_layers=L, d_ff=32, max_len=16)
  params = nn.meta.unbox(jax.jit(models.build(cfg).init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  # Layers of different strength (the default init barely changes the stream).
  for i, s in enumerate((6.0, 2.0, 9.0)):
    params[f"block_{i}"] = jax.tree.map(lambda a, s=s: a * s if a.ndim >= 2 else a, params[f"block_{i}"])
  batch = {"inputs": rng.integers(0, V, (N, T)).astype(np.int32),
           "targets": rng.integers(0, V, (N, T)).astype(np.int32)}
  return cfg, params, batch


def halves(batch):
  """Two calibration batches of N/2 sequences (one shape, so one compilation per plan)."""
  return [{k: v[:N // 2] for k, v in batch.items()}, {k: v[N // 2:] for k, v in batch.items()}]


@functools.lru_cache(maxsize=None)
def _block_apply(cfg, branches):
  """One Block (one branch) on its own params, jitted once per branch (the reference route)."""
  block = Block(cfg)
  return jax.jit(lambda p, h, positions, i: block.apply({"params": p}, h, positions, None, i, None, branches))


def ref_states(cfg, params, tokens, removed=()):
  """Hidden states by running Block.apply one block at a time: [(x_in, mid, x_out) per layer].

  `removed`: layers (ints) or (layer, branch) blocks that do not run."""
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  x = np.asarray(params["embed"]["embedding"])[tokens] + np.asarray(params["pos_embed"]["embedding"])[positions]
  x = jnp.asarray(x, jnp.float32)
  out = []
  for i in range(cfg.num_layers):
    run = lambda h, branches, i=i: _block_apply(cfg, branches)(params[f"block_{i}"], h, jnp.asarray(positions), i)
    off = lambda b: i in removed or (i, b) in removed
    mid = x if off(0) else run(x, (True, False))
    y = mid if off(1) else run(mid, (False, True))
    out.append((np.asarray(x, np.float64), np.asarray(mid, np.float64), np.asarray(y, np.float64)))
    x = y
  return out


def ref_nll(cfg, params, batch, removed=()):
  x = ref_states(cfg, params, batch["inputs"], removed)[-1][2]
  ln = params["ln_final"]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  logits = h @ np.asarray(params["embed"]["embedding"], np.float64).T                  # [N, T, V]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, batch["targets"][..., None], -1).mean())


def cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_hidden_states_equal_block_by_block(tiny):
  cfg, params, batch = tiny
  first = halves(batch)[0]
  h = importance.hidden_states(cfg, params, first)
  ref = ref_states(cfg, params, first["inputs"])
  assert h.shape == (2 * L + 1, N // 2, T, D)
  for i, (x, mid, y) in enumerate(ref):
    np.testing.assert_allclose(h[2 * i], x, atol=1e-5)
    np.testing.assert_allclose(h[2 * i + 1], mid, atol=1e-5)
    np.testing.assert_allclose(h[2 * i + 2], y, atol=1e-5)


def test_block_influence_equals_numpy(tiny):
  cfg, params, batch = tiny
  s = importance.block_influence(cfg, params, halves(batch))
  ref = ref_states(cfg, params, batch["inputs"])
  layer = [1 - cos(x, y).mean() for x, _, y in ref]
  block = [[1 - cos(x, m).mean(), 1 - cos(m, y).mean()] for x, m, y in ref]
  np.testing.assert_allclose(s.layer, layer, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(s.block, block, rtol=1e-4, atol=1e-7)
  assert len(set(np.round(s.layer, 6))) == L  # the layers differ, so the ranking means something


def test_angular_distance_equals_numpy_and_argmin(tiny):
  cfg, params, batch = tiny
  ref = ref_states(cfg, params, batch["inputs"])
  states = [x for x, _, _ in ref] + [ref[-1][2]]                                         # x^0 … x^L
  for n in (1, 2):
    want = [np.mean(np.arccos(np.clip(cos(states[l][:, -1], states[l + n][:, -1]), -1, 1)) / np.pi)
            for l in range(L - n + 1)]
    np.testing.assert_allclose(importance.angular_distances(cfg, params, halves(batch), n), want, rtol=1e-4)
    s = importance.angular_distance(cfg, params, halves(batch), n)
    assert s.raw["start"] == int(np.argmin(want)) == importance.best_start(cfg, params, halves(batch), n)
    assert s.raw["layers"] == list(range(s.raw["start"], s.raw["start"] + n))


def test_residual_ratio_equals_numpy(tiny):
  cfg, params, batch = tiny
  s = importance.residual_ratio(cfg, params, halves(batch))
  ref = ref_states(cfg, params, batch["inputs"])
  r = np.stack([[np.linalg.norm(m - x, axis=-1) / np.linalg.norm(x, axis=-1),
                 np.linalg.norm(y - m, axis=-1) / np.linalg.norm(m, axis=-1)] for x, m, y in ref])  # [L, 2, N, T]
  np.testing.assert_allclose(s.block, np.median(r.reshape(L, 2, -1), -1), rtol=1e-4)
  np.testing.assert_allclose(s.layer, np.median(r.reshape(L, -1), -1), rtol=1e-4)


def test_ppl_drop_one_equals_numpy(tiny):
  cfg, params, batch = tiny
  s = importance.ppl_drop_one(cfg, params, batch, jit=False)  # eager: cheaper than a compile per plan here
  np.testing.assert_allclose(s.layer, [ref_nll(cfg, params, batch, [i]) for i in range(L)], rtol=1e-5)
  np.testing.assert_allclose(s.raw["base_nll"], ref_nll(cfg, params, batch), rtol=1e-5)


def test_sleb_greedy_equals_brute_force(tiny):
  cfg, params, batch = tiny
  s = importance.sleb(cfg, params, batch, 2, jit=False)
  first = min(range(L), key=lambda i: ref_nll(cfg, params, batch, [i]))
  second = min((i for i in range(L) if i != first), key=lambda i: ref_nll(cfg, params, batch, [first, i]))
  assert s.raw["order"] == [first, second]
  np.testing.assert_allclose(s.raw["nll"][1], ref_nll(cfg, params, batch, [first, second]), rtol=1e-5)
  blocks = importance.sleb(cfg, params, batch, 1, granularity="block", jit=False)
  units = [(i, b) for i in range(L) for b in range(2)]
  best = min(units, key=lambda u: ref_nll(cfg, params, batch, [u]))
  assert blocks.raw["order"] == [[best[0], importance.BRANCHES[best[1]]]]
  assert blocks.block.shape == (L, 2) and blocks.block[best] == 0


def test_taylor_equals_weight_times_grad(tiny):
  cfg, params, batch = tiny
  model = models.build(cfg)

  def loss(p):
    logp = jax.nn.log_softmax(model.apply({"params": p}, batch["inputs"]), -1)
    return -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()
  grads = jax.jit(jax.grad(loss))(params)
  s = importance.taylor(cfg, params, halves(batch))
  for i in range(L):
    wg = {k: sum(float(np.sum(np.asarray(w, np.float64) * np.asarray(g, np.float64)))
                 for w, g in zip(jax.tree.leaves(params[f"block_{i}"][k]), jax.tree.leaves(grads[f"block_{i}"][k])))
          for k in params[f"block_{i}"]}
    # per-weight |w·g| summed (the paper) and |Σ w·g| (first-order loss change of the whole layer)
    elem = sum(float(np.abs(np.asarray(w, np.float64) * np.asarray(g, np.float64)).sum())
               for w, g in zip(jax.tree.leaves(params[f"block_{i}"]), jax.tree.leaves(grads[f"block_{i}"])))
    np.testing.assert_allclose(s.layer[i], elem, rtol=1e-4)
    np.testing.assert_allclose(s.raw["sum_layer"][i], abs(sum(wg.values())), rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(s.raw["sum_block"][i], [abs(wg["ln_attn"] + wg["attn"]), abs(wg["ln_ffn"] + wg["mlp"])],
                               rtol=1e-3, atol=1e-8)


def _logits(cfg, params, tokens):
  return np.asarray(models.build(cfg).apply({"params": params}, tokens))


@pytest.mark.parametrize("measure,granularity,drop", [("bi", "layer", 1), ("ratio", "block", 2)])
def test_pruned_checkpoint_reloads_and_equals_its_plan(tiny, tmp_path, measure, granularity, drop):
  cfg, params, batch = tiny
  src = export.save(str(tmp_path / "src"), cfg, params)
  record = prune.prune(src, measure, drop, str(tmp_path / "out"), granularity, seq_len=T, num_sequences=4,
                       batch_size=2, jit=granularity == "layer")
  new_cfg, new_params = export.restore(str(tmp_path / "out"))
  with open(tmp_path / "out" / "prune.json") as f:
    assert json.load(f)["removed"] == record["removed"]
  source_under_plan = importance.with_plan(cfg, record["source_plan"])
  np.testing.assert_allclose(_logits(new_cfg, new_params, batch["inputs"]),
                             _logits(source_under_plan, params, batch["inputs"]), atol=1e-5)
  size = lambda p: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
  assert size(new_params) < size(params)
  if granularity == "layer":
    assert new_cfg.num_layers == L - drop and new_cfg.plan == ""
    assert sorted(new_params) == sorted([k for k in params if not k.startswith("block_")] +
                                        [f"block_{i}" for i in range(L - drop)])
    scores = np.asarray(record["scores"]["layer"])
    assert record["removed"] == [int(np.argmin(scores))]
    # the profiler reloads the export as it is
    from skipjax.profile import run  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict({"dtype": "float32", "post_ln_skip": "identity"})
    _, _, prof_cfg, prof_params = run.load_model(str(tmp_path / "out"), config, str(tmp_path))
    assert prof_cfg.num_layers == L - drop
    wi = lambda p: p["block_0"]["mlp"]["wi"]["kernel"]
    np.testing.assert_array_equal(wi(prof_params), wi(new_params))
  else:
    plan = new_cfg.execution_plan
    assert 2 * L - sum(e.attn + e.ffn for e in plan) == drop
    for e in plan:  # a pruned branch has no params
      assert ("attn" in new_params[f"block_{e.slot}"]) == e.attn and ("mlp" in new_params[f"block_{e.slot}"]) == e.ffn
    assert new_cfg.plan == record["plan"] and new_cfg.num_layers == len({r[0] for r in record["removed"]}) + L - drop


def test_fliprelu_parity_is_kept_or_refused(tiny):
  cfg, params, _ = tiny
  flip = models.TransformerConfig(**{**cfg.__dict__, "activation": "fliprelu"})
  with pytest.raises(ValueError, match="fliprelu"):
    prune.pruned_model(flip, params, [1])
  new_cfg, _, _ = prune.pruned_model(flip, params, [1, 2])  # layer 0 keeps its parity
  assert new_cfg.num_layers == 1


def test_cli_errors_are_one_line(tiny, tmp_path):
  cfg, params, _ = tiny
  src = export.save(str(tmp_path / "src"), cfg, params)
  for args, needle in ((["--measure=nope", "--drop=1"], "--measure"), (["--measure=bi", "--drop=3"], "--drop=3")):
    proc = subprocess.run([sys.executable, "-m", "skipjax.depth.prune", f"--from={src}", f"--out={tmp_path / 'o'}",
                           *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
  assert not (tmp_path / "o").exists()


def test_split_plan_states_equal_the_model_for_post_ln(tiny):
  """The attention/FFN split that exposes mid states runs the same forward (post-LN, 'ln' skip too)."""
  cfg, params, batch = tiny
  post = models.TransformerConfig(**{**cfg.__dict__, "norm": "post", "post_ln_skip": "ln"})
  first = halves(batch)[0]
  whole = importance._hidden_fn(importance.measuring_config(post))(params, jnp.asarray(first["inputs"]), {})
  np.testing.assert_allclose(importance.hidden_states(post, params, first)[::2], np.asarray(whole), atol=1e-6)
