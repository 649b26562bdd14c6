"""Numerical parity with PyTorch diffusers' schedulers (a test-only dependency, else skipped)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

from diffusion.schedules import make_schedule  # noqa: E402
from diffusion.solvers import (  # noqa: E402
    TIMESTEP_SPACINGS,
    ddim_step,
    ddpm_step,
    previous_timesteps,
    sampling_timesteps,
)

DIFFUSERS_SCHEDULE_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
SHAPE = (2, 4, 4, 3)


def _diffusers_kwargs(name, num_train_timesteps=1000, rescale=False):
    return dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=DIFFUSERS_SCHEDULE_NAMES[name],
        rescale_betas_zero_snr=rescale,
        clip_sample=False,
    )


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", list(DIFFUSERS_SCHEDULE_NAMES))
def test_alphas_cumprod_match(name, rescale):
    reference = diffusers.DDPMScheduler(**_diffusers_kwargs(name, rescale=rescale))
    ours = make_schedule(name, 1000, 0.00085, 0.012, rescale_zero_terminal_snr=rescale)
    # diffusers rescales in float32, recovering betas as ratios of nearly equal numbers; ours
    # are computed in float64, so only the quantity the math uses, alphas_cumprod, is held tight.
    beta_tolerance = dict(rtol=1e-4, atol=1e-6) if rescale else dict(atol=1e-6)
    np.testing.assert_allclose(ours.betas, reference.betas.numpy(), **beta_tolerance)
    np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), atol=1e-5)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_train_timesteps", [1000, 999])
def test_sampling_timesteps_match(spacing, num_train_timesteps):
    for scheduler_class in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        reference = scheduler_class(
            num_train_timesteps=num_train_timesteps, timestep_spacing=spacing
        )
        for num_inference_steps in (1, 2, 3, 7, 10, 25, 50, 61, 250, 333, num_train_timesteps):
            reference.set_timesteps(num_inference_steps)
            expected = reference.timesteps.numpy()
            ours = sampling_timesteps(num_train_timesteps, num_inference_steps, spacing)
            if len(expected) == num_inference_steps + 1:
                # diffusers' float arange sometimes appends a spurious timestep -1 ("trailing").
                assert spacing == "trailing" and expected[-1] == -1
                expected = expected[:-1]
            np.testing.assert_array_equal(ours, expected, err_msg=f"{num_inference_steps=}")


def test_leading_steps_offset_matches():
    reference = diffusers.DDIMScheduler(steps_offset=1, timestep_spacing="leading")
    reference.set_timesteps(50)
    np.testing.assert_array_equal(
        sampling_timesteps(1000, 50, "leading", steps_offset=1), reference.timesteps.numpy()
    )


def _fake_model_output(x, step_index):
    # Depends on the state so that any per-step discrepancy feeds into later steps.
    return 0.8 * np.tanh(x) + 0.1 * np.cos(step_index + x)


@pytest.mark.parametrize("spacing, clip_sample", [("leading", False), ("trailing", True)])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_trajectory_matches(prediction_type, eta, spacing, clip_sample):
    num_inference_steps = 10
    kwargs = _diffusers_kwargs("scaled_linear")
    kwargs.update(
        prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip_sample
    )
    reference = diffusers.DDIMScheduler(**kwargs)
    reference.set_timesteps(num_inference_steps)
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)

    timesteps = sampling_timesteps(1000, num_inference_steps, spacing)
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
    # DDIMScheduler steps back by a fixed stride, whatever the spacing.
    prev = previous_timesteps(timesteps, stride=1000 // num_inference_steps)

    rng = np.random.default_rng(0)
    x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    for index, (t, t_prev) in enumerate(zip(timesteps, prev, strict=True)):
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        output_ref = torch.from_numpy(_fake_model_output(x_ref.numpy(), index))
        x_ref = reference.step(
            output_ref, int(t), x_ref, eta=eta, variance_noise=torch.from_numpy(noise)
        ).prev_sample
        output_ours = jnp.asarray(_fake_model_output(np.asarray(x_ours), index))
        x_ours = ddim_step(
            schedule,
            prediction_type,
            output_ours,
            jnp.asarray(x_ours),
            int(t),
            int(t_prev),
            eta=eta,
            noise=jnp.asarray(noise),
            clip_sample=clip_sample,
        )
        np.testing.assert_allclose(
            x_ours, x_ref.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"step {index}, t={t}"
        )


@pytest.fixture
def ddpm_noise(monkeypatch):
    """Feeds DDPMScheduler.step the noise we choose instead of drawing its own."""
    supplied = {}

    def fixed_randn(shape, **_):
        return supplied["noise"]

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fixed_randn)
    return supplied


@pytest.mark.parametrize(
    "spacing, num_inference_steps, num_train_timesteps",
    [("leading", 10, 1000), ("trailing", 7, 1000), ("linspace", 12, 1000), ("leading", 50, 50)],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_trajectory_matches(
    ddpm_noise, prediction_type, spacing, num_inference_steps, num_train_timesteps
):
    kwargs = _diffusers_kwargs("linear", num_train_timesteps)
    kwargs.update(
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        variance_type="fixed_small",
    )
    reference = diffusers.DDPMScheduler(**kwargs)
    reference.set_timesteps(num_inference_steps)
    schedule = make_schedule("linear", num_train_timesteps)

    timesteps = sampling_timesteps(num_train_timesteps, num_inference_steps, spacing)
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
    prev = previous_timesteps(timesteps)

    rng = np.random.default_rng(1)
    x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    for index, (t, t_prev) in enumerate(zip(timesteps, prev, strict=True)):
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ddpm_noise["noise"] = torch.from_numpy(noise)
        output = _fake_model_output(x_ref.numpy(), index)
        if prediction_type == "sample":
            output = np.clip(output, -1, 1)
        x_ref = reference.step(torch.from_numpy(output), int(t), x_ref).prev_sample
        output = _fake_model_output(np.asarray(x_ours), index)
        if prediction_type == "sample":
            output = np.clip(output, -1, 1)
        x_ours = ddpm_step(
            schedule,
            prediction_type,
            jnp.asarray(output),
            jnp.asarray(x_ours),
            int(t),
            int(t_prev),
            noise=jnp.asarray(noise),
        )
        np.testing.assert_allclose(
            x_ours, x_ref.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"step {index}, t={t}"
        )
