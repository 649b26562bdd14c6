"""Orbax checkpoints of the train state: round trip, restore onto another mesh, EMA-only
restore for the sampler, retention, config.json, and the errors users see."""

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
from train.state import TrainState, make_optimizer


def _state(config, seed=0):
    optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
    _, params = nnx.split(build_unet(config.model, nnx.Rngs(seed)))
    ema = jax.tree_util.tree_map(lambda p: p + 0.25, params)  # distinguishable from params
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                      opt_state=optimizer.init(params), ema_params=ema,
                      rng=jax.random.PRNGKey(seed))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _place(state, mesh):
    return jax.device_put(state, tree_shardings(mesh, state))


@pytest.fixture(scope="module")
def config():
    return tiny.get_config()


def test_round_trip_onto_a_different_mesh_and_retention(config, tmp_path):
    workdir = str(tmp_path)
    state = _place(_state(config), make_mesh([("data", -1)]))  # 8 devices
    manager = checkpoint.make_manager(workdir, keep=2)
    for step in (1, 2, 3):
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        checkpoint.save(manager, state, config=config, data_state={"samples_yielded": step * 16})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    manager.close()

    # Restore with a fresh manager (a new process would) onto a 2-device mesh.
    small_mesh = make_mesh([("data", -1)], devices=jax.devices()[:2])
    abstract = jax.eval_shape(lambda: _state(config))
    manager = checkpoint.make_manager(workdir, keep=2)
    restored, meta = checkpoint.restore_state(
        manager, manager.latest_step(), abstract, tree_shardings(small_mesh, abstract)
    )
    manager.close()
    assert int(restored.step) == 3
    assert meta["step"] == 3 and meta["data"] == {"samples_yielded": 48}
    assert meta["config"]["train"]["global_batch_size"] == config.train.global_batch_size
    for before, after in zip(_leaves(state), _leaves(restored), strict=True):
        np.testing.assert_array_equal(before, after)
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == 2


def test_sampler_restores_only_ema_params(config, tmp_path):
    workdir = str(tmp_path)
    state = _place(_state(config, seed=1), make_mesh([("data", -1)]))
    state = state.replace(step=jnp.asarray(5, jnp.int32))
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, state, config=config)
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


def test_config_json_round_trip_keeps_tuples(config, tmp_path):
    checkpoint.save_config(str(tmp_path), config)
    loaded = checkpoint.load_config(str(tmp_path))
    assert loaded.model.unet.block_out_channels == config.model.unet.block_out_channels
    assert isinstance(loaded.model.unet.down_block_types, tuple)
    assert json.loads(loaded.to_json_best_effort()) == json.loads(config.to_json_best_effort())
    assert not os.path.exists(os.path.join(tmp_path, "config.json.tmp"))


def test_missing_workdir_or_step_is_a_clear_error(config, tmp_path):
    with pytest.raises(checkpoint.NoCheckpointError, match="not a training workdir"):
        checkpoint.load_config(str(tmp_path))
    with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint in .*train first"):
        checkpoint.resolve_step(str(tmp_path))
    state = _place(_state(config), make_mesh([("data", -1)]))
    with checkpoint.make_manager(str(tmp_path)) as manager:
        checkpoint.save(manager, state.replace(step=jnp.asarray(4, jnp.int32)), config=config)
    assert checkpoint.resolve_step(str(tmp_path)) == 4
    assert checkpoint.resolve_step(str(tmp_path), 4) == 4
    with pytest.raises(checkpoint.NoCheckpointError, match=r"step 9 .*available: \[4\]"):
        checkpoint.resolve_step(str(tmp_path), 9)
