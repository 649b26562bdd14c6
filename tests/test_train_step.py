"""The train step on the tiny config: frozen text encoder, optimizer coverage, EMA, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from models.factory import build_frozen_text_encoder, build_unet, text_conditioning_fn
from train.loop import schedule_from_config, synthetic_tokenizer_workdir
from train.state import TrainState, ema_decay_at, ema_update, make_optimizer
from train.step import make_train_step


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _setup(seed=0):
    config = tiny.get_config()
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(
        config.model, synthetic_tokenizer_workdir(config))
    unet_graphdef, params = nnx.split(build_unet(config.model, nnx.Rngs(seed)))
    optimizer, lr_fn = make_optimizer(config.optim, config.train.num_train_steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), ema_params=params,
                       rng=jax.random.PRNGKey(seed))
    step = jax.jit(make_train_step(
        unet_graphdef=unet_graphdef,
        encode_text=text_conditioning_fn(config.model, tokenizer, text_graphdef),
        schedule=schedule_from_config(config), optimizer=optimizer, learning_rate_fn=lr_fn,
        config=config, empty_input_ids=jnp.asarray(tokenizer([""])[0])))
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    batch = {
        "images": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
        "input_ids": tokenizer(["a red circle in the top left"] * 8),
    }
    return config, state, text_params, step, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_text_encoder_is_frozen_and_not_in_optimizer(setup):
    _, state, text_params, step, batch = setup
    before = _leaves(text_params)
    num_unet_leaves = len(jax.tree_util.tree_leaves(state.params))
    for _ in range(2):
        state, metrics = step(state, text_params, batch)
    assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(text_params), strict=True))
    # Adam moments exist for the UNet's parameters only.
    adam_leaves = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(adam_leaves) == 2 * num_unet_leaves
    text_shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(text_params)}
    token_embedding_shape = max(text_shapes, key=lambda s: s[0] if s else 0)
    assert token_embedding_shape not in {np.shape(x) for x in adam_leaves}
    assert int(state.step) == 2
    assert np.isfinite(float(metrics["loss"]))


def test_step_updates_params_and_ema_lags(setup):
    _, state, text_params, step, batch = setup
    initial = _leaves(state.params)
    for _ in range(3):
        state, _ = step(state, text_params, batch)
    params, ema = _leaves(state.params), _leaves(state.ema_params)
    moved = sum(not np.allclose(a, b) for a, b in zip(initial, params, strict=True))
    assert moved > 0.9 * len(initial)
    # EMA sits between the initial and the current parameters.
    for start, current, average in zip(initial, params, ema, strict=True):
        if not np.allclose(start, current):
            assert np.linalg.norm(average - start) < np.linalg.norm(current - start) + 1e-7
            break


def test_same_seed_same_state_different_seed_differs(setup):
    _, initial, text_params, step, batch = setup
    results = []
    for seed in (0, 0, 1):
        state, metrics = step(initial.replace(rng=jax.random.PRNGKey(seed)), text_params, batch)
        results.append((float(metrics["loss"]), _leaves(state.params)))
    assert results[0][0] == results[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert results[0][0] != results[2][0]


def test_ema_update_and_warmup():
    ema = {"w": jnp.zeros(3)}
    new = ema_update(ema, {"w": jnp.ones(3)}, 0.9)
    np.testing.assert_allclose(new["w"], 0.1, rtol=1e-6)
    assert float(ema_decay_at(0, 0.999)) < 0.2
    assert float(ema_decay_at(10_000, 0.999)) == np.float32(0.999)
