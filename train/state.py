"""Train state (a pytree of arrays) and the optimizer built from the config."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Learning-rate shapes after the linear warmup (config.optim.decay).
LR_DECAYS = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken (skipped non-finite updates included)
    params: Any  # nnx.State of the UNet
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32[2] base key; each step folds in its step number
    # Steps whose loss or gradient was not finite: their update was dropped (params, optimizer
    # state and EMA kept). The loop stops the job after too many in a row.
    skipped_nonfinite: jax.Array  # int32 scalar, total
    nonfinite_in_a_row: jax.Array  # int32 scalar, consecutive, 0 after a finite step


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int):
    """Linear warmup from 0 to optim.learning_rate, then `optim.decay` down to
    learning_rate * end_learning_rate_factor at num_train_steps (constant: stays)."""
    peak, warmup = optim.learning_rate, optim.warmup_steps
    end = peak * optim.end_learning_rate_factor
    if optim.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(num_train_steps, warmup + 1), end_value=end)
    if optim.decay == "constant":
        # optax's warmup_constant_schedule(0, peak, 0) stays at 0 forever (a zero-length
        # linear warmup holds its initial value); no warmup means the peak from step 0.
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.warmup_constant_schedule(0.0, peak, warmup)
    if optim.decay == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)),
             optax.linear_schedule(peak, end, max(num_train_steps - warmup, 1))],
            [warmup])
    raise ValueError(f"config.optim.decay={optim.decay!r} is not one of {LR_DECAYS}")


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


def init_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      ema_params=params, rng=rng, skipped_nonfinite=zero,
                      nonfinite_in_a_row=zero)


def ema_decay_at(step, max_decay: float):
    """EMA decay warmed up from 0 so early checkpoints are not dominated by the random init."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
