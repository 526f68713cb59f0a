"""KV-cache generation with per-step routing (LtS Alg. 2) and the `python -m skipjax.decode` CLI."""
import dataclasses
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

BASE = models.TransformerConfig(vocab_size=61, d_model=32, num_heads=4, num_layers=3, d_ff=64, max_len=24)
PROMPT_LEN, NEW = 5, 10


def _model_and_params(router="top1", granularity="layer"):
  cfg = dataclasses.replace(BASE, skip=models.SkipConfig(router=router, target_density=0.5,
                                                         granularity=granularity))
  model = models.build(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, tokens)["params"])

  return model, _helpers.perturb_routers(params)  # mixed routing decisions


def _naive_greedy(model, params, prompt, n):
  """Recompute the full forward every step (right-padded to max_len: causal) and take argmax."""
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
  seq = np.zeros((prompt.shape[0], model.config.max_len), np.int32)
  seq[:, :prompt.shape[1]] = prompt
  for t in range(prompt.shape[1], prompt.shape[1] + n):
    seq[:, t] = np.argmax(np.asarray(forward(params, seq))[:, t - 1], axis=-1)
  return seq[:, :prompt.shape[1] + n]


def _prompt(batch):
  return np.asarray(jax.random.randint(jax.random.key(7), (batch, PROMPT_LEN), 0, BASE.vocab_size), np.int32)


@pytest.mark.parametrize("router,granularity,batch", [("top1", "layer", 1), ("gumbel", "layer", 2),
                                                      ("none", "layer", 2), ("top1", "block", 2)])
def test_greedy_generation_equals_naive_full_forward(router, granularity, batch):
  model, params = _model_and_params(router, granularity)
  prompt = _prompt(batch)
  result = decode.generate(model, params, prompt, NEW)
  expected = _naive_greedy(model, params, prompt, NEW)
  np.testing.assert_array_equal(result.tokens, expected)
  np.testing.assert_array_equal(result.generated, expected[:, PROMPT_LEN:])
  L = BASE.num_layers
  assert result.executed.shape == (NEW, L, batch) and result.skipped_layers.shape == (batch, NEW)
  np.testing.assert_allclose(result.skipped_layers, L - np.asarray(result.executed).sum(axis=1).T)
  # The routing of each generation step = the full forward's routing on the final sequence at
  # the position of the step's input token (argmax routing, LtS Alg. 2 vs Alg. 1).
  _, state = model.apply({"params": params}, jnp.asarray(expected), mutable=["gates"])
  if router == "none":
    assert not state and float(np.max(result.skipped_layers)) == 0.0
    return
  names = ("layer_mask",) if granularity == "layer" else ("attn_mask", "ffn_mask")
  masks = sum(models.per_layer(state["gates"], n) for n in names) / len(names)  # [L, B, T]
  np.testing.assert_array_equal(result.executed, np.asarray(masks)[:, :, PROMPT_LEN - 1:-1].transpose(2, 0, 1))
  assert 0.0 < float(np.mean(result.executed)) < 1.0, "routing decisions should be mixed"


def test_batch1_generation_contains_the_layer_cond():
  model, params = _model_and_params()
  prompt = _prompt(1)
  jaxpr = str(jax.make_jaxpr(lambda p: decode.generate(model, p, prompt, 3).tokens)(params))
  assert jaxpr.count("cond[") >= BASE.num_layers


def test_python_loop_with_jitted_step_equals_generate():
  model, params = _model_and_params()
  prompt = _prompt(1)
  step = decode.make_step_fn(model)
  cache, tokens, executed = decode.init_cache(model, 1), list(prompt[0]), []
  for t in range(PROMPT_LEN + 3 - 1):
    logits, cache, ex = step(params, cache, jnp.asarray([[tokens[t]]], jnp.int32), jax.random.key(0))
    if t + 1 >= PROMPT_LEN:
      tokens.append(int(jnp.argmax(logits[0])))
      executed.append(np.asarray(ex))
  result = decode.generate(model, params, prompt, 3)
  np.testing.assert_array_equal(result.tokens[0], tokens)
  np.testing.assert_array_equal(result.executed, np.stack(executed))


def test_sampling_is_reproducible_and_depends_on_rng():
  model, params = _model_and_params()
  prompt = _prompt(2)
  sample = lambda seed, **kw: np.asarray(decode.generate(model, params, prompt, NEW, temperature=3.0,
                                                         rng=jax.random.key(seed), **kw).tokens)
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  greedy = np.asarray(decode.generate(model, params, prompt, NEW).tokens)
  np.testing.assert_array_equal(sample(5, top_k=1), greedy)  # top-1 sampling is greedy


def test_ragged_prompts_and_eos():
  model, params = _model_and_params()
  prompt = _prompt(2)
  result = decode.generate(model, params, prompt, 4, prompt_lengths=[PROMPT_LEN, 2], pad_id=-1)
  short = decode.generate(model, params, prompt[1:, :2], 4)
  np.testing.assert_array_equal(result.generated[1], short.generated[0])
  np.testing.assert_array_equal(result.executed[:, :, 1], short.executed[:, :, 0])
  np.testing.assert_array_equal(result.tokens[1], list(short.tokens[0]) + [-1] * (PROMPT_LEN - 2))
  first = int(result.generated[0, 0])
  stopped = decode.generate(model, params, prompt[:1], 4, eos_id=first)
  np.testing.assert_array_equal(stopped.generated[0], [first] * 4)


def test_too_long_generation_names_max_len():
  model, params = _model_and_params()
  with pytest.raises(ValueError, match="config.model.max_len=24"):
    decode.generate(model, params, _prompt(1), BASE.max_len)


def test_cli_end_to_end(tmp_path):
  from configs import skiplayer
  from skipjax.train.loop import train_and_evaluate
  config = skiplayer.get_config("tiny")
  config.model.update(d_model=32, num_layers=2, d_ff=64, max_len=48)
  config.data.update(seq_len=32, batch_size=8)
  config.train.update(num_steps=5, eval_every_steps=5, checkpoint_every_steps=5, log_every_steps=5,
                      eval_batches=1, progress_bar=False)
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "skipjax.decode", f"--workdir={workdir}", "--prompt_tokens=1,2,3",
                        "--max_new_tokens=6", "--temperature=0"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.load(open(os.path.join(workdir, "decode.json")))
  assert record["prompt_tokens"] == [1, 2, 3] and len(record["generated_tokens"]) == 6
  assert len(record["skipped_layers"]) == 6 and all(0 <= s <= 2 for s in record["skipped_layers"])
  assert os.path.getsize(os.path.join(workdir, "plots", "skipped_layers.png")) > 0
