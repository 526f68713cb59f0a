"""Tiny random checkpoints in the HF layout, written with numpy + safetensors (no torch).

Offline stand-ins for real models in tests, the `tiny` profiling preset, the notebook and the
benchmark: `random_opt(DIR)` writes `DIR/config.json` + `DIR/model.safetensors` exactly as
`OPTForCausalLM.save_pretrained` names them (tied head, so no `lm_head.weight`).
"""
import json
import os
from typing import Dict

import numpy as np
from safetensors.numpy import save_file


def _opt_tensors(cfg: Dict, rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """Random OPT tensors: unit-scale embeddings, fan-in-scaled weights (so residual ratios are
  O(0.1–1), i.e. the oracles have something to decide), LN scales near 1 (the final LN near
  0.2, so that the tied head's logits are O(1))."""
  d, f, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
  normal = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(np.float32)
  p = "model.decoder."
  out = {p + "embed_tokens.weight": normal(v, d),
         p + "embed_positions.weight": normal(cfg["max_position_embeddings"] + 2, d, s=0.3),
         p + "final_layer_norm.weight": 0.2 + normal(d, s=0.02), p + "final_layer_norm.bias": normal(d, s=0.05)}
  for i in range(cfg["num_hidden_layers"]):
    layer = f"{p}layers.{i}."
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
              "self_attn.out_proj": (d, d), "fc1": (f, d), "fc2": (d, f)}
    scale = 0.4 + 0.8 * rng.random()  # layers differ in how much they contribute
    for name, (n_out, n_in) in shapes.items():
      out[layer + name + ".weight"] = normal(n_out, n_in, s=scale / np.sqrt(n_in))
      out[layer + name + ".bias"] = normal(n_out, s=0.02)
    for name in ("self_attn_layer_norm", "final_layer_norm"):
      out[layer + name + ".weight"] = 1 + normal(d, s=0.1)
      out[layer + name + ".bias"] = normal(d, s=0.05)
  return out


def random_opt(path: str, num_layers: int = 2, d_model: int = 32, num_heads: int = 4, ffn_dim: int = 64,
               vocab_size: int = 64, max_positions: int = 64, seed: int = 0) -> str:
  """Writes a random pre-LN OPT (HF layout) to `path` and returns `path`."""
  cfg = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": vocab_size,
         "hidden_size": d_model, "num_hidden_layers": num_layers, "ffn_dim": ffn_dim,
         "num_attention_heads": num_heads, "max_position_embeddings": max_positions,
         "word_embed_proj_dim": d_model, "do_layer_norm_before": True, "activation_function": "relu",
         "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
         "dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 2,
         "pad_token_id": 1, "torch_dtype": "float32"}
  os.makedirs(path, exist_ok=True)
  save_file(_opt_tensors(cfg, np.random.default_rng(seed)), os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return path
