"""The solver loop, checked two ways: whole trajectories against diffusers' PyTorch schedulers
(same model function, same timesteps, same states), and sampling a Gaussian data distribution
with its exact denoiser (the sample mean and variance come back)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.sampling import (
    HEUN_MAX_SIGMA_RATIO,
    SOLVER_NAMES,
    dpm_grid,
    image_grid,
    make_solver,
    nearest_upsample,
    run_solver,
    sigma_grid,
    sigma_to_timestep,
    train_sigmas,
)
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
    # (solver, prediction, spacing, karras, zero-terminal-SNR, eta, steps)
    ("ddim", "epsilon", "leading", False, False, 0.0, STEPS),
    ("ddim", "v_prediction", "trailing", False, False, 0.0, STEPS),
    ("ddim", "v_prediction", "trailing", False, True, 0.5, STEPS),
    ("ddim", "epsilon", "linspace", False, False, 1.0, STEPS),
    ("ddpm", "epsilon", "leading", False, False, 0.0, STEPS),
    ("ddpm", "v_prediction", "trailing", False, True, 0.0, STEPS),
    ("ddpm", "v_prediction", "linspace", False, False, 0.0, STEPS),
    ("dpmpp_2m", "epsilon", "leading", False, False, 0.0, STEPS),
    ("dpmpp_2m", "v_prediction", "trailing", False, False, 0.0, STEPS),
    ("dpmpp_2m", "v_prediction", "linspace", False, True, 0.0, STEPS),
    ("dpmpp_2m", "epsilon", "leading", True, False, 0.0, STEPS),
    ("dpmpp_2m", "v_prediction", "trailing", True, False, 0.0, STEPS),
    ("euler", "epsilon", "leading", False, False, 0.0, STEPS),
    ("euler", "v_prediction", "trailing", False, True, 0.0, STEPS),
    ("euler", "v_prediction", "linspace", False, False, 0.0, STEPS),
    ("euler", "epsilon", "trailing", True, False, 0.0, STEPS),
    ("euler_ancestral", "epsilon", "leading", False, False, 0.0, STEPS),
    ("euler_ancestral", "v_prediction", "trailing", False, True, 0.0, STEPS),
    # Heun: grids whose every step shrinks sigma by at most HEUN_MAX_SIGMA_RATIO, where the
    # corrector is the EDM / diffusers one (beyond it ours differs on purpose; the Gaussian
    # tests below and test_heun_large_step_is_exact_for_a_denoiser_linear_in_log_sigma cover it).
    ("heun", "v_prediction", "trailing", False, False, 0.0, 10),
    ("heun", "epsilon", "trailing", True, False, 0.0, STEPS),
    ("heun", "epsilon", "linspace", True, False, 0.0, 16),
    ("heun", "v_prediction", "leading", True, False, 0.0, 16),
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


@pytest.mark.parametrize("name, prediction_type, spacing, karras, rescale, eta, steps", CASES)
def test_whole_loop_matches_diffusers(fixed_noise, name, prediction_type, spacing, karras,
                                      rescale, eta, steps):
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012,
                             rescale_zero_terminal_snr=rescale)
    solver = make_solver(name, schedule, prediction_type, steps, timestep_spacing=spacing,
                         karras_sigmas=karras, eta=eta)
    if name == "heun":
        _, sigmas = sigma_grid(schedule, steps, spacing, karras=karras)
        assert np.max(sigmas[:-2] / sigmas[1:-1]) <= HEUN_MAX_SIGMA_RATIO, "not an EDM-form grid"
    reference = _reference(name, schedule, prediction_type, spacing, karras, rescale, eta)
    reference.set_timesteps(steps)
    rng = np.random.default_rng(0)
    step_noise = rng.standard_normal((steps, *SHAPE)).astype(np.float32)

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
    for i in range(steps):
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
        noise = torch.from_numpy(step_noise[min(index, steps - 1)])
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
    assert len(ref_states) == steps
    for index, (ours, ref) in enumerate(zip(ours_states, ref_states, strict=True)):
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4 * scale,
                                   err_msg=f"{name}: state after step {index}")


@pytest.mark.parametrize("rescale", [False, True])
def test_sigma_grids_match_diffusers_on_the_cosine_schedule(rescale):
    # The cosine schedule's last alphas_cumprod is 2.4e-9 (sigma 20291): kept as is, as
    # diffusers keeps it; only a zero-terminal-SNR schedule's 0 becomes 2**-24 (sigma 4096).
    schedule = make_schedule("cosine", 1000, rescale_zero_terminal_snr=rescale)
    common = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                  rescale_betas_zero_snr=rescale)
    # diffusers rescales in float32: its smallest sigmas differ from ours by up to 0.3%.
    rtol = 5e-3 if rescale else 1e-4
    for karras in (False, True):
        reference = diffusers.EulerDiscreteScheduler(use_karras_sigmas=karras, **common)
        reference.set_timesteps(20)
        _, sigmas = sigma_grid(schedule, 20, "trailing", karras=karras)
        np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=rtol)
    assert (sigmas[0] > 20000) != rescale
    reference = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **common)
    reference.set_timesteps(20)
    _, sigmas = dpm_grid(schedule, 20, "trailing", karras=True)
    np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=rtol)


def test_ddim_trailing_grid_steps_back_by_the_stride_like_diffusers():
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    solver = make_solver("ddim", schedule, "v_prediction", 15, timestep_spacing="trailing")
    # The model is evaluated on the trailing grid; each update lands T // N = 66 below it.
    assert solver.timesteps[:3].tolist() == [999, 932, 866]


def test_heun_large_step_is_exact_for_a_denoiser_linear_in_log_sigma():
    """The cosine schedule's "trailing" grid starts with sigma 20291 -> 12.8 (20 steps). There
    Heun's corrector interpolates the denoised prediction D linearly in log sigma, so for a D
    that is exactly such a line the step lands on the ODE's exact solution
    x1 = (s1 / s0) x0 + s1 * integral of D(sigma) / sigma^2 over [s1, s0]. EDM's slope average
    would instead add (s0 / s1 - 1) / 2 ~ 800 times D1 - D0 (here 1.5) to the Euler step."""
    schedule = make_schedule("cosine", 1000)
    solver = make_solver("heun", schedule, "sample", 20, timestep_spacing="trailing")
    table = np.log(train_sigmas(schedule))
    _, sigmas = sigma_grid(schedule, 20, "trailing", karras=False)
    sigma0, sigma1 = sigmas[0], sigmas[1]
    assert sigma0 / sigma1 > 1000
    offset, slope = 0.3, -0.2

    def model_fn(x, t):  # the "sample" parameterization: the output is D itself
        log_sigma = jnp.interp(t, jnp.arange(len(table), dtype=jnp.float32),
                               jnp.asarray(table, jnp.float32))
        return jnp.full_like(x, offset + slope * log_sigma)

    x_start, _ = solver.init(jnp.asarray(np.linspace(-2.0, 2.0, 5), jnp.float32))
    x_next, _ = jax.jit(lambda x: solver.step(model_fn, x, 0, (), None))(x_start)

    def antiderivative(sigma):  # of D(sigma) / sigma^2 in sigma, times -sigma
        return offset + slope * np.log(sigma) + slope

    expected = (sigma1 / sigma0) * np.asarray(x_start, np.float64) + (
        antiderivative(sigma1) - sigma1 / sigma0 * antiderivative(sigma0))
    # The state is ~4e4 at sigma0, so float32 leaves ~2e-3 of absolute error in x1 (as in
    # diffusers); a corrector of another form misses by 0.5 (data form linear in 1 / sigma)
    # or ~1000 (EDM).
    np.testing.assert_allclose(x_next, expected, atol=5e-3)


# --- Gaussian data, exact denoiser ------------------------------------------------------------

DATA_MEAN, DATA_STD = 0.4, 0.5


def _exact_model_fn(schedule, prediction_type):
    """The ideal network for x0 ~ N(DATA_MEAN, DATA_STD^2): E[x0 | x_t] in closed form, at any
    (fractional) timestep, noise level read from the schedule by log-sigma interpolation."""
    log_sigmas = jnp.asarray(np.log(train_sigmas(schedule)), jnp.float32)
    positions = jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32)

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


def _sample_gaussian(solver, schedule, prediction_type, count=20_000):
    model_fn = _exact_model_fn(schedule, prediction_type)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def sample(key):
        noise_fn = lambda i: jax.random.normal(jax.random.fold_in(key, i + 1), (count, 1))  # noqa: E731
        return run_solver(solver, model_fn, jax.random.normal(key, (count, 1)), noise_fn)

    return np.asarray(sample(key), np.float64)


# The estimates' own sampling error at 20,000 samples is ~0.0035 (mean) and ~0.0025 (std).
MEAN_TOLERANCE = 0.012


@pytest.mark.parametrize(
    "name, steps, prediction_type, eta, std_tolerance",
    [
        # Tolerances are ~1.4x the measured discretization error of the std plus the sampling
        # error: first-order solvers miss by ~0.7 / steps here (DDIM, Euler: 0.070 at 10
        # steps, 0.035 at 20), stochastic ones by ~1.3 / steps, DDPM by 0.016 at 100;
        # second-order ones by <= 0.002 at 20 steps (Heun in EDM's form alone: +0.60).
        ("ddpm", 100, "v_prediction", 0.0, 0.025),
        ("ddim", 20, "v_prediction", 0.0, 0.05),
        ("ddim", 20, "epsilon", 0.0, 0.05),
        ("ddim", 20, "v_prediction", 1.0, 0.09),
        ("dpmpp_2m", 20, "v_prediction", 0.0, 0.01),
        ("euler", 20, "v_prediction", 0.0, 0.05),
        ("euler_ancestral", 20, "v_prediction", 0.0, 0.09),
        ("heun", 20, "v_prediction", 0.0, 0.01),
        ("heun", 20, "epsilon", 0.0, 0.01),
    ],
)
def test_gaussian_on_the_demo_schedule(name, steps, prediction_type, eta, std_tolerance):
    """The demo model's setting: cosine schedule (terminal SNR ~2e-9, sigma 20291 at the last
    timestep), "trailing" spacing, so every solver starts with a step from sigma ~2e4."""
    schedule = make_schedule("cosine", 1000)
    solver = make_solver(name, schedule, prediction_type, steps, timestep_spacing="trailing",
                         eta=eta)
    samples = _sample_gaussian(solver, schedule, prediction_type)
    assert abs(samples.mean() - DATA_MEAN) < MEAN_TOLERANCE, samples.mean()
    assert abs(samples.std() - DATA_STD) < std_tolerance, samples.std()


@pytest.mark.parametrize(
    "name, steps, prediction_type, karras, eta",
    [
        ("ddpm", 1000, "v_prediction", False, 0.0),
        ("ddim", 1000, "epsilon", False, 1.0),
        ("dpmpp_2m", 100, "v_prediction", True, 0.0),
        ("euler", 500, "v_prediction", False, 0.0),
        ("euler_ancestral", 1000, "v_prediction", False, 0.0),
        ("heun", 100, "v_prediction", False, 0.0),
        ("heun", 100, "epsilon", True, 0.0),
    ],
)
def test_gaussian_converges_at_many_steps(name, steps, prediction_type, karras, eta):
    # Zero terminal SNR makes pure noise the exact start distribution; with epsilon prediction
    # (undefined at SNR 0) the cosine schedule, whose terminal SNR is ~2e-9, stands in. Karras
    # grids converge slowly on these schedules (their sigma_max is 4096 or 20291), hence here.
    if prediction_type == "epsilon":
        schedule = make_schedule("cosine", 1000)
    else:
        schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012,
                                 rescale_zero_terminal_snr=True)
    solver = make_solver(name, schedule, prediction_type, steps, timestep_spacing="trailing",
                         karras_sigmas=karras, eta=eta)
    samples = _sample_gaussian(solver, schedule, prediction_type)
    assert abs(samples.mean() - DATA_MEAN) < MEAN_TOLERANCE, samples.mean()
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


def test_nearest_upsample_makes_blocks_and_grid_tiles_with_gaps():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    up = nearest_upsample(images, 2)
    assert up.shape == (2, 6, 8, 3)
    for r in range(3):
        for c in range(4):
            block = up[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
            np.testing.assert_array_equal(block, np.broadcast_to(images[:, r:r + 1, c:c + 1],
                                                                 block.shape))
    # One image without the batch axis (a picture) is upsampled the same way.
    np.testing.assert_array_equal(nearest_upsample(images[1], 2), up[1])
    grid = image_grid(up, columns=2)
    assert grid.shape == (1 + 6 + 1, 1 + 8 + 1 + 8 + 1, 3)
    np.testing.assert_array_equal(grid[1:7, 10:18], up[1])
    assert (grid[0] == 255).all() and (grid[:, 9] == 255).all()
