"""Train state, created directly with its target sharding (no unsharded host copy)."""
from typing import Any, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from skipjax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


# Stream id folded into a key to derive the 'layerdrop' rng without changing the other streams' keys.
LAYERDROP_STREAM = 0x4C44


def init_rngs(rng: jax.Array) -> dict:
  params, dropout, gate = jax.random.split(rng, 3)
  return {"params": params, "dropout": dropout, "gate": gate, "layerdrop": jax.random.fold_in(rng, LAYERDROP_STREAM)}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       example_tokens: jnp.ndarray, mesh: Mesh) -> Tuple[TrainState, TrainState]:
  """Returns (state, state_shardings); params follow LOGICAL_AXIS_RULES."""
  boxed = jax.eval_shape(lambda r: model.init(init_rngs(r), example_tokens), rng)["params"]
  param_shardings = sharding_lib.logical_shardings(boxed, mesh)

  def init_fn(r):
    params = nn.meta.unbox(model.init(init_rngs(r), example_tokens)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn, rng)
  shardings = TrainState(
      step=sharding_lib.replicated(mesh), params=param_shardings,
      opt_state=sharding_lib.like_params(abstract.opt_state, param_shardings, abstract.params, mesh))
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return state, shardings


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (the restore target for orbax)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
