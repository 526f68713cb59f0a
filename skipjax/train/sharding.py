"""Device mesh and the one table mapping logical axis names to mesh axes."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis names used by skipjax.layers → mesh axes ('data', 'model'). Megatron-style
# tensor parallelism: heads, FFN hidden and vocabulary split over 'model'; batch over 'data'.
LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("kv", None),
    ("layers", None),
    ("length", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
  """Resolve one -1 entry of `config.mesh.shape` to use every device."""
  shape = list(shape)
  if shape.count(-1) == 1:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = num_devices // rest if rest and num_devices % rest == 0 else -1
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A Mesh with Auto axis types from `config.mesh` (shape may contain one -1)."""
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config.shape, len(devices))
  return Mesh(mesh_utils.create_device_mesh(shape, devices=devices), tuple(mesh_config.axes))


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (or abstract) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def like_params(tree: Any, param_shardings: Any, params: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer-state tree: a leaf whose key path ends with a parameter's path
  and has that parameter's shape gets the parameter's sharding; others (counts, factored
  moments) are replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree_util.tree_leaves(param_shardings)):
    by_path[_names(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def _names(path) -> tuple:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
