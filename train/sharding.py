"""Device mesh and sharding rules, declared once.

The train step and the sampler take their shardings from here. Parameters are replicated over
the mesh for now; sharding them (FSDP over an `fsdp` axis) means changing `param_partition_spec`,
not the step.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(mesh_shape: Sequence[tuple[str, int]], devices=None) -> Mesh:
    """Build a mesh from (axis_name, size) pairs; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in mesh_shape)
    sizes = [int(size) for _, size in mesh_shape]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh.shape={tuple(mesh_shape)}: at most one axis may be -1")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh.shape={tuple(mesh_shape)}: {len(devices)} devices are not divisible "
                f"by the fixed axis sizes (product {known})"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh.shape={tuple(mesh_shape)} needs {math.prod(sizes)} devices, "
            f"found {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_spec(batch_axes: Sequence[str]) -> P:
    """Leading (batch) dimension split over the data-parallel mesh axes."""
    return P(tuple(batch_axes))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(batch_axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_partition_spec(path: tuple, leaf) -> P:
    """The rule that maps one parameter to mesh axes. Replicated until FSDP rules land."""
    del path, leaf
    return P()


def tree_shardings(mesh: Mesh, abstract_tree):
    """Shardings for a pytree of parameters (or optimizer state of the same leaves)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_partition_spec(path, leaf)), abstract_tree
    )


def data_parallel_size(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[axis] for axis in batch_axes)
