"""The train step as build_run compiles it (tiny config, 8 fake devices): frozen text encoder,
optimizer coverage, EMA, determinism, non-finite updates skipped, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_runs import batch_for, fresh_state, leaves, tiny_run
from train.state import ema_decay_at, ema_update


@pytest.fixture(scope="module")
def run():
    return tiny_run()


def test_text_encoder_is_frozen_and_not_in_optimizer(run):
    state, batch = fresh_state(run), batch_for(run)
    before = leaves(run.text_params)
    num_unet_leaves = len(jax.tree_util.tree_leaves(state.params))
    for _ in range(2):
        state, metrics = run.compiled_step(state, run.text_params, batch)
    assert all(np.array_equal(a, b) for a, b in zip(before, leaves(run.text_params), strict=True))
    # Adam moments exist for the UNet's parameters only.
    adam_leaves = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(adam_leaves) == 2 * num_unet_leaves
    text_shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(run.text_params)}
    token_embedding_shape = max(text_shapes, key=lambda s: s[0] if s else 0)
    assert token_embedding_shape not in {np.shape(x) for x in adam_leaves}
    assert int(state.step) == 2
    assert np.isfinite(float(metrics["loss"]))


def test_step_updates_params_and_ema_lags(run):
    state, batch = fresh_state(run), batch_for(run)
    initial = leaves(state.params)
    for _ in range(3):
        state, _ = run.compiled_step(state, run.text_params, batch)
    params, ema = leaves(state.params), leaves(state.ema_params)
    moved = sum(not np.allclose(a, b) for a, b in zip(initial, params, strict=True))
    assert moved > 0.9 * len(initial)
    # EMA sits between the initial and the current parameters.
    for start, current, average in zip(initial, params, ema, strict=True):
        if not np.allclose(start, current):
            assert np.linalg.norm(average - start) < np.linalg.norm(current - start) + 1e-7
            break


def test_same_seed_same_state_different_seed_differs(run):
    batch = batch_for(run)
    results = []
    for seed in (0, 0, 1):
        state = fresh_state(run, 0).replace(rng=jax.random.PRNGKey(seed))
        for _ in range(2):
            state, metrics = run.compiled_step(state, run.text_params, batch)
        results.append((float(metrics["loss"]), leaves(state.params)))
    assert results[0][0] == results[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert results[0][0] != results[2][0]


def test_nonfinite_update_is_skipped_and_counted(run):
    batch = batch_for(run)
    state, _ = run.compiled_step(fresh_state(run), run.text_params, batch)
    good = [leaves(state.params), leaves(state.opt_state), leaves(state.ema_params)]
    # A NaN in the frozen encoder makes the conditioning, the loss and every gradient NaN.
    poisoned = jax.device_put(
        jax.tree_util.tree_map(lambda x: x * jnp.nan, run.text_params), run.text_shardings)
    for expected_in_a_row in (1, 2):
        state, metrics = run.compiled_step(state, poisoned, batch)
        assert not np.isfinite(float(metrics["loss"]))
        assert int(metrics["nonfinite_in_a_row"]) == expected_in_a_row
    assert int(metrics["skipped_nonfinite"]) == 2
    assert int(state.step) == 3  # the step counter (and the data) moves on
    kept = [leaves(state.params), leaves(state.opt_state), leaves(state.ema_params)]
    for before, after in zip(good, kept, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    state, metrics = run.compiled_step(state, run.text_params, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite_in_a_row"]) == 0 and int(state.nonfinite_in_a_row) == 0
    assert int(state.skipped_nonfinite) == 2
    assert not all(np.array_equal(a, b)
                   for a, b in zip(good[0], leaves(state.params), strict=True))


def test_gradient_accumulation_matches_the_whole_batch(run):
    accumulated = tiny_run(grad_accum_steps=2)
    batch = batch_for(run)
    whole, split = fresh_state(run), fresh_state(accumulated)
    # Two steps: the first has learning rate 0 (warmup), the second applies an update that
    # depends on both steps' gradients.
    for _ in range(2):
        whole, whole_metrics = run.compiled_step(whole, run.text_params, batch)
        split, split_metrics = accumulated.compiled_step(split, accumulated.text_params, batch)
        np.testing.assert_allclose(split_metrics["loss"], whole_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(split_metrics["grad_norm"], whole_metrics["grad_norm"],
                                   rtol=1e-4)
    for a, b in zip(leaves(whole.params), leaves(split.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_ema_update_and_warmup():
    ema = {"w": jnp.zeros(3)}
    new = ema_update(ema, {"w": jnp.ones(3)}, 0.9)
    np.testing.assert_allclose(new["w"], 0.1, rtol=1e-6)
    assert float(ema_decay_at(0, 0.999)) < 0.2
    assert float(ema_decay_at(10_000, 0.999)) == np.float32(0.999)
