"""Device mesh, and the rules that map the model's logical axes onto it.

The mesh has three axes: "data" (pure data parallelism: parameters replicated), "fsdp"
(data parallelism with parameters and optimizer state split along their "embed" axis) and
"tensor" (attention heads and MLP columns split across devices). The batch is split over
data x fsdp. The rules are data (a run config's `sharding_rules`), applied by flax's own
logical-partitioning functions, as in the flax lm1b example.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from igpt.model import BATCH_AXES, param_shapes

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis or axes (None: replicated). Axes not listed are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("kv", None),
    ("layers", None),
    ("classes", None),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh in a topology-aware device order (`jax.make_mesh`); one
    entry of `shape` may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must give sizes for {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive (or -1 for the rest)")
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
    # Auto axes: shardings are propagated by the compiler (explicit sharding-in-types is
    # jax.make_mesh's default, which igpt's steps are not written for).
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _rules(rules: Rules | None) -> tuple:
    rules = DEFAULT_RULES if rules is None else rules
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def with_activation_sharding(fn: Callable, mesh: Mesh) -> Callable:
    """`fn`, traced with the model's activation constraints (`igpt.model.keep_batch_sharded`)
    bound to `mesh`: wrap a step in it before `jax.jit` (outside it they do nothing)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def tree_shardings(boxed_shapes, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings for a tree of logically-boxed shapes (`igpt.param_shapes(config)`, or
    an optimizer state built from boxed parameters); unboxed leaves are replicated.

    A dimension that its mesh axes do not divide is replicated instead (e.g. a 17-colour
    vocabulary over 2 devices), so any model runs on any mesh.
    """
    specs = nn.get_partition_spec(boxed_shapes)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, _rules(rules))
    shapes = nn.meta.unbox(boxed_shapes)
    return jax.tree.map(_divisible, shardings, shapes)


def _divisible(sharding: NamedSharding, shape) -> NamedSharding:
    spec, dims = [], shape.shape
    padded = tuple(sharding.spec) + (None,) * (len(dims) - len(sharding.spec))
    for axes, size in zip(padded, dims, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        width = math.prod(sharding.mesh.shape[a] for a in names)
        spec.append(axes if names and width > 1 and size % width == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def param_shardings(config, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings of a model's parameters (`config` is an `igpt.ModelConfig`)."""
    return tree_shardings(param_shapes(config), mesh, rules)


def abstract(shapes, shardings):
    """`jax.ShapeDtypeStruct`s carrying `shardings`: a restore target that allocates nothing."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def abstract_params(config, shardings):
    """The parameters of a model (`config`, an `igpt.ModelConfig`) as a restore target."""
    return abstract(nn.meta.unbox(param_shapes(config)), shardings)


def place(params, shardings):
    """Put a parameter tree (host or device arrays) into `shardings`.

    Through host memory: every process holds the whole tree and places its own shards, which
    works the same for one process or many (a device-to-device put onto a mesh spanning
    several processes would need cross-host transfers).
    """
    return jax.device_put(jax.device_get(params), shardings)


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
