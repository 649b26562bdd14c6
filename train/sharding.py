"""Device mesh and sharding rules, declared once.

Parameters carry logical axis names (`models.logical_axes`); `config.mesh.rules` maps each name
to a mesh axis (or None: replicated). With the default rules `embed -> fsdp`, parameters,
gradients, optimizer state and the EMA are split over the `fsdp` axis (ZeRO-3 / FSDP: XLA
gathers each weight where it is used), and the batch over `data` x `fsdp`. With `fsdp` of size
1 the same rules give plain data parallelism. The train setup, the text encoder, the sampler
and the bench all take their shardings from here.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# The default logical-name -> mesh-axis rules (config.mesh.rules): FSDP over the input features
# of every kernel and the width of embedding tables; biases and norms (small) replicated.
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", None), ("vocab", None), ("norm", None))


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


def logical_names(variable) -> tuple | None:
    """The logical axis names an NNX variable was created with (None when it has none)."""
    if not isinstance(variable, nnx.Variable):
        return None
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names is not None else None


def mesh_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
              rules: Mapping[str, str | None] | Sequence[tuple[str, str | None]]) -> P:
    """PartitionSpec for one array from its logical names.

    A name without a rule, a rule naming an axis the mesh does not have, an axis already used by
    an earlier dimension, or a dimension that does not divide over the axis: replicated along
    that dimension (small or odd-sized weights such as a 3-channel output conv stay whole).
    """
    if not names:
        return P()
    rules = dict(rules)
    used, spec = set(), []
    for name, size in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(mesh: Mesh, abstract_tree, rules=DEFAULT_RULES):
    """Shardings for a pytree holding NNX variables (a model state, optimizer state of the same
    leaves, a whole TrainState). Variables are split by their logical names and `rules`; every
    other array (step counters, RNG keys) is replicated."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            return leaf.replace(
                NamedSharding(mesh, mesh_spec(logical_names(leaf), value.shape, mesh, rules))
            )
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(mesh: Mesh, module_or_state, rules=DEFAULT_RULES):
    """Shardings for a model's parameters (an nnx.Module or its state): what the sampler and the
    text encoder use to place weights exactly as training does."""
    state = nnx.state(module_or_state) if isinstance(module_or_state, nnx.Module) else (
        module_or_state)
    return tree_shardings(mesh, state, rules)


def data_parallel_size(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[axis] for axis in batch_axes)


def check_batch_divides(global_batch_size: int, mesh: Mesh, batch_axes: Sequence[str], *,
                        process_count: int = 1, grad_accum_steps: int = 1) -> None:
    """A clear error before anything compiles when the global batch cannot be split evenly."""
    dp_size = data_parallel_size(mesh, batch_axes)
    per_micro_step = dp_size * grad_accum_steps
    if global_batch_size % per_micro_step or global_batch_size % process_count:
        detail = f"the data-parallel size {dp_size} (mesh axes {tuple(batch_axes)} of " \
                 f"{dict(mesh.shape)})"
        if grad_accum_steps > 1:
            detail += f" x train.grad_accum_steps={grad_accum_steps}"
        raise ValueError(
            f"config.train.global_batch_size={global_batch_size} must be divisible by {detail}"
            f" and by the process count {process_count}"
        )


def sharded_bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of placed arrays (for the plan and for tests)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total
