"""FSDP on 8 fake devices: the state is split 8 ways and the update equals the replicated one."""

import jax
import numpy as np
import pytest

from tests.train_runs import batch_for, fresh_state, leaves, tiny_run
from train.sharding import sharded_bytes_per_device

FSDP_MESH = (("data", 1), ("fsdp", -1))


@pytest.fixture(scope="module")
def fsdp_run():
    return tiny_run(FSDP_MESH)


def _total_bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_fsdp_state_bytes_per_device_are_about_an_eighth(fsdp_run):
    run = fsdp_run
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8}
    total = _total_bytes(run.abstract_state)
    state = fresh_state(run)
    per_device = sharded_bytes_per_device(state)
    # Biases, norms and a few odd-sized kernels stay whole: a little above total / 8.
    assert total / 8 <= per_device < 1.25 * total / 8
    # The compiled step's own figure: its arguments on one device are that share of the state,
    # of the frozen encoder and of the batch, not a whole copy.
    expected_arguments = (per_device + sharded_bytes_per_device(run.text_params)
                          + sharded_bytes_per_device(batch_for(run)))
    arguments = run.figures["argument_bytes_per_device"]
    assert abs(arguments - expected_arguments) < 0.05 * expected_arguments
    assert arguments < 0.3 * total
    # Adam moments and the EMA are split like the parameters.
    kernel_shardings = [
        leaf.sharding for leaf in jax.tree_util.tree_leaves(state.ema_params)
        if leaf.ndim == 4 and leaf.shape[2] % 8 == 0
    ]
    assert kernel_shardings and not any(s.is_fully_replicated for s in kernel_shardings)
    moments = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state) if leaf.ndim == 4]
    assert sum(not leaf.sharding.is_fully_replicated for leaf in moments) >= len(moments) * 0.8


def test_fsdp_and_replicated_give_the_same_update(fsdp_run):
    replicated_run = tiny_run()
    assert replicated_run.mesh.shape["fsdp"] == 1
    batch_fsdp, batch_rep = batch_for(fsdp_run), batch_for(replicated_run)
    fsdp_state, rep_state = fresh_state(fsdp_run), fresh_state(replicated_run)
    # The sharded initialisation creates the same numbers whatever the layout.
    for a, b in zip(leaves(fsdp_state.params), leaves(rep_state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for _ in range(2):
        fsdp_state, fsdp_metrics = fsdp_run.compiled_step(
            fsdp_state, fsdp_run.text_params, batch_fsdp)
        rep_state, rep_metrics = replicated_run.compiled_step(
            rep_state, replicated_run.text_params, batch_rep)
    np.testing.assert_allclose(fsdp_metrics["loss"], rep_metrics["loss"], rtol=1e-5)
    for a, b in zip(leaves(fsdp_state.params), leaves(rep_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(leaves(fsdp_state.ema_params), leaves(rep_state.ema_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_model_flops_are_the_global_step_split_over_devices(fsdp_run):
    replicated_run = tiny_run()
    model = [run.figures["model_flops_per_step_per_device"] * run.mesh.size
             for run in (fsdp_run, replicated_run)]
    # One global program, however it is sharded.
    assert model[0] == model[1] > 0
    # XLA's CPU count of the data-parallel program (its matrix work plus elementwise work,
    # per device) agrees to within a few tens of percent: the jaxpr walk misses no big part.
    xla = replicated_run.figures["flops_per_step_per_device"] * replicated_run.mesh.size
    assert 0.7 < model[1] / xla < 1.4
