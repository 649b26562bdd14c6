"""Which training timesteps a batch draws.

Uniform sampling spends few examples near t = T, yet that is where the prompt alone must set
the layout (where a shape goes, what it is): the noisy input carries almost no image there, and
the sampler's first steps are exactly those timesteps. "logit_normal" (as in Esser et al. 2024)
draws u = sigmoid(mean + std * n) and t = floor(u * T); a positive mean shifts the mass
towards high noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int, method: str = "uniform",
                     *, logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """int32 [batch_size] timesteps in [0, num_train_timesteps)."""
    if method == "uniform":
        return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps)
    if method == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
        t = jnp.floor(u * num_train_timesteps).astype(jnp.int32)
        return jnp.clip(t, 0, num_train_timesteps - 1)
    raise ValueError(
        f"diffusion.timestep_sampling={method!r} is not supported; allowed: {TIMESTEP_SAMPLINGS}"
    )
