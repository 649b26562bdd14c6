"""The train step: a pure function over arrays, jitted once with explicit shardings."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from diffusion.loss import diffusion_loss, offset_noise
from diffusion.low_res import LowResConditioning, training_low_res
from diffusion.parameterization import add_noise
from diffusion.timestep_sampling import sample_timesteps
from models.factory import unet_forward
from train.state import TrainState, ema_decay_at, ema_update


def images_to_model_space(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _micro_batches(tree, num_micro: int):
    """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch k holds examples k, k + n, ...

    Strided rather than contiguous so each device keeps its own slice of the sharded batch in
    every micro-batch (no cross-device shuffle)."""

    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree_util.tree_map(split, tree)


def make_train_step(
    *,
    unet_graphdef,
    encode_text,
    schedule,
    optimizer: optax.GradientTransformation,
    learning_rate_fn,
    diffusion: ml_collections.ConfigDict,
    caption_dropout_prob: float,
    ema_decay: float,
    empty_input_ids: jax.Array,
    grad_accum_steps: int = 1,
    encode_images=None,
    noise_offset: float = 0.0,
    low_res: LowResConditioning | None = None,
):
    """Returns train_step(state, text_params, batch) -> (state, metrics), or, for a latent
    model, train_step(state, text_params, batch, vae_params) -> (state, metrics), or, for LoRA
    (`unet_graphdef` of a UNet with adapters, models.lora), train_step(state, text_params,
    batch, vae_params, unet_base): the state holds the adapters, `unet_base` the frozen rest.

    `encode_text(text_params, input_ids) -> {"hidden", "pooled"}` runs the frozen encoder; its
    parameters are an input, not part of the state: they get no gradient and never reach the
    optimizer. `encode_images(vae_params, images, rng) -> latents` (latent diffusion) is the
    frozen VAE's encoder, its parameters an input in the same way; the UNet then denoises the
    latents. Trainable: the state's (UNet) parameters only.

    `low_res` (a super-resolution model, `diffusion.low_res`): each pixel image, downsampled
    and noise-augmented at a random level, is resized to the UNet input and concatenated to
    its noisy input channels; the level is the UNet's `class_labels`.

    `noise_offset` > 0 adds a per-example, per-channel shift to the training noise
    (`diffusion.loss.offset_noise`).

    With `grad_accum_steps` n > 1 the batch is split into n micro-batches whose gradients are
    summed in a `lax.scan` (activation memory of one micro-batch); the random draws (caption
    dropout, timesteps, noise) are made for the whole batch first, so the update equals the
    one-shot update of the whole batch up to float rounding.

    A non-finite loss, gradient or update drops the update: parameters, optimizer state and
    EMA stay as they were, `skipped_nonfinite` and `nonfinite_in_a_row` count it.
    """
    num_train_timesteps = diffusion.num_train_timesteps

    def loss_fn(params, unet_base, noisy, timesteps, hidden, pooled, images, noise, *low):
        # LoRA: `params` are the adapters, `unet_base` the frozen UNet weights (a step input).
        unet = nnx.merge(unet_graphdef, params) if unet_base is None else nnx.merge(
            unet_graphdef, jax.lax.stop_gradient(unet_base), params)
        cond = {"hidden": hidden, "pooled": pooled}
        if low:  # super-resolution: (low-res input channels, noise levels)
            cond["low_res"], cond["noise_level"] = low
        prediction = unet_forward(unet, noisy, timesteps, cond, super_resolution=bool(low))
        loss, _ = diffusion_loss(
            diffusion.prediction_type, schedule, prediction, images, noise, timesteps,
            weighting=diffusion.loss_weighting, min_snr_gamma=diffusion.min_snr_gamma,
        )
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, text_params, batch, vae_params=None, unet_base=None):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_drop, rng_t, rng_noise = jax.random.split(rng, 3)
        images = images_to_model_space(batch["images"])
        # Made from the pixels, before any VAE: the low-res input is an image in both cases.
        low = () if low_res is None else training_low_res(low_res, images,
                                                          jax.random.fold_in(rng, 5))
        if encode_images is not None:
            # The frozen VAE's posterior sample is the clean signal x0 the UNet learns to denoise.
            images = encode_images(jax.lax.stop_gradient(vae_params), images,
                                   jax.random.fold_in(rng, 3))
        input_ids = batch["input_ids"]
        batch_size = images.shape[0]

        # Classifier-free guidance: some captions become the empty prompt.
        dropped = jax.random.bernoulli(rng_drop, caption_dropout_prob, (batch_size,))
        input_ids = jnp.where(dropped[:, None], empty_input_ids[None, :], input_ids)
        cond = encode_text(jax.lax.stop_gradient(text_params), input_ids)

        timesteps = sample_timesteps(
            rng_t, batch_size, num_train_timesteps, diffusion.get("timestep_sampling", "uniform"),
            logit_mean=diffusion.get("logit_mean", 0.0), logit_std=diffusion.get("logit_std", 1.0),
            shift=diffusion.get("timestep_shift", 1.0),
        )
        noise = jax.random.normal(rng_noise, images.shape, jnp.float32)
        if noise_offset:
            noise = offset_noise(jax.random.fold_in(rng, 4), noise, noise_offset)
        noisy = add_noise(schedule, images, noise, timesteps)
        inputs = (noisy, timesteps, cond["hidden"], cond["pooled"], images, noise, *low)

        if grad_accum_steps == 1:
            loss, grads = grad_fn(state.params, unet_base, *inputs)
        else:
            def accumulate(carry, micro):
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(state.params, unet_base, *micro)
                return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(
                accumulate, (jnp.zeros((), jnp.float32), zeros),
                _micro_batches(inputs, grad_accum_steps))
            # Equal micro-batches: the mean of their mean losses is the batch's mean loss.
            loss = loss / grad_accum_steps
            grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = ema_update(
            state.ema_params, params, ema_decay_at(state.step, ema_decay))
        grad_norm = optax.tree.norm(grads)
        # The update's norm catches an overflow in the optimizer (a huge learning rate) as well.
        # (One norm, not an isfinite per leaf: a reduction per leaf multiplied the compile
        # time of the tiny step by seven.)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(updates)))
        keep_new = lambda new, old: jax.tree_util.tree_map(
            lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = state.skipped_nonfinite + (~finite).astype(jnp.int32)
        in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1).astype(jnp.int32)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate_fn(state.step),
            "skipped_nonfinite": skipped,
            "nonfinite_in_a_row": in_a_row,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=keep_new(params, state.params),
            opt_state=keep_new(opt_state, state.opt_state),
            ema_params=keep_new(ema_params, state.ema_params),
            skipped_nonfinite=skipped,
            nonfinite_in_a_row=in_a_row,
        )
        return new_state, metrics

    return train_step
