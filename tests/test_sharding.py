import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.sharding import batch_sharding, data_parallel_size, make_mesh, tree_shardings


def test_mesh_fills_minus_one_with_remaining_devices():
    assert jax.device_count() == 8
    mesh = make_mesh([("data", -1)])
    assert mesh.shape == {"data": 8}
    mesh = make_mesh([("data", -1), ("fsdp", 2)])
    assert mesh.shape == {"data": 4, "fsdp": 2}
    assert data_parallel_size(mesh, ("data", "fsdp")) == 8


@pytest.mark.parametrize("shape, message", [
    ([("data", 3)], "needs 3 devices, found 8"),
    ([("data", -1), ("fsdp", -1)], "at most one axis may be -1"),
    ([("data", -1), ("fsdp", 3)], "not divisible"),
])
def test_bad_mesh_shapes_are_clear(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)


def test_batch_is_split_and_params_replicated():
    mesh = make_mesh([("data", -1)])
    batch = jax.device_put(np.zeros((16, 4), np.float32), batch_sharding(mesh, ("data",)))
    assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 4)}
    params = {"w": jnp.ones((3, 5)), "b": jnp.ones((5,))}
    shardings = tree_shardings(mesh, params)
    placed = jax.device_put(params, shardings)
    assert all(s.data.shape == (3, 5) for s in placed["w"].addressable_shards)
    assert placed["w"].sharding.is_fully_replicated
