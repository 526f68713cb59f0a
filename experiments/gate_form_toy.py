"""Issue 15 P1: the router-logit gradient of the two SkipLayer gate forms on a layer that helps every token.

    python -m experiments.gate_form_toy

2048 tokens, x = 3·N(0, 1) (the stream dominates F(x) = x + R(x)), target x + 2R(x) (so R helps every
token), ST-Gumbel gates from random logits. For `gate_form` paper (LtS Eq. 4) and residual, prints the
fraction of routed / skipped tokens whose route-logit gradient has the sign of the soft relaxation's,
s₀s₁⟨dy, R(x)⟩ (negative for every token here), and the correlation with it. The same set-up is
asserted in tests/test_routing_review.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import routing


def main(n: int = 2048, d: int = 16):
  rng = np.random.default_rng(1)
  x = 3.0 * rng.standard_normal((n, d)).astype(np.float32)                   # [n, d]
  r = rng.standard_normal((n, d)).astype(np.float32)                         # R(x) [n, d]
  f, target = x + r, x + 2.0 * r
  logits = rng.standard_normal((n, 2)).astype(np.float32)
  key = jax.random.key(0)

  def loss(l, form):
    y = routing.gated_layer_output(x, f, routing.gumbel_gate(l, key), form=form)
    return 0.5 * jnp.sum((y - target) ** 2)

  routed = np.asarray(routing.gumbel_gate(logits, key).mask) > 0             # [n]
  s = np.asarray(jax.nn.softmax(logits + jax.random.gumbel(key, logits.shape)))
  y = np.where(routed[:, None], f, x)
  relax = s[:, 0] * s[:, 1] * np.sum((y - target) * r, -1)                  # [n] s₀s₁⟨dy, R⟩
  for form in ("paper", "residual"):
    g = np.asarray(jax.grad(loss)(logits, form))[:, 1]                      # [n] ∂L/∂l₁
    print(f"{form}: right sign routed {np.mean(g[routed] < 0):.3f}, skipped {np.mean(g[~routed] < 0):.3f}; "
          f"correlation with the relaxation, routed {np.corrcoef(g[routed], relax[routed])[0, 1]:+.3f}")


if __name__ == "__main__":
  main()
