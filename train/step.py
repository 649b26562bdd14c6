"""The train step: a pure function over arrays, jitted once with explicit shardings."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from diffusion.loss import diffusion_loss
from diffusion.parameterization import add_noise
from diffusion.timestep_sampling import sample_timesteps
from train.state import TrainState, ema_decay_at, ema_update


def images_to_model_space(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def make_train_step(
    *,
    unet_graphdef,
    encode_text,
    schedule,
    optimizer: optax.GradientTransformation,
    learning_rate_fn,
    config: ml_collections.ConfigDict,
    empty_input_ids: jax.Array,
):
    """Returns train_step(state, text_params, batch) -> (state, metrics).

    `encode_text(text_params, input_ids) -> {"hidden", "pooled"}` runs the frozen encoder; its
    parameters are an input, not part of the state: they get no gradient and never reach the
    optimizer.
    """
    diffusion = config.diffusion
    dropout_prob = config.train.caption_dropout_prob
    ema_max_decay = config.optim.ema_decay
    num_train_timesteps = diffusion.num_train_timesteps

    def train_step(state: TrainState, text_params, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_drop, rng_t, rng_noise = jax.random.split(rng, 3)
        images = images_to_model_space(batch["images"])
        input_ids = batch["input_ids"]
        batch_size = images.shape[0]

        # Classifier-free guidance: some captions become the empty prompt.
        dropped = jax.random.bernoulli(rng_drop, dropout_prob, (batch_size,))
        input_ids = jnp.where(dropped[:, None], empty_input_ids[None, :], input_ids)
        cond = encode_text(jax.lax.stop_gradient(text_params), input_ids)

        timesteps = sample_timesteps(
            rng_t, batch_size, num_train_timesteps, diffusion.get("timestep_sampling", "uniform"),
            logit_mean=diffusion.get("logit_mean", 0.0), logit_std=diffusion.get("logit_std", 1.0),
            shift=diffusion.get("timestep_shift", 1.0),
        )
        noise = jax.random.normal(rng_noise, images.shape, jnp.float32)
        noisy = add_noise(schedule, images, noise, timesteps)

        def loss_fn(params):
            unet = nnx.merge(unet_graphdef, params)
            prediction = unet(noisy, timesteps, cond["hidden"], class_labels=cond["pooled"])
            loss, _ = diffusion_loss(
                diffusion.prediction_type,
                schedule,
                prediction,
                images,
                noise,
                timesteps,
                weighting=diffusion.loss_weighting,
                min_snr_gamma=diffusion.min_snr_gamma,
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_max_decay))
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": learning_rate_fn(state.step),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        return new_state, metrics

    return train_step
