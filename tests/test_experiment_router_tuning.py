"""experiments/router_tuning.py end to end on a tiny random Llama-like model (offline)."""
import dataclasses
import json
import math

import numpy as np
from _helpers import builtin_text


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + eps) * scale


def test_router_tuning_tiny(tmp_path):
  """Only router parameters train (every other leaf bit-identical to the source export); the
  reported argmax depth and NLL equal an independent layer-by-layer re-walk (router logits and the
  head in NumPy); the oracle row equals skipjax.profile.applied.applied_oracle; random skipping
  runs at the requested density; the json has every field the README table reads."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from experiments import router_tuning
  from skipjax import models
  from skipjax.convert import export
  from skipjax.decode import workdir as workdir_lib
  from skipjax.models.block import Block
  from skipjax.profile import applied, inputs

  data = tmp_path / "data"
  data.mkdir()
  (data / "valid.txt").write_text(builtin_text(0, 120))
  (data / "test.txt").write_text(builtin_text(1, 40))
  work = tmp_path / "work"
  router_tuning.main(["--model=tiny", "--tiny_layers=2", f"--workdir={work}", f"--data_dir={data}", "--measures=bi,sleb",
                      "--fractions=0,0.5", "--sleb_steps=1", "--densities=0.75", "--steps=4", "--batch=8",
                      "--seq_len=32", "--lr=0.05", "--checkpoint_every=4", "--test_sequences=4", "--test_len=32",
                      "--calib_sequences=4", "--calib_len=32", "--batch_size=4", "--search_iters=3",
                      "--refine_iters=0", "--random_seeds=0,1", "--search_sequences=0",
                      f"--copy_figure={tmp_path / 'figs'}"])
  res = json.loads((work / "router_tuning.json").read_text())
  assert (tmp_path / "figs" / "router_tuning_tiny.png").stat().st_size > 0
  assert "| 0.75 | **routers, argmax** |" in (work / "router_tuning.md").read_text()
  L = res["model"]["num_layers"]
  run = res["runs"][0]
  for key in ("train", "routers", "routers_tau", "walk_check", "static", "oracle", "random", "params_check", "at_tau"):
    assert key in run, key
  assert set(run["at_tau"]) == {"depth", "static", "oracle", "random"} and run["at_tau"]["depth"] == run["routers_tau"]["depth"]
  assert set(run["static"]) == {"bi", "sleb"} and all(np.isfinite(s["ppl"]) for s in run["static"].values())
  assert run["train"]["num_trainable_params"] == L * (32 * 2 + 2)

  # Only the routers trained: the trained checkpoint against the source export, leaf by leaf.
  _, source = export.restore(str(work / "tiny_model_2l"))
  trained = workdir_lib.restore(run["train"]["train_dir"])
  assert int(trained.step) == 4
  src = traverse_util.flatten_dict(source, sep="/")
  dst = traverse_util.flatten_dict(jax.device_get(trained.params), sep="/")
  routers = sorted(k for k in dst if "/router/" in k)
  assert len(routers) == 2 * L and set(dst) - set(routers) == set(src)
  for k, v in src.items():
    assert np.array_equal(np.asarray(v), np.asarray(dst[k])), k   # bit-identical
  init_bias = np.asarray([0.0, math.log(0.75 / 0.25)], np.float32)  # router_bias_init='target': [0, logit P]
  assert all(not np.allclose(np.asarray(dst[f"block_{i}/router/bias"]), init_bias) for i in range(L))
  assert run["params_check"]["non_router_changed"] == [] and run["params_check"]["router_changed"] == 2 * L

  # Independent re-walk: router logits on RMSNorm(x) in NumPy, m = logit1 > logit0, y = F(x) or x;
  # F(x) is one dense Block; the head (final RMSNorm, tied embedding) in NumPy.
  cfg = trained.model.config
  assert cfg.skip.granularity == "layer" and cfg.skip.router_input == "norm"
  dense_cfg = dataclasses.replace(cfg, skip=models.SkipConfig())
  dense = Block(dense_cfg, True)
  tok = inputs.tokenizer_for(str(work / "tiny_model_2l"), cfg.vocab_size)
  batch = inputs.text_batch(f"text:{data / 'test.txt'}", tok, 32, 4, encoder=False)
  p = jax.device_get(trained.params)
  x = np.asarray(p["embed"]["embedding"], np.float64)[batch["inputs"]]           # [B, T, d]
  pos = jnp.broadcast_to(jnp.arange(32), (4, 32))
  executed, per_layer = np.zeros(batch["inputs"].shape), []
  for l in range(L):
    b = p[f"block_{l}"]
    u = _rms(x, np.asarray(b["ln_attn"]["scale"]), cfg.layer_norm_eps)
    logits = u @ np.asarray(b["router"]["kernel"], np.float64) + np.asarray(b["router"]["bias"], np.float64)
    m = logits[..., 1] > logits[..., 0]
    fx = np.asarray(dense.apply({"params": {k: v for k, v in b.items() if k != "router"}},
                                jnp.asarray(x, jnp.float32), pos), np.float64)
    x = np.where(m[..., None], fx, x)
    executed += m
    per_layer.append(m.mean())
  h = _rms(x, np.asarray(p["ln_final"]["scale"]), cfg.layer_norm_eps)
  z = h @ np.asarray(p["embed"]["embedding"], np.float64).T
  z = z - z.max(-1, keepdims=True)
  nll = -(np.take_along_axis(z, batch["targets"][..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1)))
  assert run["routers"]["depth"] == executed.mean()                      # the same count, exactly
  np.testing.assert_allclose(run["routers"]["nll"], nll.mean(), rtol=1e-4)
  np.testing.assert_allclose(run["routers"]["layer_density"], per_layer, rtol=1e-6)
  assert run["walk_check"]["walk"]["depth"] == run["routers"]["depth"] == run["walk_check"]["model"]["depth"]
  np.testing.assert_allclose(run["walk_check"]["walk"]["nll"], run["routers"]["nll"], rtol=1e-5)
  tau = run["routers_tau"]
  assert tau["target_depth"] == 0.75 * L and tau["depth"] <= run["routers"]["depth"]

  # The oracle row is the applied oracle of skipjax.profile.applied at the same threshold.
  o = run["oracle"]
  dense_params = {k: ({n: w for n, w in v.items() if n != "router"} if k.startswith("block_") else v)
                  for k, v in p.items()}
  ref = applied.applied_oracle(dense_cfg, dense_params, batch, [o["threshold"]], jit=False)["curve"][0]["applied"]
  np.testing.assert_allclose(o["nll"], ref["loss"], rtol=1e-5)
  np.testing.assert_allclose(o["depth"], L * (1 - ref["skipped_fraction"]), rtol=1e-6)

  # Random skipping: Bernoulli(depth / L) per token and layer, the requested density within noise
  # (at the threshold-routed depth ≈ P·L; the argmax routers may run every layer of a random model).
  for where, depth in ((run, run["routers"]["depth"]), (run["at_tau"], run["routers_tau"]["depth"])):
    rnd = where["random"]
    assert rnd["density"] == depth / L and len(rnd["ppl"]) == 2
    sd = math.sqrt(L * rnd["density"] * (1 - rnd["density"]) / 128)
    assert all(abs(d - depth) < 5 * sd + 1e-9 for d in rnd["depth"])
  assert 0 < run["at_tau"]["random"]["density"] < 1 and len(set(run["at_tau"]["random"]["ppl"])) == 2
  full = res["full"]
  assert np.isfinite(full["nll"]) and res["data"]["test"]["tokens"] == 128
