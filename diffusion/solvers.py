"""Inference timestep grids and one-step solver updates x_t -> x_{t_prev}.

Conventions:
- Timesteps index the training schedule (0 .. num_train_timesteps-1) and are visited in
  descending order. `t_prev < 0` marks the step after the last one, where alphas_cumprod is
  taken as 1 (diffusers' `set_alpha_to_one=True`): the update lands on the clean sample.
- The step functions take t and t_prev explicitly, as Python ints, traced int32 scalars (e.g. a
  timestep array indexed by a `lax.fori_loop` counter) or [B] vectors. The grid itself is static
  and built here in numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion.names import TIMESTEP_SPACINGS
from diffusion.parameterization import check_prediction_type, predict_x0_and_eps
from diffusion.schedules import NoiseSchedule, alphas_cumprod_at


def sampling_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str = "leading",
    *,
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending int32 timesteps, as diffusers' DDIM/DDPM `set_timesteps` lays them out.

    "leading" (the diffusers default; Stable Diffusion v1/v2 configs use steps_offset=1) never
    visits the last training timestep, "trailing" starts at it (Lin et al. 2023, Table 2, the
    right choice with zero-terminal-SNR schedules), "linspace" spans both ends.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep spacing {spacing!r} is not supported; allowed: {TIMESTEP_SPACINGS}"
        )
    for name, value in (
        ("num_train_timesteps", num_train_timesteps),
        ("num_inference_steps", num_inference_steps),
        ("steps_offset", steps_offset),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
            f"got {num_inference_steps}"
        )

    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = np.arange(num_inference_steps)[::-1] * step_ratio + steps_offset
        if steps_offset and timesteps[0] >= num_train_timesteps:
            raise ValueError(
                f"steps_offset={steps_offset} pushes the first timestep to {timesteps[0]}, past "
                f"the last training timestep {num_train_timesteps - 1}"
            )
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        # Same float arithmetic as diffusers so rounding ties land identically. For some step
        # counts (e.g. 61 of 1000) float error makes np.arange yield one extra value that
        # rounds to timestep -1; diffusers keeps it, we drop it.
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
        timesteps = timesteps[:num_inference_steps]
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    return np.ascontiguousarray(timesteps, dtype=np.int32)


def previous_timesteps(timesteps: np.ndarray, *, stride: int | None = None) -> np.ndarray:
    """The t_prev paired with each entry of a descending timestep grid; the last one is -1.

    By default t_prev is the next entry of the grid, as diffusers' DDPMScheduler does. With
    `stride`, t_prev = t - stride (below 0 becomes -1): diffusers' DDIMScheduler uses
    stride = num_train_timesteps // num_inference_steps for every spacing, which for "leading"
    is the same thing and for "trailing" / "linspace" can land beside the next grid entry.
    """
    timesteps = np.asarray(timesteps, dtype=np.int32)
    if stride is None:
        return np.append(timesteps[1:], np.int32(-1)).astype(np.int32)
    return np.maximum(timesteps - stride, -1).astype(np.int32)


def _is_concrete_zero(value) -> bool:
    try:
        return float(value) == 0.0
    except TypeError:  # a tracer: its value is unknown while tracing
        return False


def _predict_in_float32(prediction_type, schedule, model_output, x_t, t):
    # A bfloat16 model output must not drag the update into bfloat16: the step subtracts
    # nearly equal terms, and its error accumulates over the whole trajectory.
    return predict_x0_and_eps(
        prediction_type,
        schedule,
        jnp.asarray(model_output, jnp.float32),
        jnp.asarray(x_t, jnp.float32),
        t,
    )


def _clip(x0, clip_sample: bool, clip_range: float):
    return jnp.clip(x0, -clip_range, clip_range) if clip_sample else x0


def ddim_step(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output,
    x_t,
    t,
    t_prev,
    *,
    eta: float = 0.0,
    noise=None,
    clip_sample: bool = False,
    clip_range: float = 1.0,
):
    """One DDIM update (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step.

    eta = 0 is deterministic; eta = 1 matches the DDPM posterior variance. `noise` is the
    standard-normal variance noise and is required whenever eta may be non-zero. With clipping
    the direction term still uses the unclipped eps (diffusers' use_clipped_model_output=False).
    """
    check_prediction_type(prediction_type)
    if noise is None and not _is_concrete_zero(eta):
        raise ValueError("ddim_step needs `noise` when eta is non-zero (or traced)")

    out_dtype = x_t.dtype
    ndim = x_t.ndim
    alpha_cumprod_t = alphas_cumprod_at(schedule, t, ndim)
    alpha_cumprod_prev = alphas_cumprod_at(schedule, t_prev, ndim)

    x0, eps = _predict_in_float32(prediction_type, schedule, model_output, x_t, t)
    x0 = _clip(x0, clip_sample, clip_range)

    # sigma_t^2 of the DDIM paper; it is 0 at t_prev < 0 because 1 - alpha_cumprod_prev is 0.
    variance = (
        (1.0 - alpha_cumprod_prev)
        / (1.0 - alpha_cumprod_t)
        * (1.0 - alpha_cumprod_t / alpha_cumprod_prev)
    )
    std_dev = eta * jnp.sqrt(variance)
    # Analytically >= 0 for eta <= 1; the clamp only stops float rounding from yielding NaN.
    direction_scale = jnp.sqrt(jnp.maximum(1.0 - alpha_cumprod_prev - std_dev**2, 0.0))
    x_prev = jnp.sqrt(alpha_cumprod_prev) * x0 + direction_scale * eps
    if noise is not None:
        x_prev = x_prev + std_dev * noise
    return x_prev.astype(out_dtype)


def ddpm_step(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output,
    x_t,
    t,
    t_prev,
    *,
    noise,
    clip_sample: bool = False,
    clip_range: float = 1.0,
):
    """One ancestral step from the posterior q(x_{t_prev} | x_t, x0_hat), "fixed_small" variance.

    As diffusers' DDPMScheduler.step. The per-step beta is 1 - acp[t] / acp[t_prev], which is
    the training beta when t_prev = t - 1 and the right one for a coarser grid. No noise is added
    on the final step (t_prev < 0 or t == 0). `noise` is standard normal, shaped like x_t;
    passing None explicitly returns the posterior mean.
    """
    check_prediction_type(prediction_type)
    out_dtype = x_t.dtype
    ndim = x_t.ndim
    alpha_cumprod_t = alphas_cumprod_at(schedule, t, ndim)
    alpha_cumprod_prev = alphas_cumprod_at(schedule, t_prev, ndim)
    step_alpha = alpha_cumprod_t / alpha_cumprod_prev
    step_beta = 1.0 - step_alpha

    x0, _ = _predict_in_float32(prediction_type, schedule, model_output, x_t, t)
    x0 = _clip(x0, clip_sample, clip_range)

    # Posterior mean coefficients, Ho et al. 2020 eq. 7, with the step's own alpha and beta.
    x0_coeff = jnp.sqrt(alpha_cumprod_prev) * step_beta / (1.0 - alpha_cumprod_t)
    x_t_coeff = jnp.sqrt(step_alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod_t)
    mean = x0_coeff * x0 + x_t_coeff * x_t

    variance = (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod_t) * step_beta
    t = jnp.asarray(t, dtype=jnp.int32)
    t_prev = jnp.asarray(t_prev, dtype=jnp.int32)
    adds_noise = jnp.logical_and(t > 0, t_prev >= 0)
    if adds_noise.ndim == 1:
        adds_noise = adds_noise.reshape(adds_noise.shape + (1,) * (ndim - 1))
    if noise is None:
        return mean.astype(out_dtype)
    std_dev = jnp.where(adds_noise, jnp.sqrt(jnp.maximum(variance, 0.0)), 0.0)
    return (mean + std_dev * noise).astype(out_dtype)
