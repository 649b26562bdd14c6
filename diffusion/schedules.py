"""Discrete noise schedules, indexed by integer timestep (the diffusers convention).

A schedule is built once, in Python, from the config; the arrays are then ordinary pytree leaves
that jitted code indexes with (possibly traced) integer timesteps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")

# The cosine schedule's betas approach 1 near the end; capping them keeps x0 recoverable from
# x_t at the last timestep (same cap as diffusers' "squaredcos_cap_v2").
_COSINE_MAX_BETA = 0.999
_COSINE_OFFSET = 0.008


class NoiseSchedule(NamedTuple):
    """Per-timestep schedule arrays, float32, shape [num_train_timesteps]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray

    @property
    def num_train_timesteps(self) -> int:
        # Derived from the static shape so it stays a Python int even inside jit.
        return self.betas.shape[0]


def _cosine_alpha_bar(fraction: float) -> float:
    return math.cos((fraction + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2


def _cosine_betas(num_train_timesteps: int) -> np.ndarray:
    betas = []
    for index in range(num_train_timesteps):
        alpha_bar_now = _cosine_alpha_bar(index / num_train_timesteps)
        alpha_bar_next = _cosine_alpha_bar((index + 1) / num_train_timesteps)
        betas.append(min(1.0 - alpha_bar_next / alpha_bar_now, _COSINE_MAX_BETA))
    return np.asarray(betas, dtype=np.float64)


def _rescale_to_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    the first timestep keeps its value, the last one gets SNR exactly 0, so a model trained on it
    sees pure noise at t = T-1, which is what sampling starts from. Pair it with v_prediction:
    epsilon prediction cannot recover x0 where alphas_cumprod is 0.
    """
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def make_schedule(
    name: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    rescale_zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Builds a schedule; "cosine" ignores beta_start / beta_end.

    Computed in float64 and stored as float32, so the cumulative product over a long schedule
    does not accumulate float32 rounding.
    """
    if name not in SCHEDULES:
        raise ValueError(
            f"diffusion.schedule={name!r} is not a known noise schedule; allowed: {SCHEDULES}"
        )
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(
            f"diffusion.num_train_timesteps must be an int, got {num_train_timesteps!r}"
        )
    if num_train_timesteps < 2:
        raise ValueError(f"diffusion.num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if name != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            "diffusion.beta_start and diffusion.beta_end must satisfy "
            f"0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}"
        )

    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif name == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        betas = (
            np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        )
    else:
        betas = _cosine_betas(num_train_timesteps)

    if rescale_zero_terminal_snr:
        betas = _rescale_to_zero_terminal_snr(betas)

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, dtype=jnp.float32),
        alphas=jnp.asarray(alphas, dtype=jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
    )


def _broadcast_over_batch(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
    if values.ndim == 1:
        return values.reshape(values.shape + (1,) * (ndim - 1))
    return values


def gather(values: jnp.ndarray, t, ndim: int) -> jnp.ndarray:
    """values[t], shaped to broadcast against an array of rank `ndim` whose leading dim is B.

    `t` is a scalar (Python int or traced) or a [B] vector; a [B] result becomes [B, 1, ..., 1].
    """
    return _broadcast_over_batch(jnp.take(values, jnp.asarray(t, dtype=jnp.int32)), ndim)


def alphas_cumprod_at(schedule: NoiseSchedule, t, ndim: int) -> jnp.ndarray:
    """Like gather(schedule.alphas_cumprod, ...), but t < 0 gives 1.0: the clean end of the chain.

    That is diffusers' `set_alpha_to_one=True` convention for the step after the last one.
    """
    t = jnp.asarray(t, dtype=jnp.int32)
    # Negative indices would wrap around; clamp them, then overwrite those entries with 1.
    values = jnp.where(t >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t, 0)), 1.0)
    return _broadcast_over_batch(values, ndim)


def schedule_from_config(diffusion_config) -> NoiseSchedule:
    """The schedule a `config.diffusion` section describes (the one place that reads it, so
    training and sampling build the same schedule)."""
    return make_schedule(
        diffusion_config.schedule,
        diffusion_config.num_train_timesteps,
        diffusion_config.beta_start,
        diffusion_config.beta_end,
        rescale_zero_terminal_snr=bool(diffusion_config.get("rescale_zero_terminal_snr", False)),
    )
