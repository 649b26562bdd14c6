"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{state,ema_params,meta}` plus
`<workdir>/config.json`, which the sampler reads to rebuild the networks."""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class NoCheckpointError(FileNotFoundError):
    """The workdir holds no checkpoint to restore."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, keep: int = 2, save_every_steps: int = 1):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every_steps, create=True
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "ema_params", "meta"), options=options
    )


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)  # never leave a half-written config beside good checkpoints


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise NoCheckpointError(
            f"{path} not found: {workdir!r} is not a training workdir (train writes config.json "
            "and checkpoints/ there)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(tree):
    # JSON has no tuples; configs use tuples for fixed-length fields such as block widths.
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def save(manager, state, *, config, data_state=None, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    meta = {"step": step, "config": config.to_dict(), "data": data_state or {}}
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state.replace(ema_params=None)),
            ema_params=ocp.args.StandardSave(state.ema_params),
            meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))),
        ),
        force=force,
    )


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def restore_state(manager, step, abstract_state, state_shardings):
    """Restore the full train state onto the given shardings (any mesh)."""
    target = _abstract(abstract_state, state_shardings)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target.replace(ema_params=None)),
            ema_params=ocp.args.StandardRestore(target.ema_params),
            meta=ocp.args.JsonRestore(),
        ),
    )
    state = restored.state.replace(ema_params=restored.ema_params)
    return state, restored.meta


def resolve_step(workdir: str, step: int | None = None) -> int:
    directory = checkpoint_dir(workdir)
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {directory}: train first, or check --workdir")
    if step is None:
        return max(steps)
    if step not in steps:
        raise NoCheckpointError(
            f"no checkpoint for step {step} in {directory}; available: {sorted(steps)}"
        )
    return step


def restore_ema_params(workdir: str, step: int, abstract_params, shardings):
    """Restore only the EMA parameters (what the sampler needs) onto the given shardings."""
    target = _abstract(abstract_params, shardings)
    with ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "ema_params", "meta")
    ) as manager:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                ema_params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    return restored.ema_params, restored.meta
