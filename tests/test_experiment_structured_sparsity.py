"""experiments/structured_sparsity.py end to end at a toy scale (2 steps, d = 24, 2 layers)."""
import json
import math

import numpy as np


def _sown(tree, name):
  """Every value sown as `name` below `tree` (one per layer)."""
  if not isinstance(tree, dict):
    return []
  if name in tree:
    return [np.asarray(tree[name][0])]
  return [a for v in tree.values() for a in _sown(v, name)]


def test_structured_sparsity_smoke(tmp_path):
  """The ReLU baseline (a row of every SS table) and one regularised Table 3 cell train and are
  profiled (two runs keep the test fast; tying is tested in test_ffn.py); the json and md have the
  table columns; for the
  regularised cell (λ = 1e-3, E_SS = 128 → E = 4 of 96 neurons, B = 2) the reported sparsity,
  block sparsity and val PPL equal a NumPy count / NLL on the same checkpoint's activations and
  logits over the same held-out batch; a rerun reuses the finished workdirs."""
  import jax
  from experiments import structured_sparsity as ss
  from skipjax.decode import workdir as workdir_lib

  work = tmp_path / "ss"
  args = [f"--workdir={work}", "--steps=2", "--batch_size=8", "--seq_len=16", "--d_model=24", "--num_heads=2",
          "--num_layers=2", "--eval_batches=1", "--cells=relu,lam0.001_ex128",
          f"--wikitext={tmp_path / 'absent'}", "--figures=lam0.001_ex128"]
  ss.main(args)
  res = json.loads((work / "structured_sparsity.json").read_text())
  rows = {r["cell"]: r for r in res["cells"]}
  assert list(rows) == ["relu", "lam0.001_ex128"]  # wikitext2 skipped: its folder is absent
  assert rows["relu"]["tables"] == [1, 2, 3] and rows["lam0.001_ex128"]["tables"] == [3]
  for r in rows.values():
    assert r["dataset"] == "synthetic" and r["step"] == 2 and r["num_params"] > 0
    assert 0 < r["sparsity"] <= 1 and 0 < r["block_sparsity"] <= 1 and r["sparsity"] <= r["block_sparsity"]
    assert math.isfinite(r["val_ppl"]) and r["val_ppl"] == math.exp(r["eval_loss"])
    assert len(r["sparsity_per_layer"]) == 2 and r["profile_tokens"] == 8 * 16
  lam = rows["lam0.001_ex128"]
  assert (lam["block_size"], lam["exempt"], lam["exempt_ss"], lam["block_sparsity_weight"]) == (2, 4, 128, 1e-3)
  relu = rows["relu"]
  assert (relu["exempt"], relu["block_sparsity_weight"], relu["tied"], relu["d_ff"]) == (0, 0.0, False, 96)
  md = (work / "structured_sparsity.md").read_text()
  for line in ("Table 1 (SS §2.1)", "| relu |", "Table 2 (SS §3.1)", "| × | 4 |", "Table 3 (SS §3.2)",
               "| 0 | N/A |", "| 0.001 | 4 (128) |"):
    assert line in md, line
  assert (work / "structured_sparsity.png").stat().st_size > 0
  for kind in ("frequency", "similarity", "block_maps", "per_layer"):
    assert (work / "plots" / f"synthetic_lam0.001_ex128_dense_{kind}.png").stat().st_size > 0

  # Independent count on the regularised cell: its checkpoint's activations on the same held-out batch.
  restored = workdir_lib.restore(lam["workdir"])
  assert lam["num_params"] == sum(int(np.prod(v.shape)) for v in jax.tree.leaves(restored.params))
  batch = ss.eval_batch(restored.config, lam["workdir"])
  forward = jax.jit(lambda p, x: restored.model.apply({"params": p}, x, mutable=["activations"]))
  logits, state = forward(restored.params, batch["inputs"])
  acts = _sown(state["activations"], "ffn_hidden")
  assert len(acts) == 2 and acts[0].shape == (8, 16, 96)
  a = np.stack(acts).reshape(2, -1, 96)                       # [L, N, F]
  nonzero = a != 0
  np.testing.assert_allclose(lam["sparsity"], nonzero.mean(), rtol=1e-5)
  per_token = np.zeros(a.shape[:2])
  for j in range(4, 96, 2):                                   # blocks of B = 2 after the E = 4 exempt neurons
    per_token += 2 * nonzero[..., j:j + 2].any(-1)
  np.testing.assert_allclose(lam["block_sparsity"], ((4 + per_token) / 96).mean(), rtol=1e-5)
  z = np.asarray(logits, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()
  np.testing.assert_allclose(lam["val_ppl"], np.exp(nll), rtol=1e-4)

  # A rerun reuses the finished runs and their cached profiles.
  mtime = (work / "synthetic_relu" / "metrics.jsonl").stat().st_mtime
  again = ss.main(args)
  assert (work / "synthetic_relu" / "metrics.jsonl").stat().st_mtime == mtime
  assert [r["sparsity"] for r in again["cells"]] == [r["sparsity"] for r in res["cells"]]
