"""The forward process and the three things a network can be asked to predict.

With a = alphas_cumprod[t]:  x_t = sqrt(a) * x0 + sqrt(1 - a) * eps.
  "epsilon":      the network predicts eps
  "v_prediction": the network predicts v = sqrt(a) * eps - sqrt(1 - a) * x0  (Salimans & Ho 2022)
  "sample":       the network predicts x0

`prediction_type` is a Python string (static under jit); t is an int, a traced int scalar or a
[B] vector, broadcast over the non-batch dims.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.schedules import NoiseSchedule, gather

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(name: str) -> str:
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"diffusion.prediction_type={name!r} is not supported; allowed: {PREDICTION_TYPES}"
        )
    return name


def _signal_and_noise_scales(schedule: NoiseSchedule, t, ndim: int):
    alphas_cumprod = gather(schedule.alphas_cumprod, t, ndim)
    return jnp.sqrt(alphas_cumprod), jnp.sqrt(1.0 - alphas_cumprod)


def add_noise(schedule: NoiseSchedule, x0, noise, t):
    """Samples x_t ~ q(x_t | x0) with the given standard-normal noise."""
    dtype = jnp.result_type(x0, noise)
    signal_scale, noise_scale = _signal_and_noise_scales(schedule, t, x0.ndim)
    return (signal_scale * x0 + noise_scale * noise).astype(dtype)


def training_target(prediction_type: str, schedule: NoiseSchedule, x0, noise, t):
    """What the network should output for x_t = add_noise(schedule, x0, noise, t)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    dtype = jnp.result_type(x0, noise)
    signal_scale, noise_scale = _signal_and_noise_scales(schedule, t, x0.ndim)
    return (signal_scale * noise - noise_scale * x0).astype(dtype)


def predict_x0_and_eps(prediction_type: str, schedule: NoiseSchedule, model_output, x_t, t):
    """Inverts the parameterization: (x0, eps) implied by the model output at x_t.

    For "epsilon" the x0 estimate divides by sqrt(alphas_cumprod[t]); at a zero-terminal-SNR
    schedule's last timestep that is a division by zero, which is why such schedules are paired
    with v_prediction.
    """
    check_prediction_type(prediction_type)
    dtype = jnp.result_type(model_output, x_t)
    signal_scale, noise_scale = _signal_and_noise_scales(schedule, t, x_t.ndim)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - noise_scale * eps) / signal_scale
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - signal_scale * x0) / noise_scale
    else:
        # signal_scale**2 + noise_scale**2 == 1 turns the (x_t, v) pair into a rotation.
        x0 = signal_scale * x_t - noise_scale * model_output
        eps = signal_scale * model_output + noise_scale * x_t
    return x0.astype(dtype), eps.astype(dtype)


def snr(schedule: NoiseSchedule, t):
    """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at t, same shape as t."""
    alphas_cumprod = jnp.take(schedule.alphas_cumprod, jnp.asarray(t, dtype=jnp.int32))
    return alphas_cumprod / (1.0 - alphas_cumprod)
