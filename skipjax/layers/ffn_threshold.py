"""Magnitude thresholding of FF activations, as a hook around the unchanged FFN (CATS).

CATS (Lee et al. 2024, §3): per layer k a threshold t_k is the quantile of |a| that gives the
target sparsity, and activations with |a| < t_k are set to 0 before FF2. Two sites:
  'hidden' — a = the FFN hidden that enters FF2 (SS Eq. 1's a; gated FFNs: act(W_g x) ⊙ W_i x);
  'gate'   — a = act(W_g x) of a gated FFN (CATS's own site: SiLU(x W_gate) before the product).

`zero_below(thresholds, site)` is a context manager around `model.apply` (also inside `jax.jit`,
where `thresholds` may be traced): every `MLP` called while it is active zeroes below
`thresholds[layer_index]` (the slot index the Block passes to the FFN; scanned layers give a
traced one). Outside it, nothing changes. It intercepts the FFN's projections (flax
`nn.intercept_methods`), so the FFN module itself carries no threshold code. An apply during
which no FFN ran under the hook raises, rather than silently doing nothing (`check_applied`).

`capture_gate()` sows |act(W_g x)| as `activations/.../ffn_gate_act` (what the 'gate' site
thresholds), for calibrating thresholds of gated FFNs.
"""
import contextlib
from typing import Iterator, List

import flax.linen as nn
import jax.numpy as jnp

from skipjax.layers import mlp as mlp_lib

SITES = ("hidden", "gate")
GATE_ACT = "ffn_gate_act"


def zero_small(a: jnp.ndarray, t) -> jnp.ndarray:
  """CATS §3: a · 1[|a| ≥ t] (t broadcasts against a's leading axes or is a scalar)."""
  return jnp.where(jnp.abs(a) < t, jnp.zeros_like(a), a)


class _State:
  """Python-side record of the FFN calls seen while a hook is active (trace time)."""

  def __init__(self):
    self.layers: List = []   # layer_index of each FFN call in progress (nested calls stack)
    self.hits = 0            # FFN projections the hook changed / captured


def _layer_index(args, kwargs):
  if "layer_index" in kwargs:
    return kwargs["layer_index"]
  return args[1] if len(args) > 1 else 0


def _interceptor(state: _State, on_projection):
  """Tracks the layer index of the FFN being called; `on_projection(name, ffn, layer, next_fun,
  args, kwargs)` handles the calls of its Dense projections ('gate', 'wi', 'wo')."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, mlp_lib.MLP):
      state.layers.append(_layer_index(args, kwargs))
      try:
        return next_fun(*args, **kwargs)
      finally:
        state.layers.pop()
    parent = module.parent
    if state.layers and isinstance(parent, mlp_lib.MLP) and module.name in ("gate", "wi", "wo"):
      return on_projection(module.name, parent, state.layers[-1], next_fun, args, kwargs)
    return next_fun(*args, **kwargs)

  return intercept


@contextlib.contextmanager
def zero_below(thresholds, site: str = "hidden") -> Iterator[_State]:
  """Within the block, FFN k computes with a · 1[|a| ≥ thresholds[k]] (CATS §3; `site` above).

  thresholds: [num_slots] (array, possibly traced). Yields the hook state; `check_applied` it
  after the apply (a hook that changed no FFN raises)."""
  if site not in SITES:
    raise ValueError(f"threshold site {site!r} is not one of {SITES}")
  t_all = jnp.asarray(thresholds, jnp.float32)
  state = _State()

  def on_projection(name, ffn, layer, next_fun, args, kwargs):
    t = t_all[layer]
    if site == "hidden" and name == "wo":
      state.hits += 1
      (h, *rest) = args
      return next_fun(zero_small(h, t.astype(h.dtype)), *rest, **kwargs)  # [B, T, d_ff] → FF2
    if site == "gate" and name == "gate":
      state.hits += 1
      z = next_fun(*args, **kwargs)  # [B, T, d_ff] pre-activation W_g x
      act = mlp_lib.get_activation(ffn.activation)(z, layer)
      # act(0) = 0 for every activation here, so z → 0 zeroes act(z) and the product.
      return jnp.where(jnp.abs(act) < t.astype(act.dtype), jnp.zeros_like(z), z)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(_interceptor(state, on_projection)):
    yield state


@contextlib.contextmanager
def capture_gate() -> Iterator[_State]:
  """Within the block, gated FFNs sow |act(W_g x)| [B, T, d_ff] as `activations/…/ffn_gate_act`
  (needs `mutable=['activations']`)."""
  state = _State()

  def on_projection(name, ffn, layer, next_fun, args, kwargs):
    z = next_fun(*args, **kwargs)
    if name == "gate":
      state.hits += 1
      ffn.sow("activations", GATE_ACT, jnp.abs(mlp_lib.get_activation(ffn.activation)(z, layer)))
    return z

  with nn.intercept_methods(_interceptor(state, on_projection)):
    yield state


def check_applied(state: _State, what: str = "threshold") -> None:
  """Raises when the hook met no FFN projection it acts on (wrong site for the model, or an FFN
  that is not `MLP`): a hook must never be a silent no-op."""
  if state.hits == 0:
    raise ValueError(f"the FFN {what} hook changed no FFN: the model has no "
                     f"{'gated ' if what == 'gate' else ''}MLP FFN under it (site 'gate' needs mlp_gated=True)")
