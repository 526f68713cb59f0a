"""Helpers shared by several test files (tests/ is on sys.path under pytest's default import mode)."""
import jax
import jax.numpy as jnp
import numpy as np


def perturb_routers(params):
  """Router kernels → N(0, 1), biases → 0: mixed per-token routing decisions in a fresh model."""
  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if "router" not in name:
      return x
    if name.endswith("['bias']"):
      return jnp.zeros_like(x)
    return jax.random.normal(jax.random.key(len(name)), x.shape)
  return jax.tree_util.tree_map_with_path(perturb, params)


def decode_step_by_step(model, params, cache, tokens):
  """Logits [B, T, V] of feeding `tokens` [B, T] one position at a time through the KV cache."""
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True, mutable=["cache"]))
  outs = []
  for t in range(tokens.shape[1]):
    logits, state = step(cache, tokens[:, t:t + 1])
    cache = state["cache"]
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def builtin_text(seed: int, lines: int) -> str:
  """Lines of simple English sentences (a tiny offline corpus for the experiment smoke tests)."""
  rng = np.random.default_rng(seed)
  subjects = ["The river", "A small town", "The old canal", "The railway", "Local farmers", "The society"]
  verbs = ["carried", "crossed", "reopened", "restored", "sold", "built", "followed"]
  objects = ["the valley", "coal and grain", "the locks", "the towpath", "the mill", "the church on the hill"]
  return "\n".join(" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in {1800 + i}."
                            for i in rng.integers(0, 200, 4)) for _ in range(lines)) + "\n"
