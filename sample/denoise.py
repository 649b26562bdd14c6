"""The whole denoising loop as one jitted function, sharded over the batch.

Every image gets its own key, derived from (seed, image index), and all its noise comes from
that key, so an image depends on its seed, not on the batch it shares or the device count.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion.guidance import classifier_free_guidance
from diffusion.solvers import ddim_step, ddpm_step, sampling_timesteps


def image_keys(seed: int, indices) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def make_denoise_fn(
    unet_graphdef,
    schedule,
    *,
    prediction_type: str,
    num_train_timesteps: int,
    sampler: str,
    steps: int,
    cfg_scale: float,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    image_shape: tuple[int, int, int],
):
    """Returns denoise(params, cond, uncond, keys) -> images in [-1, 1], NHWC.

    cond/uncond: text conditioning {"hidden": [B, L, D], "pooled": [B, D]} of the prompts and
    of the negative (empty) prompt; keys: [B, 2] uint32 per-image keys.
    """
    timesteps = sampling_timesteps(num_train_timesteps, steps, timestep_spacing)
    prev_timesteps = np.concatenate([timesteps[1:], [-1]]).astype(np.int32)
    timesteps_arr = jnp.asarray(timesteps, jnp.int32)
    prev_arr = jnp.asarray(prev_timesteps, jnp.int32)
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler={sampler!r}; choose 'ddim' or 'ddpm'")

    def per_image_normal(keys, index):
        return jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, index), image_shape)
        )(keys)

    def denoise(params, cond, uncond, keys):
        unet = nnx.merge(unet_graphdef, params)
        batch = keys.shape[0]

        def model_output(x, t):
            t_batch = jnp.full((batch,), t, jnp.int32)
            # Scales 0 and 1 need only one pass; otherwise conditional and unconditional run
            # as one doubled batch.
            def apply(x, t, text):
                return unet(x, t, text["hidden"], class_labels=text["pooled"])

            if cfg_scale == 1.0:
                return apply(x, t_batch, cond)
            if cfg_scale == 0.0:
                return apply(x, t_batch, uncond)
            both_text = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a, b]), cond, uncond
            )
            both = apply(
                jnp.concatenate([x, x]), jnp.concatenate([t_batch, t_batch]), both_text
            )
            cond_out, uncond_out = jnp.split(both, 2)
            return classifier_free_guidance(cond_out, uncond_out, cfg_scale)

        def body(i, x):
            t, t_prev = timesteps_arr[i], prev_arr[i]
            out = model_output(x, t)
            noise = per_image_normal(keys, i + 1)
            if sampler == "ddim":
                return ddim_step(schedule, prediction_type, out, x, t, t_prev, eta=eta, noise=noise)
            return ddpm_step(schedule, prediction_type, out, x, t, t_prev, noise=noise)

        x = per_image_normal(keys, 0)
        x = jax.lax.fori_loop(0, len(timesteps), body, x)
        return jnp.clip(x, -1.0, 1.0)

    return denoise


def denoise_fn_from_config(unet_graphdef, schedule, config: ml_collections.ConfigDict, **overrides):
    sample = config.sample
    options = dict(
        prediction_type=config.diffusion.prediction_type,
        num_train_timesteps=config.diffusion.num_train_timesteps,
        sampler=sample.sampler,
        steps=sample.steps,
        cfg_scale=sample.cfg_scale,
        eta=sample.eta,
        timestep_spacing=sample.timestep_spacing,
        image_shape=(
            config.data.image_size,
            config.data.image_size,
            config.model.unet.out_channels,
        ),
    )
    options.update(overrides)
    return make_denoise_fn(unet_graphdef, schedule, **options)


def to_uint8(images: jax.Array) -> np.ndarray:
    images = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile [N,H,W,C] uint8 images into one image with a 1-pixel gap."""
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.full(
        (rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 255, np.uint8
    )
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        grid[1 + r * (height + 1) : 1 + r * (height + 1) + height,
             1 + c * (width + 1) : 1 + c * (width + 1) + width] = image
    return grid
