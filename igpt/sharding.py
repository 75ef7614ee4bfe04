"""Device mesh and the rule table that maps the model's logical axes onto it.

The mesh has three axes: "data" (pure data parallelism: parameters replicated), "fsdp"
(data parallelism with parameters and optimizer state split along their "embed" axis) and
"tensor" (attention heads and MLP columns split across devices). The batch is split over
data x fsdp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated). Axes not listed are replicated.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("kv", None),
    ("layers", None),
    ("classes", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 for "all remaining"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must give sizes for {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices but {len(devices)} are available; use -1 for one axis to take the rest"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Partition spec for one array; a dimension that the mesh axes don't divide is replicated."""
    rules = dict(RULES)
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = rules.get(name) if name else None
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        width = math.prod(mesh.shape[a] for a in axes_tuple)
        spec.append(axes if axes_tuple and size % width == 0 and width > 1 else None)
    return PartitionSpec(*spec)


def tree_shardings(boxed_shapes, mesh: Mesh):
    """NamedShardings for a tree of logically-boxed shapes (e.g. `igpt.param_shapes(config)`,
    or an optimizer state built from them); unboxed leaves are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _spec_for(leaf.names, leaf.value.shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays whose leading axis is the global batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local batch into one global array per key, split over the mesh's
    batch axes (works the same with one process or many)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
