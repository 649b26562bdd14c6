"""The denoising loss: MSE against the parameterization's target, optionally SNR-weighted."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.parameterization import check_prediction_type, snr, training_target

LOSS_WEIGHTINGS = ("none", "min_snr")


def min_snr_weight(prediction_type: str, snr_values, gamma: float):
    """Per-example weight that turns the plain MSE in the target's space into Min-SNR-gamma.

    Hang et al. 2023 weight the x0-space error by min(SNR, gamma). The eps error is sqrt(SNR)
    times the x0 error and the v error is sqrt(SNR + 1) times it, so the same objective in those
    spaces divides the weight by SNR or by SNR + 1 respectively.
    """
    check_prediction_type(prediction_type)
    clipped = jnp.minimum(snr_values, gamma)
    if prediction_type == "epsilon":
        # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (a zero-terminal-SNR schedule's last timestep);
        # the safe denominator keeps that entry finite instead of 0 / 0.
        safe_snr = jnp.where(snr_values > 0, snr_values, 1.0)
        return jnp.where(snr_values > 0, clipped / safe_snr, 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped


def offset_noise(rng, noise, offset: float):
    """Training noise plus `offset` x N(0, 1) per example and channel (channels last).

    The noise offset of Guttenberg 2023 (diffusers' `--noise_offset`): plain Gaussian noise
    leaves each image's mean almost untouched at every timestep, so a model never learns to
    move the overall brightness; a shared per-channel shift teaches it.
    """
    shape = (noise.shape[0],) + (1,) * (noise.ndim - 2) + (noise.shape[-1],)
    return noise + offset * jax.random.normal(rng, shape, noise.dtype)


def diffusion_loss(
    prediction_type: str,
    schedule,
    model_output,
    x0,
    noise,
    t,
    *,
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    mask=None,
):
    """Returns (scalar loss, per-example loss [B]).

    The per-example loss is the weighted MSE averaged over all non-batch dims, computed in
    float32 whatever the model's compute dtype. `mask` is an optional [B] array of example
    weights (padding examples get 0); it enters only the scalar, which is the mask-weighted mean
    and 0 when every weight is 0.
    """
    check_prediction_type(prediction_type)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"diffusion.loss_weighting={weighting!r} is not supported; allowed: {LOSS_WEIGHTINGS}"
        )
    if isinstance(min_snr_gamma, int | float) and min_snr_gamma <= 0:
        raise ValueError(f"diffusion.min_snr_gamma must be > 0, got {min_snr_gamma}")

    target = training_target(prediction_type, schedule, x0, noise, t)
    squared_error = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(squared_error, axis=tuple(range(1, squared_error.ndim)))

    if weighting == "min_snr":
        weight = min_snr_weight(prediction_type, snr(schedule, t), min_snr_gamma)
        per_example = per_example * weight

    if mask is None:
        return jnp.mean(per_example), per_example

    mask = jnp.asarray(mask, dtype=jnp.float32)
    total_weight = jnp.sum(mask)
    weighted_sum = jnp.sum(per_example * mask)
    safe_total = jnp.where(total_weight > 0, total_weight, 1.0)
    loss = jnp.where(total_weight > 0, weighted_sum / safe_total, 0.0)
    return loss, per_example
