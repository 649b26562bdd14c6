"""Orbax checkpoints of the train state: round trip, restore onto another mesh, EMA-only
restore for the sampler, retention (last K + every M-th), the config stored with each step, the
refusals (another model shape, non-finite parameters) and the errors users see."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from models.factory import abstract_unet, build_unet
from train import checkpoint
from train.sharding import make_mesh, tree_shardings
from train.state import init_train_state, make_optimizer


def _state(config, seed=0):
    optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
    _, params = nnx.split(build_unet(config.model, nnx.Rngs(seed)))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(seed))
    # EMA distinguishable from the parameters.
    return state.replace(ema_params=jax.tree_util.tree_map(lambda p: p + 0.25, params))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _place(state, mesh):
    return jax.device_put(state, tree_shardings(mesh, state))


def _at(state, step):
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _files(directory):
    return sorted(
        (os.path.relpath(os.path.join(root, name), directory),
         os.path.getsize(os.path.join(root, name)))
        for root, _, names in os.walk(directory) for name in names
    )


@pytest.fixture(scope="module")
def config():
    return tiny.get_config()


@pytest.fixture(scope="module")
def state(config):
    return _place(_state(config), make_mesh([("data", -1)]))  # 8 devices


def test_round_trip_onto_a_different_mesh_and_retention(config, state, tmp_path):
    workdir = str(tmp_path)
    manager = checkpoint.make_manager(workdir, keep=2, keep_period=4)
    for step in range(1, 10):
        checkpoint.save(manager, _at(state, step), config=config,
                        data_counters={"examples": step * 16})
    manager.wait_until_finished()
    # The last two, plus every 4th.
    assert manager.all_steps() == [4, 8, 9]
    manager.close()

    # Restore with a fresh manager (a new process would) onto a 2-device mesh.
    small_mesh = make_mesh([("data", -1)], devices=jax.devices()[:2])
    abstract = jax.eval_shape(lambda: _state(config))
    manager = checkpoint.make_manager(workdir, keep=2)
    restored, meta = checkpoint.restore_state(
        manager, manager.latest_step(), abstract, tree_shardings(small_mesh, abstract)
    )
    manager.close()
    assert int(restored.step) == 9
    assert meta["step"] == 9 and meta["data"] == {"examples": 144}
    for before, after in zip(_leaves(_at(state, 9)), _leaves(restored), strict=True):
        np.testing.assert_array_equal(before, after)
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == 2


def test_fsdp_and_replicated_restore_onto_each_other(config, tmp_path):
    fsdp = make_mesh([("data", 2), ("fsdp", 4)])  # 8 devices, parameters split 4 ways
    sharded = _place(_state(config, seed=3), fsdp)
    split = [leaf for leaf in jax.tree_util.tree_leaves(sharded.params)
             if not leaf.sharding.is_fully_replicated]
    assert split, "the FSDP rules split some parameters"
    with checkpoint.make_manager(str(tmp_path / "fsdp")) as manager:
        checkpoint.save(manager, _at(sharded, 2), config=config)
    abstract = jax.eval_shape(lambda: _state(config))

    # FSDP over 8 -> replicated over 4 devices -> saved again -> FSDP over 2 devices.
    replicated_mesh = make_mesh([("data", -1)], devices=jax.devices()[:4])
    with checkpoint.make_manager(str(tmp_path / "fsdp")) as manager:
        replicated_state, _ = checkpoint.restore_state(
            manager, 2, abstract, tree_shardings(replicated_mesh, abstract, ()))
    assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
               for leaf in jax.tree_util.tree_leaves(replicated_state.params))
    with checkpoint.make_manager(str(tmp_path / "replicated")) as manager:
        checkpoint.save(manager, replicated_state, config=config)
    small_fsdp = make_mesh([("fsdp", 2)], devices=jax.devices()[6:])
    with checkpoint.make_manager(str(tmp_path / "replicated")) as manager:
        back, _ = checkpoint.restore_state(
            manager, 2, abstract, tree_shardings(small_fsdp, abstract))
    assert any(not leaf.sharding.is_fully_replicated
               for leaf in jax.tree_util.tree_leaves(back.params))
    for expected, got in zip(_leaves(_at(sharded, 2)), _leaves(back), strict=True):
        np.testing.assert_array_equal(expected, got)


def test_sampler_restores_only_ema_params(config, state, tmp_path):
    workdir = str(tmp_path)
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, _at(state, 5), config=config)
    _, abstract_params = abstract_unet(config.model)
    mesh = make_mesh([("data", -1)])
    ema, meta = checkpoint.restore_ema_params(
        workdir, 5, abstract_params, tree_shardings(mesh, abstract_params)
    )
    assert meta["step"] == 5
    for expected, got in zip(_leaves(state.ema_params), _leaves(ema), strict=True):
        np.testing.assert_array_equal(expected, got)
    assert not all(np.array_equal(a, b)
                   for a, b in zip(_leaves(state.params), _leaves(ema), strict=True))


def test_config_comes_from_the_checkpoint_not_the_workdir_copy(config, state, tmp_path):
    workdir = str(tmp_path)
    first = config.copy_and_resolve_references()
    first.optim.learning_rate = 1e-3
    second = config.copy_and_resolve_references()
    second.optim.learning_rate = 2e-3
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, _at(state, 2), config=first)
        manager.wait_until_finished()
        checkpoint.save(manager, _at(state, 4), config=second)
    # A later launch rewrote the convenience copy; the checkpoints still know their own config.
    bogus = config.copy_and_resolve_references()
    bogus.optim.learning_rate = 9.0
    checkpoint.save_config(workdir, bogus)
    assert checkpoint.load_config(workdir).optim.learning_rate == 2e-3
    assert checkpoint.load_config(workdir, step=2).optim.learning_rate == 1e-3
    loaded = checkpoint.load_config(workdir)
    assert loaded.model.unet.block_out_channels == config.model.unet.block_out_channels
    assert isinstance(loaded.model.unet.down_block_types, tuple)


def test_config_json_round_trip_keeps_tuples(config, tmp_path):
    checkpoint.save_config(str(tmp_path), config)
    loaded = checkpoint.load_config(str(tmp_path))  # no checkpoint yet: the copy
    assert loaded.model.unet.block_out_channels == config.model.unet.block_out_channels
    assert isinstance(loaded.model.unet.down_block_types, tuple)
    assert json.loads(loaded.to_json_best_effort()) == json.loads(config.to_json_best_effort())
    assert not os.path.exists(os.path.join(tmp_path, "config.json.tmp"))


def test_another_model_shape_is_refused_and_nothing_changes(config, state, tmp_path):
    workdir = str(tmp_path)
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, _at(state, 3), config=config)
    _, same = abstract_unet(config.model)
    checkpoint.check_compatible(workdir, 3, config, same)  # same model: fine

    wider = config.copy_and_resolve_references()
    wider.model.unet.block_out_channels = (16, 48)
    _, wider_params = abstract_unet(wider.model)
    before = _files(workdir)
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"block_out_channels: \(16, 32\) -> \(16, 48\).*parameter shapes"):
        checkpoint.check_compatible(workdir, 3, wider, wider_params)
    assert _files(workdir) == before

    other_encoder = config.copy_and_resolve_references()
    other_encoder.model.text_encoder.seed = 99  # same shapes, different conditioning
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="text_encoder.seed"):
        checkpoint.check_compatible(workdir, 3, other_encoder, same)


def test_non_finite_parameters_are_never_saved_nor_sampled(config, state, tmp_path):
    workdir = str(tmp_path)
    poisoned = state.replace(ema_params=jax.tree_util.tree_map(
        lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.ema_params))
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, _at(state, 1), config=config)
        manager.wait_until_finished()
        with pytest.raises(checkpoint.NonFiniteParametersError, match="step 2"):
            checkpoint.save(manager, _at(poisoned, 2), config=config)
        manager.wait_until_finished()
        assert manager.all_steps() == [1]

        # A NaN checkpoint from elsewhere (an older version): the sampler refuses it.
        manager.save(7, args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardSave(_at(poisoned, 7).replace(ema_params=None)),
            ema_params=checkpoint.ocp.args.StandardSave(poisoned.ema_params),
            meta=checkpoint.ocp.args.JsonSave({"step": 7, "config": config.to_dict()})))
    _, abstract_params = abstract_unet(config.model)
    shardings = tree_shardings(make_mesh([("data", -1)]), abstract_params)
    with pytest.raises(checkpoint.NonFiniteParametersError, match="step 7.*NaN or Inf"):
        checkpoint.restore_ema_params(workdir, 7, abstract_params, shardings)
    checkpoint.restore_ema_params(workdir, 1, abstract_params, shardings)


def test_missing_workdir_or_step_is_a_clear_error(config, state, tmp_path):
    with pytest.raises(checkpoint.NoCheckpointError, match="not a training workdir"):
        checkpoint.load_config(str(tmp_path))
    with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint in .*train first"):
        checkpoint.resolve_step(str(tmp_path))
    with checkpoint.make_manager(str(tmp_path)) as manager:
        checkpoint.save(manager, _at(state, 4), config=config)
    assert checkpoint.resolve_step(str(tmp_path)) == 4
    assert checkpoint.resolve_step(str(tmp_path), 4) == 4
    with pytest.raises(checkpoint.NoCheckpointError, match=r"step 9 .*available: \[4\]"):
        checkpoint.resolve_step(str(tmp_path), 9)
