"""experiments/early_exit.py end to end on a tiny model given as `--workdir` (an export with its BPE).

The README numbers come from the SmolLM2 run; here every stage runs on a 3-layer model and its
numbers are checked against independent forwards (the model's own apply, truncated plans).
"""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import early_exit
from skipjax import models
from skipjax.convert import export
from skipjax.data import tokenizer as tokenizer_lib
from skipjax.profile import inputs

L = 3


def _text(seed: int, lines: int) -> str:
  rng = np.random.default_rng(seed)
  words = ["the", "river", "town", "canal", "railway", "farmers", "carried", "crossed", "built", "coal", "mill",
           "church", "valley", "in", "of", "and"]
  return "\n".join(" ".join(rng.choice(words, 24)) + "." for _ in range(lines)) + "\n"


def _nll(logits, targets) -> float:
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


def test_early_exit_experiment_smoke(tmp_path):
  # without WikiText-2 the script skips, writing nothing
  assert early_exit.run(early_exit.parse_args([f"--out={tmp_path / 'none'}", f"--data_dir={tmp_path}"])) is None
  assert not (tmp_path / "none").exists()
  data = tmp_path / "data"
  data.mkdir()
  (data / "valid.txt").write_text(_text(0, 30))
  (data / "test.txt").write_text(_text(1, 20))
  tok = tokenizer_lib.BpeTokenizer.train(_text(0, 30).splitlines(), 280)
  cfg = models.TransformerConfig(vocab_size=280, d_model=32, num_heads=4, num_kv_heads=2, num_layers=L, d_ff=64,
                                 activation="silu", mlp_gated=True, position="rope", norm_type="rmsnorm",
                                 use_bias=False, tie_embeddings=False, max_len=64)
  params = nn.meta.unbox(jax.jit(models.build(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  # layers of different strength and a sharp head: confidences spread, tokens exit at several layers
  for i, s in enumerate((6.0, 3.0, 8.0)):
    params[f"block_{i}"] = jax.tree.map(lambda a, s=s: a * s if a.ndim >= 2 else a, params[f"block_{i}"])
  params["lm_head"] = jax.tree.map(lambda a: a * 40, params["lm_head"])
  model_dir = tmp_path / "model"
  export.save(str(model_dir), cfg, jax.device_get(params), extra={"tokenizer.json": json.loads(tok.to_str())})

  out = tmp_path / "out"
  early_exit.main([f"--workdir={model_dir}", f"--out={out}", f"--data_dir={data}", "--measures=learned",
                   "--test_sequences=2", "--test_len=24", "--head_sequences=2", "--head_len=24", "--head_steps=5",
                   "--target_fractions=0.7", "--decode_fractions=0.7", "--policies=propagate",
                   "--prompts=2", "--prompt_len=6", "--new_tokens=6", "--fixed_decode=-2", "--spec_prompts=1",
                   "--spec_new_tokens=6", "--spec_exits=2", "--spec_drafts=2", f"--copy_figures={tmp_path / 'figs'}"])
  res = json.loads((out / "results.json").read_text())
  for name in ("ppl_vs_exit", "agreement_vs_exit", "speculative"):
    assert (out / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "figs" / f"early_exit_workdir_{name}.png").stat().st_size > 0
  assert "Self-speculative" in (out / "results.md").read_text()
  assert res["rule"] == {"min_layer": 0, "every": 1, "exit_positions": [0, 1]}

  # Independent references: the model's own forward (full and truncated plans) on the same tokens.
  hf_tok = inputs.HFTokenizer(str(model_dir / "tokenizer.json"), cfg.vocab_size)
  test = inputs.text_batch(f"text:{data / 'test.txt'}", hf_tok, 24, 2, encoder=False)
  t = res["teacher"]
  assert [row["position"] for row in t["fixed"]] == [0, 1, L - 1]  # always exit at 1, 2 layers; the full model
  for row in (t["fixed"][0], t["fixed"][-1]):
    truncated = models.build(dataclasses.replace(cfg, plan=f"0:{row['position'] + 1}"))
    logits = jax.jit(truncated.apply)({"params": params}, test["inputs"])
    np.testing.assert_allclose(row["nll"], _nll(logits, test["targets"]), rtol=1e-5)
  np.testing.assert_allclose(t["full_model"]["nll"], t["fixed"][-1]["nll"], rtol=1e-6)
  np.testing.assert_allclose(t["fixed_check"]["exit_forward_propagate"]["nll"],
                             t["fixed_check"]["from_layer_stats"]["nll"], rtol=1e-5)
  # the library's teacher-forced evaluator takes the decisions the per-layer statistics take
  check = t["measures"]["learned"]["check_full"]
  assert check["exit_layers_equal"] == 1.0
  np.testing.assert_allclose(check["exit_forward"]["nll"], check["from_layer_stats"]["nll"], rtol=1e-5)
  for o in t["oracle"].values():  # the consistency oracle keeps the full model's top-1 by construction
    assert o["full"]["top1_agreement"] == 1.0 and o["full"]["mean_exit"] < L
  row = t["measures"]["learned"]["rows"][0]
  assert row["full"]["mean_exit"] < L and row["propagate"]["mean_exit"] < L  # tokens do exit early

  (row,) = res["decode"]["rows"]
  assert (row["measure"], row["policy"], row["target"]) == ("learned", "propagate", 2.1)
  reference, tokens = np.asarray(res["decode"]["reference_tokens"]), np.asarray(row["tokens"])  # [2, 6]
  equal = tokens == reference
  np.testing.assert_allclose(row["agreement"], equal.mean())
  first = [int(np.argmin(e)) if not e.all() else 6 for e in equal]
  np.testing.assert_allclose(row["first_divergence"], np.mean(first))
  np.testing.assert_allclose(row["mean_exit"], np.mean(row["exit_layers"]) + 1)
  assert row["mean_exit"] < L
  np.testing.assert_allclose(row["executed_per_token"], row["mean_exit"], rtol=1e-6)  # propagate: the blocks run
  (spec,) = res["speculative"]["rows"]
  assert spec["identical_to_greedy"] and 0 <= spec["acceptance_rate"] <= 1
