"""Device mesh and the one table mapping logical axis names to mesh axes."""
from typing import Any, Optional, Sequence, Set, Tuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis names used by skipjax.layers → mesh axes ('data', 'model'). Megatron-style
# tensor parallelism: heads, FFN hidden and vocabulary split over 'model'; batch over 'data'.
LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),  # GQA K/V heads (replicated when the model axis does not divide them)
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


_LOGGED: Set[Tuple[Any, ...]] = set()  # indivisible (logical name, size, mesh axes) already logged


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def mesh_spec(names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec of an array with logical axis `names` and `shape` under LOGICAL_AXIS_RULES.

  A dimension its mesh axis does not divide (BERT's vocabulary 30522, a [2, d] token-type table,
  12 heads on 8 devices) is replicated instead of split, as MaxText's rules do; each such case
  is logged once.
  """
  if names is None:
    return P()
  spec = list(nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES))
  for dim, (name, size, axes) in enumerate(zip(names, shape, spec)):
    if axes is None:
      continue
    parts = _mesh_axis_size(mesh, axes)
    if size % parts:
      spec[dim] = None
      key = (name, int(size), axes, parts)
      if key not in _LOGGED:
        _LOGGED.add(key)
        logging.info("sharding: logical axis %r of size %d is not divisible by mesh axis %r (%d devices); "
                     "replicating it", name, size, axes, parts)
  return P(*spec)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (or abstract) values; leaves without
  logical names are replicated, indivisible dimensions too (`mesh_spec`)."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, mesh_spec(leaf.names, np.shape(leaf.unbox()), mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


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
