"""Which training timesteps a batch draws.

"uniform" draws every timestep equally often. "logit_normal" (as in Esser et al. 2024) draws
u = sigmoid(mean + std * n) and t = floor(u * T): the mass sits in the middle of the schedule,
and a positive mean shifts it towards high noise, where the prompt alone must set the layout.
On the demo it did not speed up learning (README, Demo results), so the demo keeps "uniform".
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
