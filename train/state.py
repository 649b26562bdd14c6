"""Train state (a pytree of arrays) and the optimizer built from the config."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any  # nnx.State of the UNet
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32[2] base key; each step folds in its step number


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int):
    warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    if optim.decay == "constant":
        after = optax.constant_schedule(optim.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            optim.learning_rate,
            max(num_train_steps - optim.warmup_steps, 1),
            alpha=optim.end_learning_rate_factor,
        )
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def _decay_mask(params):
    # Biases and norm scales are not decayed: shrinking them towards zero only hurts.
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_train_steps: int):
    lr = learning_rate_schedule(optim, num_train_steps)
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(
        optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=_decay_mask)
    )
    return optax.chain(*parts), lr


def ema_decay_at(step, max_decay: float):
    """EMA decay warmed up from 0 so early checkpoints are not dominated by the random init."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
