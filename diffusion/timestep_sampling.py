"""Which training timesteps a batch draws.

"uniform" draws every timestep equally often. "logit_normal" (as in Esser et al. 2024) draws
u = sigmoid(mean + std * n) and t = floor(u * T): the mass sits in the middle of the schedule,
and a positive mean shifts it towards high noise, where the prompt alone must set the layout.
"shifted" maps a uniform u through the time shift s*u / (1 + (s - 1)*u) (same paper; s =
`shift` > 1 moves mass towards high noise, s = 1 is uniform). On the demo neither sped up
learning (README, Demo results), so the demo keeps "uniform".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")


def shift_fraction(u, shift: float):
    """The time shift s*u / (1 + (s - 1)*u) (Esser et al. 2024) on a fraction u in [0, 1]:
    s > 1 moves mass towards the noisy end, s = 1 is the identity."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int, method: str = "uniform",
                     *, logit_mean: float = 0.0, logit_std: float = 1.0,
                     shift: float = 1.0) -> jax.Array:
    """int32 [batch_size] timesteps in [0, num_train_timesteps)."""
    if method == "uniform":
        return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps)
    if method == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
    elif method == "shifted":
        u = shift_fraction(jax.random.uniform(rng, (batch_size,)), shift)
    else:
        raise ValueError(
            f"diffusion.timestep_sampling={method!r} is not supported; allowed: "
            f"{TIMESTEP_SAMPLINGS}"
        )
    t = jnp.floor(u * num_train_timesteps).astype(jnp.int32)
    return jnp.clip(t, 0, num_train_timesteps - 1)
