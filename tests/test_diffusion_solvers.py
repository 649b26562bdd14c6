import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.parameterization import add_noise, training_target
from diffusion.schedules import make_schedule
from diffusion.solvers import (
    TIMESTEP_SPACINGS,
    ddim_step,
    ddpm_step,
    previous_timesteps,
    sampling_timesteps,
)

SHAPE = (2, 4, 4, 3)


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("scaled_linear", 1000, 0.00085, 0.012)


def test_sampling_timesteps_known_grids():
    np.testing.assert_array_equal(sampling_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
    np.testing.assert_array_equal(sampling_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
    np.testing.assert_array_equal(sampling_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(
        sampling_timesteps(1000, 4, "leading", steps_offset=1), [751, 501, 251, 1]
    )


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_inference_steps", [1, 3, 50, 61, 999, 1000])
def test_sampling_timesteps_properties(spacing, num_inference_steps):
    timesteps = sampling_timesteps(1000, num_inference_steps, spacing)
    assert timesteps.dtype == np.int32
    assert timesteps.shape == (num_inference_steps,)
    assert np.all(np.diff(timesteps) < 0)
    assert timesteps[-1] >= 0 and timesteps[0] <= 999


def test_sampling_timesteps_validation():
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train"):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="leading"):
        sampling_timesteps(1000, 10, "karras")
    with pytest.raises(ValueError, match="steps_offset"):
        sampling_timesteps(1000, 1000, "leading", steps_offset=1)


def test_previous_timesteps():
    timesteps = sampling_timesteps(1000, 3, "trailing")
    np.testing.assert_array_equal(timesteps, [999, 666, 332])
    np.testing.assert_array_equal(previous_timesteps(timesteps), [666, 332, -1])
    np.testing.assert_array_equal(previous_timesteps(timesteps, stride=333), [666, 333, -1])


def test_ddim_recovers_x0_from_a_perfect_model(schedule):
    """With the true eps, deterministic DDIM lands exactly on x0 from any grid."""
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)
    noise = _normal(np.random.default_rng(1), SHAPE)
    timesteps = sampling_timesteps(1000, 5, "trailing")
    x = add_noise(schedule, x0, noise, int(timesteps[0]))
    for t, t_prev in zip(timesteps, previous_timesteps(timesteps), strict=True):
        eps = training_target("epsilon", schedule, x0, noise, t)
        x = ddim_step(schedule, "epsilon", eps, x, int(t), int(t_prev))
        if t_prev >= 0:
            np.testing.assert_allclose(x, add_noise(schedule, x0, noise, int(t_prev)), atol=1e-5)
    np.testing.assert_allclose(x, x0, atol=1e-5)


def test_ddpm_last_step_adds_no_noise(schedule):
    x_t = _normal(np.random.default_rng(0), SHAPE)
    output = _normal(np.random.default_rng(1), SHAPE)
    big_noise = 100.0 * jnp.ones(SHAPE)
    for t, t_prev in [(0, -1), (249, -1)]:
        with_noise = ddpm_step(schedule, "v_prediction", output, x_t, t, t_prev, noise=big_noise)
        mean = ddpm_step(schedule, "v_prediction", output, x_t, t, t_prev, noise=None)
        np.testing.assert_array_equal(with_noise, mean)
    noisy = ddpm_step(schedule, "v_prediction", output, x_t, 500, 250, noise=big_noise)
    mean = ddpm_step(schedule, "v_prediction", output, x_t, 500, 250, noise=None)
    assert float(jnp.min(noisy - mean)) > 1.0


def test_ddim_requires_noise_for_positive_eta(schedule):
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(schedule, "epsilon", x, x, 10, 5, eta=0.5)


def test_clip_sample(schedule):
    x_t = 5.0 * jnp.ones(SHAPE)
    output = jnp.zeros(SHAPE)
    # An eps of 0 at t = 0 predicts x0 = x_t / sqrt(acp_0) ~= 5; clipping pulls it to 1.
    clipped = ddim_step(schedule, "epsilon", output, x_t, 0, -1, clip_sample=True)
    np.testing.assert_allclose(clipped, 1.0, atol=1e-6)
    clipped = ddpm_step(
        schedule, "sample", x_t, x_t, 0, -1, noise=None, clip_sample=True, clip_range=2.0
    )
    np.testing.assert_allclose(clipped, 2.0, atol=1e-6)


@pytest.mark.parametrize("step_name", ["ddim", "ddpm"])
def test_steps_under_jit_with_traced_timesteps(schedule, step_name):
    timesteps = sampling_timesteps(1000, 6, "leading")
    prev = previous_timesteps(timesteps)
    x_start = _normal(np.random.default_rng(0), SHAPE)
    noises = _normal(np.random.default_rng(1), (len(timesteps),) + SHAPE)

    def fake_model(x, t):
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(jnp.float32)
        return 0.5 * jnp.tanh(x) + 1e-3 * t

    def step(x, t, t_prev, noise):
        output = fake_model(x, jnp.asarray(t))
        if step_name == "ddim":
            return ddim_step(schedule, "v_prediction", output, x, t, t_prev, eta=0.5, noise=noise)
        return ddpm_step(schedule, "v_prediction", output, x, t, t_prev, noise=noise)

    eager = x_start
    for index, (t, t_prev) in enumerate(zip(timesteps, prev, strict=True)):
        eager = step(eager, int(t), int(t_prev), noises[index])

    timesteps_arr, prev_arr = jnp.asarray(timesteps), jnp.asarray(prev)

    @jax.jit
    def run(x):
        def body(index, x):
            return step(x, timesteps_arr[index], prev_arr[index], noises[index])

        return jax.lax.fori_loop(0, len(timesteps), body, x)

    np.testing.assert_allclose(run(x_start), eager, atol=1e-5)

    # Per-example [B] timesteps: each example follows its own scalar-timestep update.
    t_batch = jnp.array([900, 300], jnp.int32)
    prev_batch = jnp.array([800, -1], jnp.int32)
    batched = jax.jit(step)(x_start, t_batch, prev_batch, noises[0])
    for index in range(2):
        single = step(
            x_start[index : index + 1],
            int(t_batch[index]),
            int(prev_batch[index]),
            noises[0][index : index + 1],
        )
        np.testing.assert_allclose(batched[index : index + 1], single, atol=1e-5)


def test_ddim_with_traced_eta(schedule):
    x = _normal(np.random.default_rng(0), SHAPE)
    noise = _normal(np.random.default_rng(1), SHAPE)
    traced = jax.jit(
        lambda eta: ddim_step(schedule, "epsilon", x, x, 500, 400, eta=eta, noise=noise)
    )
    np.testing.assert_allclose(
        traced(0.7),
        ddim_step(schedule, "epsilon", x, x, 500, 400, eta=0.7, noise=noise),
        atol=1e-6,
    )


def test_steps_keep_input_dtype(schedule):
    x = jnp.ones(SHAPE, jnp.bfloat16)
    assert ddim_step(schedule, "epsilon", x, x, 500, 400).dtype == jnp.bfloat16
    assert ddpm_step(schedule, "epsilon", x, x, 500, 400, noise=x).dtype == jnp.bfloat16
