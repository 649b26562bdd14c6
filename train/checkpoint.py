"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{state,ema_params,meta,data_iter}`.

`meta` carries the config the run was trained with; the sampler and a resumed run read that one
(`load_config`), never a workdir file a relaunch could overwrite. `data_iter` is the data
iterator's position (one `process_<i>-of-<n>.json` per host, written by Grain's Orbax handler).
Orbax writes each step into a temporary directory and renames it on commit, so a process killed
mid-save leaves the previous checkpoints intact. `<workdir>/config.json` is a convenience copy.

Workdirs may be local paths or fsspec/epath URLs (`gs://...`): paths go through `etils.epath`.
"""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "ema_params", "meta", "data_iter")


class NoCheckpointError(FileNotFoundError):
    """The workdir holds no checkpoint to restore."""


class IncompatibleCheckpointError(ValueError):
    """The workdir's checkpoints were trained with a model the new config cannot load."""


class NonFiniteParametersError(ValueError):
    """A checkpoint (or the state about to be saved) holds NaN or Inf parameters."""


def workdir_path(workdir) -> epath.Path:
    """The workdir as an epath; local paths made absolute (Orbax needs absolute paths)."""
    text = str(workdir)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(text).expanduser().resolve()


def checkpoint_dir(workdir) -> epath.Path:
    return workdir_path(workdir) / CHECKPOINT_DIR


def make_manager(workdir, *, keep: int = 2, keep_period: int = 0, async_save: bool = True,
                 read_only: bool = False):
    """A CheckpointManager keeping the last `keep` steps plus every step divisible by
    `keep_period` (0: none). Saves run in a background thread when `async_save`."""
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_period:
        policies.append(ocp.checkpoint_managers.EveryNSteps(keep_period, exact_interval=True))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, options=options)


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
    """The convenience copy `<workdir>/config.json` (process 0 only, written atomically)."""
    if jax.process_index() != 0:
        return
    directory = workdir_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)  # never leave a half-written config beside good checkpoints


def _tuples(tree):
    # JSON has no tuples; configs use tuples for fixed-length fields such as block widths.
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def _steps(workdir) -> list[int]:
    directory = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def latest_step(workdir) -> int | None:
    steps = _steps(workdir)
    return steps[-1] if steps else None


def resolve_step(workdir, step: int | None = None) -> int:
    steps = _steps(workdir)
    directory = checkpoint_dir(workdir)
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {directory}: train first, or check --workdir")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise NoCheckpointError(
            f"no checkpoint for step {step} in {directory}; available: {steps}"
        )
    return step


def read_meta(workdir, step: int) -> dict:
    """The `meta` item of a checkpoint: step, config, data counters."""
    with make_manager(workdir, read_only=True) as manager:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def load_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
    """The config stored in the checkpoint at `step` (default: the latest). A workdir without
    checkpoints falls back to its config.json copy."""
    if _steps(workdir):
        meta = read_meta(workdir, resolve_step(workdir, step))
        return ml_collections.ConfigDict(_tuples(meta["config"]))
    path = workdir_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise NoCheckpointError(
            f"{path} not found: {str(workdir)!r} is not a training workdir (train writes "
            "checkpoints/ and config.json there)"
        )
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def _param_shapes(tree) -> dict:
    # Keyed by the names along the path only: a saved tree spells nnx's `.value` as a dict key.
    return {
        "/".join(re.findall(r"\w+", jax.tree_util.keystr(path))): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(leaf, "shape")
    }


def check_compatible(workdir, step: int, config: ml_collections.ConfigDict,
                     abstract_params) -> None:
    """Raise IncompatibleCheckpointError when the checkpoint at `step` holds parameters of other
    shapes than `abstract_params` (the new config's UNet) or was trained with another text
    encoder. Reads only; the workdir is left as it is."""
    saved = _flat(read_meta(workdir, step)["config"].get("model", {}), "model")
    now = _flat(_config_json(config).get("model", {}), "model")
    changed = sorted(k for k in saved.keys() | now.keys()
                     if _tuples(saved.get(k)) != _tuples(now.get(k)))
    metadata = ocp.StandardCheckpointer().metadata(
        checkpoint_dir(workdir) / str(step) / "ema_params").item_metadata
    saved_shapes, new_shapes = _param_shapes(metadata), _param_shapes(abstract_params)
    shape_changes = sorted(k for k in saved_shapes.keys() | new_shapes.keys()
                           if saved_shapes.get(k) != new_shapes.get(k))
    encoder_changes = [k for k in changed if k.startswith("model.text_encoder.")]
    if not shape_changes and not encoder_changes:
        return
    fields = ", ".join(f"config.{k}: {_tuples(saved.get(k))!r} -> {_tuples(now.get(k))!r}"
                       for k in changed) or "no model field"
    detail = ""
    if shape_changes:
        first = shape_changes[0]
        detail = (f"; {len(shape_changes)} parameter shapes differ, e.g. {first}: "
                  f"{saved_shapes.get(first)} in the checkpoint, {new_shapes.get(first)} now")
    raise IncompatibleCheckpointError(
        f"{checkpoint_dir(workdir)} holds step {step} of a different model ({fields}{detail}). "
        "Resume with the checkpoint's model config, or start a new --workdir; nothing was changed."
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def is_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` is finite (one jitted reduction)."""
    return bool(jax.device_get(_all_finite(tree)))


def save(manager, state, *, config, data_iter=None, data_counters=None,
         force: bool = False) -> bool:
    """Start an (async) save of `state` at its step; refuses non-finite parameters."""
    step = int(jax.device_get(state.step))
    if not is_finite((state.params, state.ema_params)):
        raise NonFiniteParametersError(
            f"the parameters at step {step} are not finite; not saving them")
    meta = {"step": step, "config": _config_json(config), "data": data_counters or {}}
    items = dict(
        state=ocp.args.StandardSave(state.replace(ema_params=None)),
        ema_params=ocp.args.StandardSave(state.ema_params),
        meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))),
    )
    if data_iter is not None:
        from grain.checkpoint import CheckpointSave

        items["data_iter"] = CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


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


def restore_data_iter(manager, step: int, data_iter) -> bool:
    """Put `data_iter` at the position saved with `step`. False when the checkpoint has no
    iterator position (written before positions were saved). A checkpoint of another process
    count is handed to the iterator's set_state, which resumes it where its source allows and
    raises ValueError where not."""
    from grain.checkpoint import CheckpointRestore

    item_dir = epath.Path(manager.directory) / str(step) / "data_iter"
    if not item_dir.is_dir():
        return False
    own = item_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
        manager.restore(step, args=ocp.args.Composite(data_iter=CheckpointRestore(data_iter)))
        return True
    saved = sorted(p.name for p in item_dir.glob("process_*-of-*.json"))
    if not saved:
        return False
    # Another process count: random-access sources keep one global position, so the state of
    # the same index (or process 0) carries it; the iterator decides whether it can resume.
    index = jax.process_index()
    candidates = [n for n in saved if n.startswith(f"process_{index}-of-")] or saved
    state = (item_dir / candidates[0]).read_text()
    try:
        data_iter.set_state(state.encode())
    except ValueError as error:
        raise ValueError(
            f"the data position in {item_dir} was saved by a run with another process count "
            f"({', '.join(saved)}; this run: process {index} of {jax.process_count()}) and "
            f"cannot be resumed here: {error}"
        ) from error
    data_iter.start_prefetch()
    return True


def restore_ema_params(workdir, step: int, abstract_params, shardings):
    """Restore only the EMA parameters (what the sampler needs) onto the given shardings.
    Raises NonFiniteParametersError when they hold NaN or Inf (a diverged run)."""
    target = _abstract(abstract_params, shardings)
    with make_manager(workdir, read_only=True) as manager:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                ema_params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    if not is_finite(restored.ema_params):
        raise NonFiniteParametersError(
            f"the EMA parameters of checkpoint step {step} in {checkpoint_dir(workdir)} hold "
            "NaN or Inf (the run diverged); sample from an earlier --step"
        )
    return restored.ema_params, restored.meta
