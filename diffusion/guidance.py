"""Classifier-free guidance (Ho & Salimans 2022) and its rescaling (Lin et al. 2023, Sec. 3.4)."""

from __future__ import annotations

import jax.numpy as jnp


def rescale_guidance(guided, cond_output, guidance_rescale):
    """Pulls the guided output's per-example std back towards the conditional output's.

    Large guidance scales inflate the output's magnitude, which with zero-terminal-SNR
    schedules over-exposes images; `guidance_rescale` in [0, 1] blends the std-matched output
    with the raw one (0 leaves `guided` unchanged).
    """
    reduce_axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_output.astype(jnp.float32), axis=reduce_axes, keepdims=True)
    std_guided = jnp.std(guided.astype(jnp.float32), axis=reduce_axes, keepdims=True)
    # A constant guided output has no spread to rescale; leave it as it is instead of 0 / 0.
    ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
    rescaled = guided * ratio
    blended = guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided
    return blended.astype(guided.dtype)


def classifier_free_guidance(cond_output, uncond_output, scale, *, guidance_rescale=0.0):
    """uncond + scale * (cond - uncond): scale 1 gives cond, 0 gives uncond.

    `scale` and `guidance_rescale` may be Python floats, traced scalars or [B, 1, ...] arrays.
    """
    guided = uncond_output + scale * (cond_output - uncond_output)
    if isinstance(guidance_rescale, int | float) and guidance_rescale == 0:
        return guided
    return rescale_guidance(guided, cond_output, guidance_rescale)
