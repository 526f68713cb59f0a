"""Prefill and decode plans (shallow decoder) and decoding exports (skipjax/decode).

The shallow decoder is checked against an independent reference: a full forward over the whole
sequence, recomputed at every step, where generated tokens skip the branches the decode plan
leaves out through `gate_override` masks (0 at generated positions) on the dense model. Prompt
tokens run every layer, generated tokens exactly the decode plan's branches; nothing reads the
K/V a generated token would have had in a skipped layer (only later generated tokens could, and
they skip that layer too), so the reference is exact.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from skipjax import decode, models
from skipjax.convert import export
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.depth import plan as plan_lib
from skipjax.depth import prune

L, V, TP, NEW = 3, 280, 5, 8
BASE = models.TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=24)
ROUTED = dataclasses.replace(BASE, skip=models.SkipConfig(router="top1", target_density=0.5))


def _params(cfg):
  """Params of `cfg` (the routed model: the dense one ignores the router params)."""
  init = jax.jit(models.build(cfg).init)
  params = nn.meta.unbox(init({"params": jax.random.key(0), "gate": jax.random.key(1)},
                              jnp.zeros((1, 8), jnp.int32))["params"])
  # Layers of different strength: the default init barely changes the stream (degenerate tokens).
  for i, s in enumerate((6.0, 3.0, 8.0)[:cfg.num_layers]):
    params[f"block_{i}"] = jax.tree.map(lambda a, s=s: a * s if a.ndim >= 2 else a, params[f"block_{i}"])
  return _helpers.perturb_routers(params)


@pytest.fixture(scope="module")
def dense():
  return models.build(BASE), _params(ROUTED)


def _prompt(batch, length=TP):
  return np.asarray(jax.random.randint(jax.random.key(7), (batch, length), 0, V), np.int32)


@functools.lru_cache(maxsize=None)
def _masked_forward(cfg):
  model = models.build(cfg)
  return jax.jit(lambda p, override, t: model.apply({"params": p, "gate_override": override}, t))


def _reference(cfg, params, prompt, n, decode_plan, lengths=None):
  """Greedy tokens [B, N] of full forwards where each row's positions ≥ its prompt length skip
  what `decode_plan` leaves out (gate_override masks on every block)."""
  plan = plan_lib.resolve(decode_plan, cfg.num_layers)
  assert [e.slot for e in plan] == sorted({e.slot for e in plan}), "the reference models subset plans only"
  batch = prompt.shape[0]
  lengths = np.full(batch, prompt.shape[1]) if lengths is None else np.asarray(lengths)
  is_prompt = (np.arange(cfg.max_len)[None, :] < lengths[:, None]).astype(np.float32)  # [B, T]
  ones = np.ones_like(is_prompt)
  on = {e.slot: e for e in plan}
  override = {f"block_{i}": {"attn": ones if i in on and on[i].attn else is_prompt,
                             "ffn": ones if i in on and on[i].ffn else is_prompt} for i in range(cfg.num_layers)}
  forward = _masked_forward(cfg)
  seq = np.zeros((batch, cfg.max_len), np.int32)
  seq[:, :prompt.shape[1]] = prompt
  rows = np.arange(batch)
  for i in range(n):
    logits = np.asarray(forward(params, override, seq))  # [B, T, V]
    seq[rows, lengths + i] = np.argmax(logits[rows, lengths + i - 1], axis=-1)
  return np.stack([seq[b, lengths[b]:lengths[b] + n] for b in rows])


@pytest.mark.parametrize("decode_plan,lengths", [("0,2", None), ("1a,2", None), ("0,1f", [TP, 2])])
def test_shallow_decoder_equals_masked_full_forward(dense, decode_plan, lengths):
  """[TP, 2]: steps 1 … 4 mix a prompt row (prefill plan) and a generating row (decode plan)."""
  model, params = dense
  prompt = _prompt(2)
  result = decode.generate(model, params, prompt, NEW, prompt_lengths=lengths, decode_plan=decode_plan)
  np.testing.assert_array_equal(result.generated, _reference(BASE, params, prompt, NEW, decode_plan, lengths))
  np.testing.assert_array_equal(result.tokens[0, :TP], prompt[0])
  full = decode.generate(model, params, prompt, NEW, prompt_lengths=lengths)
  assert not np.array_equal(result.tokens, full.tokens), "the shallow decoder should change some token"
  plan = plan_lib.resolve(decode_plan, L)
  runs = np.asarray([(e.attn + e.ffn) / 2 for e in plan])
  # Token 0 comes from the prefill (all layers), the others from decode steps (the plan's positions).
  np.testing.assert_array_equal(result.executed[0], np.ones((L, 2)))
  np.testing.assert_array_equal(result.executed[1:, :len(plan)], np.broadcast_to(runs[None, :, None],
                                                                                 (NEW - 1, len(plan), 2)))
  np.testing.assert_array_equal(result.executed[1:, len(plan):], 0.0)
  np.testing.assert_allclose(result.skipped_layers[:, 1:], L - runs.sum())


def test_decode_plan_equal_to_the_prefill_plan_is_plain_generation(dense):
  """Two plans that are the same: the phased generation (a prefill scan, then a decode scan
  with the second model instance) equals the single-model one exactly, for a routed model with
  a repeated slot (the mixed ragged steps are covered above)."""
  _, params = dense
  model = models.build(dataclasses.replace(ROUTED, plan="0,1,1a,2"))
  prompt = _prompt(2)
  plain = decode.generate(model, params, prompt, NEW)
  same = decode.generate(model, params, prompt, NEW, decode_plan="0,1,1a,2")
  assert 0.0 < float(np.mean(plain.executed)) < 1.0, "routing decisions should be mixed"
  for a, b in zip(plain, same):
    np.testing.assert_array_equal(a, b)


def test_positions_the_decode_plan_skips_keep_their_prompt_cache(dense):
  model, params = dense
  shallow = decode.decode_model(model, "0,1f")
  prompt = jnp.asarray(_prompt(1))
  prefill, step = decode.make_step_fn(model), decode.make_step_fn(shallow)
  cache = decode.init_cache(model, 1)
  for t in range(TP):
    logits, cache, _ = prefill(params, cache, prompt[:, t:t + 1], jax.random.key(0))
  before = jax.tree.map(np.asarray, cache)
  for _ in range(3):
    logits, cache, _ = step(params, cache, jnp.argmax(logits, -1)[:, None].astype(jnp.int32), jax.random.key(0))
  after = jax.tree.map(np.asarray, cache)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for slot in (1, 2):  # attention off (slot 1) or the whole layer left out (slot 2): untouched
    for name in ("cached_key", "cached_value"):
      np.testing.assert_array_equal(after[f"block_{slot}"]["attn"][name], before[f"block_{slot}"]["attn"][name])
  key = after["block_0"]["attn"]["cached_key"]  # [B, max_len, H, D]
  np.testing.assert_array_equal(key[:, :TP], before["block_0"]["attn"]["cached_key"][:, :TP])
  assert np.abs(key[:, TP:TP + 3]).min() > 0 and int(after["index"]) == TP + 3


def test_the_shallow_step_traces_fewer_matmuls(dense):
  model, params = dense
  count = lambda m: str(jax.make_jaxpr(lambda c, t: decode.decode_step(m, params, c, t))(
      decode.init_cache(model, 1), jnp.zeros((1, 1), jnp.int32))).count("dot_general")
  assert count(decode.decode_model(model, "0")) < count(decode.decode_model(model, "0,1f")) < count(model)


def test_decode_plans_that_cannot_run_are_refused(dense):
  model, params = dense
  prompt = _prompt(1)
  repeated = models.build(dataclasses.replace(BASE, plan="0,1,1,2"))
  assert decode.decode_model(repeated, "0,1f,1").config.plan == "0,1f,1"  # (1, 1) has the prompt's cache
  cases = [(repeated, "0,1,1,1", "block_1/attn/cached_key_2"),
           (models.build(dataclasses.replace(BASE, plan="0,1f,2")), "0:3", "block_1/attn/cached_key"),
           (model, "0,7", "slots 0..2"), (model, "0;1", "not SLOT")]
  for m, plan, needle in cases:
    with pytest.raises(ValueError, match=f"^decode_plan='{plan}'.*{needle}"):
      decode.generate(m, params, prompt, 2, decode_plan=plan)
  scanned = models.build(dataclasses.replace(BASE, scan_layers=True))
  with pytest.raises(ValueError, match="decode_plan='0,2' needs scan_layers=False"):
    decode.generate(scanned, params, prompt, 2, decode_plan="0,2")
  no_ffn = {**params, "block_2": {k: v for k, v in params["block_2"].items() if k not in ("mlp", "ln_ffn")}}
  half = models.build(dataclasses.replace(BASE, plan="0,1,2a"))
  with pytest.raises(ValueError, match="decode_plan='0:3'.*block_2/(ln_ffn|mlp)"):
    decode.generate(half, no_ffn, prompt, 2, decode_plan="0:3")


# -- exports -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory):
  """A layer-pruned export of the dense model whose source export carries a BPE tokenizer.json."""
  root = tmp_path_factory.mktemp("exports")
  texts = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
  tok = tokenizer_lib.BpeTokenizer.train(texts, V)
  assert tok.vocab_size <= V
  cfg, params = BASE, dense[1]
  src = export.save(str(root / "src"), cfg, params, extra={"tokenizer.json": json.loads(tok.to_str())})
  out = str(root / "pruned")
  record = prune.prune(src, "bi", 1, out, seq_len=8, num_sequences=2, batch_size=2)
  return cfg, params, record, out, tok


def test_decoding_a_pruned_export_equals_the_source_under_its_plan(pruned):
  cfg, params, record, out, tok = pruned
  restored = decode.load(out)
  assert restored.kind == "export" and restored.model.config.num_layers == L - 1
  assert restored.info["source_plan"] == record["source_plan"] and restored.tokenizer.eos_id == tok.eos_id
  prompt = np.asarray(tok.encode_batch(["the quick brown"]), np.int32)
  result = decode.generate(restored.model, restored.params, prompt, NEW)
  source = models.build(dataclasses.replace(cfg, plan=record["source_plan"]))
  expected = decode.generate(source, params, prompt, NEW)
  np.testing.assert_array_equal(result.tokens, expected.tokens)
  assert restored.tokenizer.decode(prompt[0]) == "the quick brown"


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "skipjax.decode", *args], capture_output=True, text=True,
                        timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def test_cli_decodes_a_pruned_export_with_a_shallow_decode_plan(pruned, tmp_path):
  cfg, params, record, out, tok = pruned
  proc = _run_cli(f"--workdir={out}", "--prompt=the quick brown", "--max_new_tokens=5", "--decode_plan=0",
                  f"--out={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.load(open(tmp_path / "decode.json"))
  prompt = [int(t) for t in tok.encode_batch(["the quick brown"])[0]]
  restored = decode.load(out)
  expected = decode.generate(restored.model, restored.params, np.asarray([prompt], np.int32), 5,
                             eos_id=tok.eos_id, decode_plan="0")
  assert rec["prompt_tokens"] == prompt and rec["generated_tokens"] == [int(t) for t in expected.generated[0]]
  assert rec["kind"] == "export" and rec["plan"] == "0,1" and rec["decode_plan"] == "0"
  assert rec["token_plans"] == ["prefill"] + ["decode"] * 4
  assert [len(r) for r in rec["executed_positions"]] == [2, 1, 1, 1, 1] and rec["skipped_layers"][1:] == [1.0] * 4
  assert rec["prune"]["source_plan"] == record["source_plan"] and rec["prompt"] == "the quick brown"
  assert (tmp_path / "plots" / "skipped_layers.png").stat().st_size > 0
  assert not os.path.exists(os.path.join(out, "decode.json"))  # --out, not the export
