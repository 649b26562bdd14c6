"""The denoising loop: one solver interface, one registry of solver names.

A `Solver` is a static grid (numpy arrays fixed before tracing), an `init` that turns standard
normal noise into the first state, and a `step` that receives the model function, advances the
state by one grid step and carries the solver's history (previous prediction, ...). `run_solver`
drives any of them with one `lax.fori_loop`, so a loop of N steps compiles the model once (twice
for Heun, whose last step is an Euler step).

The model function is `model_fn(x, t) -> output` in the training parameterization: `x` is the
variance-preserving sample the network was trained on, `t` a float32 scalar timestep (fractional
for the sigma-based solvers, as in diffusers), `output` eps / v / x0 per `prediction_type`.

The sigma-based solvers (Euler, Euler ancestral, Heun) keep their state in the variance-exploding
form x_ve = x_vp * sqrt(1 + sigma^2) (Karras et al. 2022), as diffusers' schedulers do;
DPM-Solver++ keeps the variance-preserving form. Every solver starts from noise of variance
1 + sigma_0^2 in x_ve terms (unit variance in the network's terms); diffusers' Euler/Heun with
"trailing" or "linspace" spacing start from sigma_0 instead, which differs by a factor
sqrt(1 + 1 / sigma_0^2) (< 1e-4 on the shipped schedules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.names import KARRAS_SOLVERS, SOLVER_NAMES
from diffusion.parameterization import check_prediction_type
from diffusion.schedules import NoiseSchedule
from diffusion.solvers import ddim_step, ddpm_step, previous_timesteps, sampling_timesteps

# The sigma-based solvers need a finite sigma at the last timestep; a zero-terminal-SNR
# schedule has alphas_cumprod[-1] = 0 there, which diffusers replaces by 2**-24 (sigma 4096).
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# Heun's corrector takes the EDM / diffusers form while a step shrinks sigma by at most this
# factor, and the data-prediction form beyond it (see _heun_corrector_coefficients).
HEUN_MAX_SIGMA_RATIO = 2.0
_KARRAS_RHO = 7.0


@dataclasses.dataclass(frozen=True)
class Solver:
    """A solver bound to its static grid.

    init(noise) -> (x, history); step(model_fn, x, i, history, noise_fn) -> (x, history), where
    i is the (traced) step index and noise_fn() draws standard-normal noise shaped like x for
    this step (only stochastic solvers call it).
    """

    name: str
    num_steps: int
    model_evals: int
    timesteps: np.ndarray  # float32 [num_steps]: the timestep of the first model call per step
    init: Callable
    step: Callable
    stochastic: bool


def run_solver(solver: Solver, model_fn, noise, noise_fn=None):
    """The whole loop: noise (standard normal) -> clean sample.

    noise_fn(i) gives the noise of step i (called only by stochastic solvers); None is allowed
    for deterministic ones.
    """
    if solver.stochastic and noise_fn is None:
        raise ValueError(f"solver {solver.name!r} is stochastic and needs a noise_fn")
    x, history = solver.init(noise)

    def body(i, carry):
        x, history = carry
        return solver.step(model_fn, x, i, history, lambda: noise_fn(i))

    x, _ = jax.lax.fori_loop(0, solver.num_steps, body, (x, history))
    return x


def _x0_from_output(prediction_type, output, x_vp, alpha, sigma_vp):
    output = jnp.asarray(output, jnp.float32)
    if prediction_type == "epsilon":
        return (x_vp - sigma_vp * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_vp - sigma_vp * output
    return output


def _vp_scales(sigma):
    alpha = 1.0 / jnp.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def _denoise_ve(model_fn, prediction_type, x_ve, sigma, t):
    """x0 predicted at the variance-exploding state x_ve of noise level sigma."""
    alpha, sigma_vp = _vp_scales(sigma)
    x_vp = x_ve * alpha
    return _x0_from_output(prediction_type, model_fn(x_vp, t), x_vp, alpha, sigma_vp)


def _check_steps(num_steps, num_train_timesteps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"steps must be an int, got {num_steps!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_steps}"
        )


def train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) per training timestep (float64).

    Only an alphas_cumprod of exactly 0 (a zero-terminal-SNR schedule's last timestep) is
    replaced, by 2**-24, as diffusers does under rescale_betas_zero_snr; a small positive one
    (the cosine schedule ends at 2.4e-9, sigma 20291) is kept, as diffusers keeps it.
    """
    alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64).copy()
    alphas_cumprod[alphas_cumprod == 0.0] = _ZERO_SNR_ALPHA_CUMPROD
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Karras et al. 2022 eq. 5 (rho = 7): dense near sigma_min, descending."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv, min_inv = sigma_max ** (1 / _KARRAS_RHO), sigma_min ** (1 / _KARRAS_RHO)
    return (max_inv + ramp * (min_inv - max_inv)) ** _KARRAS_RHO


def sigma_to_timestep(sigmas, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma is `sigmas`, by interpolating log sigma."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    return np.interp(log_sigma, np.log(train_sigmas), np.arange(len(train_sigmas), dtype=float))


def _float_timesteps(num_train_timesteps, num_steps, spacing, steps_offset):
    """The Euler / Heun grid: like sampling_timesteps, but "linspace" keeps fractional values."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].astype(np.float64)
    return sampling_timesteps(
        num_train_timesteps, num_steps, spacing, steps_offset=steps_offset
    ).astype(np.float64)


def sigma_grid(schedule, num_steps, spacing, *, karras, steps_offset=0):
    """(timesteps [N], sigmas [N + 1]) of Euler / Euler ancestral / Heun, as diffusers lays
    them out: sigma interpolated at the spacing's timesteps, optionally respaced with Karras'
    rule between that grid's ends, and a final sigma of 0."""
    reference_sigmas = train_sigmas(schedule)
    timesteps = _float_timesteps(len(reference_sigmas), num_steps, spacing, steps_offset)
    sigmas = np.interp(timesteps, np.arange(len(reference_sigmas)), reference_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        timesteps = sigma_to_timestep(sigmas, reference_sigmas)
    return timesteps, np.append(sigmas, 0.0)


def dpm_grid(schedule, num_steps, spacing, *, karras, steps_offset=0):
    """(timesteps [N], sigmas [N + 1]) of diffusers' DPMSolverMultistepScheduler: integer
    timesteps from N + 1 grid points with the last dropped ("leading", "linspace"), Karras
    sigmas over the whole training range, a final sigma of 0."""
    reference_sigmas = train_sigmas(schedule)
    count = len(reference_sigmas)
    if karras:
        sigmas = karras_sigmas(reference_sigmas[0], reference_sigmas[-1], num_steps)
        timesteps = np.round(sigma_to_timestep(sigmas, reference_sigmas))
        return timesteps, np.append(sigmas, 0.0)
    if spacing == "linspace":
        timesteps = np.linspace(0, count - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        step_ratio = count // (num_steps + 1)
        timesteps = (np.arange(num_steps + 1) * step_ratio)[::-1][:-1] + steps_offset
    else:
        timesteps = sampling_timesteps(count, num_steps, "trailing").astype(np.float64)
    timesteps = np.asarray(timesteps, np.float64)
    sigmas = reference_sigmas[timesteps.astype(np.int64)]
    return timesteps, np.append(sigmas, 0.0)


def _make_ddim(schedule, prediction_type, num_steps, spacing, *, eta, steps_offset, **_):
    count = schedule.num_train_timesteps
    timesteps = sampling_timesteps(count, num_steps, spacing, steps_offset=steps_offset)
    # diffusers' DDIMScheduler steps back by the fixed stride T // N whatever the spacing; for
    # "trailing" that lands one timestep beside the next grid entry (e.g. 999 -> 933, then
    # 932 is evaluated). We follow it so trajectories match diffusers'.
    prev = previous_timesteps(timesteps, stride=count // num_steps)
    t_arr, prev_arr = jnp.asarray(timesteps), jnp.asarray(prev)

    def step(model_fn, x, i, history, noise_fn):
        t, t_prev = t_arr[i], prev_arr[i]
        output = model_fn(x, t.astype(jnp.float32))
        noise = noise_fn() if eta else None
        return ddim_step(schedule, prediction_type, output, x, t, t_prev, eta=eta,
                         noise=noise), history

    return Solver("ddim", num_steps, num_steps, timesteps.astype(np.float32),
                  lambda noise: (noise, ()), step, stochastic=bool(eta))


def _make_ddpm(schedule, prediction_type, num_steps, spacing, *, steps_offset, **_):
    timesteps = sampling_timesteps(schedule.num_train_timesteps, num_steps, spacing,
                                   steps_offset=steps_offset)
    t_arr, prev_arr = jnp.asarray(timesteps), jnp.asarray(previous_timesteps(timesteps))

    def step(model_fn, x, i, history, noise_fn):
        t, t_prev = t_arr[i], prev_arr[i]
        output = model_fn(x, t.astype(jnp.float32))
        return ddpm_step(schedule, prediction_type, output, x, t, t_prev,
                         noise=noise_fn()), history

    return Solver("ddpm", num_steps, num_steps, timesteps.astype(np.float32),
                  lambda noise: (noise, ()), step, stochastic=True)


def _ve_init(sigma0):
    scale = float(np.sqrt(1.0 + sigma0 * sigma0))
    return lambda noise: (noise * scale, ())


def _make_euler(schedule, prediction_type, num_steps, spacing, *, karras, steps_offset, **_):
    timesteps, sigmas = sigma_grid(schedule, num_steps, spacing, karras=karras,
                                   steps_offset=steps_offset)
    t_arr = jnp.asarray(timesteps, jnp.float32)
    s_arr = jnp.asarray(sigmas, jnp.float32)

    def step(model_fn, x, i, history, noise_fn):
        sigma, sigma_next = s_arr[i], s_arr[i + 1]
        x0 = _denoise_ve(model_fn, prediction_type, x, sigma, t_arr[i])
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma), history

    return Solver("euler", num_steps, num_steps, timesteps.astype(np.float32),
                  _ve_init(sigmas[0]), step, stochastic=False)


def _make_euler_ancestral(schedule, prediction_type, num_steps, spacing, *, karras,
                          steps_offset, **_):
    timesteps, sigmas = sigma_grid(schedule, num_steps, spacing, karras=karras,
                                   steps_offset=steps_offset)
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    # Split the step to sigma_to into a deterministic part down to sigma_down and fresh noise
    # of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2.
    sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
    t_arr = jnp.asarray(timesteps, jnp.float32)
    s_arr, up_arr, down_arr = (jnp.asarray(a, jnp.float32) for a in (sigmas, sigma_up, sigma_down))

    def step(model_fn, x, i, history, noise_fn):
        sigma = s_arr[i]
        x0 = _denoise_ve(model_fn, prediction_type, x, sigma, t_arr[i])
        derivative = (x - x0) / sigma
        x = x + derivative * (down_arr[i] - sigma)
        return x + noise_fn() * up_arr[i], history

    return Solver("euler_ancestral", num_steps, num_steps, timesteps.astype(np.float32),
                  _ve_init(sigmas[0]), step, stochastic=True)


def _heun_corrector_coefficients(sigmas: np.ndarray, max_ratio: float) -> np.ndarray:
    """c_i of Heun's corrected step x_{i+1} = euler_i + c_i * (D_{i+1} - D_i), where euler_i is
    the predictor (an Euler step, the same as DDIM's) and D the denoised predictions at both ends.

    EDM's form averages the two slopes (x - D) / sigma, which gives c = (s0 / s1 - 1) / 2: the
    trapezoidal rule in sigma. That coefficient grows without bound with the step's sigma ratio;
    a "trailing" grid on the cosine schedule starts with sigma 20291 -> 12.8, where it multiplies
    D1 - D0 by ~800 and ruins the sample. Beyond `max_ratio` we integrate the same ODE in its
    exact variation-of-constants form, x1 = (s1/s0) x0 + s1 * integral of e^lambda D d lambda
    over lambda = -log sigma, with D linear in lambda between the two evaluations (the
    data-prediction construction of DPM-Solver++, Lu et al. 2022b): c = (h - 1 + e^-h) / h with
    h = log(s0 / s1), which stays below 1. Both are second order and agree to O(h^2) in c, so
    small steps keep EDM's form and with it step-for-step parity with diffusers' Heun (and the
    EDM form was measured no less accurate on moderate steps, see docs/notes_sampling_heun.md).
    """
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    coefficients = np.zeros_like(sigma)
    moving = sigma_next > 0  # the last step, to sigma 0, has no corrector
    ratio = sigma[moving] / sigma_next[moving]
    h = np.log(ratio)
    coefficients[moving] = np.where(
        ratio <= max_ratio, 0.5 * (ratio - 1.0), (h - 1.0 + np.exp(-h)) / h)
    return coefficients


def _make_heun(schedule, prediction_type, num_steps, spacing, *, karras, steps_offset, **_):
    timesteps, sigmas = sigma_grid(schedule, num_steps, spacing, karras=karras,
                                   steps_offset=steps_offset)
    t_arr = jnp.asarray(np.append(timesteps, 0.0), jnp.float32)
    s_arr = jnp.asarray(sigmas, jnp.float32)
    c_arr = jnp.asarray(_heun_corrector_coefficients(sigmas, HEUN_MAX_SIGMA_RATIO), jnp.float32)

    def step(model_fn, x, i, history, noise_fn):
        sigma, sigma_next = s_arr[i], s_arr[i + 1]
        x0 = _denoise_ve(model_fn, prediction_type, x, sigma, t_arr[i])
        euler = x + (x - x0) / sigma * (sigma_next - sigma)

        def corrected(_):
            x0_next = _denoise_ve(model_fn, prediction_type, euler, sigma_next, t_arr[i + 1])
            return euler + c_arr[i] * (x0_next - x0)

        # The last step ends at sigma 0, where the slope is undefined: it stays an Euler step.
        return jax.lax.cond(sigma_next > 0, corrected, lambda _: euler, None), history

    return Solver("heun", num_steps, 2 * num_steps - 1, timesteps.astype(np.float32),
                  _ve_init(sigmas[0]), step, stochastic=False)


def _make_dpmpp_2m(schedule, prediction_type, num_steps, spacing, *, karras, steps_offset,
                   **_):
    timesteps, sigmas = dpm_grid(schedule, num_steps, spacing, karras=karras,
                                 steps_offset=steps_offset)
    alphas = 1.0 / np.sqrt(1.0 + sigmas**2)
    sigmas_vp = sigmas * alphas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas_vp)  # +inf at the final sigma 0
    h = lambdas[1:] - lambdas[:-1]
    # x_{i+1} = a_i x_i + b_i D_i + c_i (D_i - D_{i-1}) (Lu et al. 2022b, DPM-Solver++(2M),
    # midpoint form as diffusers); the first and the last step are first order (c = 0), the
    # last because it ends at sigma 0 (diffusers' final_sigmas_type="zero").
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(sigmas_vp[1:] > 0, sigmas_vp[1:] / sigmas_vp[:-1], 0.0)
        b = -alphas[1:] * np.expm1(-h)
        r = np.ones_like(h)
        r[1:] = (lambdas[1:-1] - lambdas[:-2]) / h[1:]
        c = 0.5 * b / r
    c[0] = 0.0
    c[-1] = 0.0
    t_arr = jnp.asarray(timesteps, jnp.float32)
    a_arr, b_arr, c_arr = (jnp.asarray(v, jnp.float32) for v in (a, b, c))
    alpha_arr, sig_arr = jnp.asarray(alphas, jnp.float32), jnp.asarray(sigmas_vp, jnp.float32)

    def step(model_fn, x, i, previous_x0, noise_fn):
        x0 = _x0_from_output(prediction_type, model_fn(x, t_arr[i]), x, alpha_arr[i], sig_arr[i])
        x = a_arr[i] * x + b_arr[i] * x0 + c_arr[i] * (x0 - previous_x0)
        return x, x0

    return Solver("dpmpp_2m", num_steps, num_steps, timesteps.astype(np.float32),
                  lambda noise: (noise, jnp.zeros_like(noise)), step, stochastic=False)


# The registry: every name of diffusion.names.SOLVER_NAMES (the one list the config check, the
# CLI and the bench read) mapped to its builder.
SOLVERS = dict(zip(SOLVER_NAMES, (_make_ddpm, _make_ddim, _make_dpmpp_2m, _make_euler,
                                  _make_euler_ancestral, _make_heun), strict=True))


def make_solver(
    name: str,
    schedule: NoiseSchedule,
    prediction_type: str,
    num_steps: int,
    *,
    timestep_spacing: str = "trailing",
    karras_sigmas: bool = False,
    eta: float = 0.0,
    steps_offset: int = 0,
) -> Solver:
    """The named solver over `num_steps` steps of `schedule`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {SOLVER_NAMES}")
    check_prediction_type(prediction_type)
    _check_steps(num_steps, schedule.num_train_timesteps)
    if karras_sigmas and name not in KARRAS_SOLVERS:
        raise ValueError(f"karras_sigmas applies to {KARRAS_SOLVERS}, not to {name!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return SOLVERS[name](schedule, prediction_type, int(num_steps), timestep_spacing,
                         karras=karras_sigmas, eta=float(eta), steps_offset=steps_offset)


def image_keys(seeds, image_indices):
    """One PRNG key per image from (seed, image index): an image's noise depends on nothing
    else (not its batch, position or device)."""
    seeds = jnp.asarray(seeds, jnp.uint32)
    image_indices = jnp.asarray(image_indices, jnp.uint32)
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(
        seeds, image_indices)


def make_denoise_fn(apply_fn, solver: Solver, image_shape, *, guidance_rescale: float = 0.0,
                    clip: bool = True):
    """denoise(params, cond, uncond, seeds, image_indices, cfg_scales) -> images in [-1, 1]
    (`clip=False`: the solver's output as it is, e.g. latents, whose scale is not a pixel range).

    apply_fn(params, x, t [B], text) -> model output, where text is a pytree of per-example
    conditioning ({"hidden", "pooled"} for the project's UNet). cond / uncond: the prompts' and
    the negative prompts' conditioning; seeds / image_indices: [B] ints; cfg_scales: [B]
    floats. Guidance runs conditional and unconditional halves as one call, each example next
    to its own unconditional twin, so a batch split over devices never moves data between them.
    """
    from diffusion.guidance import classifier_free_guidance

    def per_image_normal(keys, index):
        return jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, index), image_shape))(keys)

    def interleave(a, b):
        return jnp.stack([a, b], axis=1).reshape((-1, *a.shape[1:]))

    def denoise(params, cond, uncond, seeds, image_indices, cfg_scales):
        keys = image_keys(seeds, image_indices)
        batch = keys.shape[0]
        scales = jnp.asarray(cfg_scales, jnp.float32).reshape((batch,) + (1,) * len(image_shape))
        text = jax.tree_util.tree_map(interleave, cond, uncond)

        def model_fn(x, t):
            t_both = jnp.full((2 * batch,), t, jnp.float32)
            both = apply_fn(params, interleave(x, x), t_both, text)
            both = both.reshape((batch, 2, *both.shape[1:]))
            return classifier_free_guidance(both[:, 0], both[:, 1], scales,
                                            guidance_rescale=guidance_rescale)

        noise = per_image_normal(keys, 0)
        images = run_solver(solver, model_fn, noise, lambda i: per_image_normal(keys, i + 1))
        return jnp.clip(images, -1.0, 1.0) if clip else images

    return denoise


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (the data scaling) to uint8 on the host."""
    images = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile [N,H,W,C] uint8 images into one image with a 1-pixel white gap."""
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 255, np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        grid[1 + r * (height + 1): 1 + r * (height + 1) + height,
             1 + c * (width + 1): 1 + c * (width + 1) + width] = image
    return grid


def nearest_upsample(images: np.ndarray, factor: int) -> np.ndarray:
    """[..., H, W, C] -> [..., H * factor, W * factor, C], each pixel a factor x factor block:
    a low-resolution input shown at its output's size, or a small picture made visible."""
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)
