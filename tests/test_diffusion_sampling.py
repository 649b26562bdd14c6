"""The solver loop, checked two ways: whole trajectories against diffusers' PyTorch schedulers
(same model function, same timesteps, same states), and sampling a Gaussian data distribution
with its exact denoiser (the sample mean and variance come back)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.sampling import SOLVER_NAMES, make_solver, run_solver, sigma_to_timestep
from diffusion.schedules import make_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 4, 3)
STEPS = 8


def _model_numpy(x, t):
    # Depends on the state and the timestep, so a wrong state or timestep shows up downstream.
    return 0.8 * np.tanh(x) + 0.1 * np.cos(t / 300.0 + x)


def _reference(name, schedule, prediction_type, spacing, karras, rescale, eta):
    common = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=np.asarray(schedule.betas, np.float64),
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        # Rescaling an already zero-terminal schedule is the identity; the flag also makes
        # diffusers' sigma solvers use 2**-24 for the last alphas_cumprod, as ours do.
        rescale_betas_zero_snr=rescale,
    )
    if name == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    if name == "ddpm":
        return diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras, **common)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(use_karras_sigmas=karras, **common)
    if name == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    common.pop("rescale_betas_zero_snr")
    return diffusers.HeunDiscreteScheduler(use_karras_sigmas=karras, **common)


CASES = [
    # (solver, prediction, spacing, karras, zero-terminal-SNR, eta)
    ("ddim", "epsilon", "leading", False, False, 0.0),
    ("ddim", "v_prediction", "trailing", False, False, 0.0),
    ("ddim", "v_prediction", "trailing", False, True, 0.5),
    ("ddim", "epsilon", "linspace", False, False, 1.0),
    ("ddpm", "epsilon", "leading", False, False, 0.0),
    ("ddpm", "v_prediction", "trailing", False, True, 0.0),
    ("ddpm", "v_prediction", "linspace", False, False, 0.0),
    ("dpmpp_2m", "epsilon", "leading", False, False, 0.0),
    ("dpmpp_2m", "v_prediction", "trailing", False, False, 0.0),
    ("dpmpp_2m", "v_prediction", "linspace", False, True, 0.0),
    ("dpmpp_2m", "epsilon", "leading", True, False, 0.0),
    ("dpmpp_2m", "v_prediction", "trailing", True, False, 0.0),
    ("euler", "epsilon", "leading", False, False, 0.0),
    ("euler", "v_prediction", "trailing", False, True, 0.0),
    ("euler", "v_prediction", "linspace", False, False, 0.0),
    ("euler", "epsilon", "trailing", True, False, 0.0),
    ("euler_ancestral", "epsilon", "leading", False, False, 0.0),
    ("euler_ancestral", "v_prediction", "trailing", False, True, 0.0),
    ("heun", "epsilon", "linspace", False, False, 0.0),
    ("heun", "v_prediction", "trailing", False, False, 0.0),
    ("heun", "epsilon", "leading", True, False, 0.0),
]


def test_every_registered_solver_is_covered():
    assert {case[0] for case in CASES} == set(SOLVER_NAMES)


@pytest.fixture
def fixed_noise(monkeypatch):
    """Makes diffusers' stochastic schedulers draw the noise we hand them."""
    from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

    supplied = {}
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: supplied["noise"])
    return supplied


@pytest.mark.parametrize("name, prediction_type, spacing, karras, rescale, eta", CASES)
def test_whole_loop_matches_diffusers(fixed_noise, name, prediction_type, spacing, karras,
                                      rescale, eta):
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012,
                             rescale_zero_terminal_snr=rescale)
    solver = make_solver(name, schedule, prediction_type, STEPS, timestep_spacing=spacing,
                         karras_sigmas=karras, eta=eta)
    reference = _reference(name, schedule, prediction_type, spacing, karras, rescale, eta)
    reference.set_timesteps(STEPS)
    rng = np.random.default_rng(0)
    step_noise = rng.standard_normal((STEPS, *SHAPE)).astype(np.float32)

    # Ours, one step at a time, recording each model call's timestep and each state.
    ours_calls, ours_states = [], []

    def model_fn(x, t):
        try:
            ours_calls.append(float(t))
        except (TypeError, jax.errors.ConcretizationTypeError):
            pass  # Heun's corrector runs inside lax.cond, traced
        return 0.8 * jnp.tanh(x) + 0.1 * jnp.cos(t / 300.0 + x)

    x, history = solver.init(jnp.asarray(rng.standard_normal(SHAPE), jnp.float32))
    start = np.asarray(x)
    for i in range(STEPS):
        x, history = solver.step(model_fn, x, i, history, lambda i=i: jnp.asarray(step_noise[i]))
        ours_states.append(np.asarray(x))

    # diffusers, from the same start state.
    sample = torch.from_numpy(start.copy())
    ref_calls, ref_states = [], []
    for position, t in enumerate(reference.timesteps):
        model_input = reference.scale_model_input(sample, t)
        output = torch.from_numpy(
            _model_numpy(model_input.numpy().astype(np.float64), float(t)).astype(np.float32))
        ref_calls.append(float(t))
        index = len(ref_states)
        noise = torch.from_numpy(step_noise[min(index, STEPS - 1)])
        fixed_noise["noise"] = noise
        kwargs = {"eta": eta, "variance_noise": noise} if name == "ddim" else {}
        sample = reference.step(output, t, sample, **kwargs).prev_sample
        # A Heun step is complete after its corrector, or after the last (Euler) predictor.
        last = position == len(reference.timesteps) - 1
        if name != "heun" or reference.state_in_first_order or last:
            ref_states.append(sample.numpy())

    if name == "heun":
        # diffusers lists Heun's corrector evaluations as separate timesteps: t0, t1, t1, t2, ...
        ref_calls = [ref_calls[0], *ref_calls[1::2]]
    np.testing.assert_allclose(ours_calls, ref_calls, atol=1e-3)
    np.testing.assert_allclose(solver.timesteps, ref_calls, atol=1e-3)
    assert len(ref_states) == STEPS
    for index, (ours, ref) in enumerate(zip(ours_states, ref_states, strict=True)):
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4 * scale,
                                   err_msg=f"{name}: state after step {index}")


def test_ddim_trailing_grid_steps_back_by_the_stride_like_diffusers():
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    solver = make_solver("ddim", schedule, "v_prediction", 15, timestep_spacing="trailing")
    # The model is evaluated on the trailing grid; each update lands T // N = 66 below it.
    assert solver.timesteps[:3].tolist() == [999, 932, 866]


# --- Gaussian data, exact denoiser ------------------------------------------------------------

DATA_MEAN, DATA_STD = 0.4, 0.5


def _exact_model_fn(schedule, prediction_type):
    """The ideal network for x0 ~ N(DATA_MEAN, DATA_STD^2): E[x0 | x_t] in closed form, at any
    (fractional) timestep, noise level read from the schedule by log-sigma interpolation."""
    alphas_cumprod = np.maximum(np.asarray(schedule.alphas_cumprod, np.float64), 2.0**-24)
    log_sigmas = jnp.asarray(np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod)), jnp.float32)
    positions = jnp.arange(len(alphas_cumprod), dtype=jnp.float32)

    def model_fn(x, t):
        sigma = jnp.exp(jnp.interp(t, positions, log_sigmas))
        alpha = 1.0 / jnp.sqrt(1.0 + sigma**2)
        noise_scale = sigma * alpha
        gain = alpha * DATA_STD**2 / (alpha**2 * DATA_STD**2 + noise_scale**2)
        x0 = DATA_MEAN + gain * (x - alpha * DATA_MEAN)
        eps = (x - alpha * x0) / noise_scale
        if prediction_type == "epsilon":
            return eps
        return alpha * eps - noise_scale * x0

    return model_fn


@pytest.mark.parametrize(
    "name, steps, prediction_type, karras, eta",
    [
        ("ddpm", 1000, "v_prediction", False, 0.0),
        ("ddim", 1000, "v_prediction", False, 0.0),
        ("ddim", 1000, "epsilon", False, 1.0),
        ("dpmpp_2m", 100, "v_prediction", False, 0.0),
        ("dpmpp_2m", 100, "v_prediction", True, 0.0),
        ("euler", 500, "v_prediction", False, 0.0),
        ("euler_ancestral", 1000, "v_prediction", False, 0.0),
        ("heun", 100, "v_prediction", False, 0.0),
        ("heun", 100, "epsilon", True, 0.0),
    ],
)
def test_sampling_a_gaussian_recovers_its_mean_and_variance(name, steps, prediction_type,
                                                            karras, eta):
    # Zero terminal SNR makes pure noise the exact start distribution; with epsilon prediction
    # (undefined at SNR 0) the cosine schedule, whose terminal SNR is ~1e-9, stands in.
    if prediction_type == "epsilon":
        schedule = make_schedule("cosine", 1000)
    else:
        schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012,
                                 rescale_zero_terminal_snr=True)
    solver = make_solver(name, schedule, prediction_type, steps, timestep_spacing="trailing",
                         karras_sigmas=karras, eta=eta)
    model_fn = _exact_model_fn(schedule, prediction_type)
    count = 20_000
    key = jax.random.PRNGKey(0)

    @jax.jit
    def sample(key):
        noise_fn = lambda i: jax.random.normal(jax.random.fold_in(key, i + 1), (count, 1))  # noqa: E731
        return run_solver(solver, model_fn, jax.random.normal(key, (count, 1)), noise_fn)

    samples = np.asarray(sample(key), np.float64)
    # The estimates' own sampling error is ~0.004 (mean) and ~0.0025 (std) at this count; the
    # rest of the bound is discretization error, which at 10-20 steps is 5-10% of the std here
    # (measured; it shrinks with the step count, as these larger counts show).
    assert abs(samples.mean() - DATA_MEAN) < 0.012, samples.mean()
    assert abs(samples.std() - DATA_STD) < 0.015, samples.std()


def test_karras_grid_round_trips_through_timesteps():
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    sigmas = np.sqrt((1 - np.asarray(schedule.alphas_cumprod, np.float64))
                     / np.asarray(schedule.alphas_cumprod, np.float64))
    t = sigma_to_timestep(sigmas[[0, 10, 500, 999]], sigmas)
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="lms"), "unknown solver 'lms'"),
    (dict(num_steps=0), "steps must be in"),
    (dict(name="ddim", karras_sigmas=True), "karras_sigmas applies to"),
    (dict(eta=-1.0), "eta must be >= 0"),
])
def test_bad_solver_arguments(kwargs, message):
    schedule = make_schedule("cosine", 1000)
    arguments = dict(name="ddim", schedule=schedule, prediction_type="epsilon", num_steps=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_solver(**arguments)
