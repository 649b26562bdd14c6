"""Low-resolution conditioning of a super-resolution (upscaler) UNet.

The upscaler denoises the high-resolution image (or its latents) given a low-resolution
version of it, as in cascaded diffusion (Ho et al. 2021) and Stable Diffusion's x4 upscaler:

- training makes the low-resolution input from the target itself: a box-filter downsample by
  `factor`, then noise augmentation at a random level in [0, max_noise_level] of its own
  schedule (the "low_res_scheduler" of diffusers' StableDiffusionUpscalePipeline);
- the noisy low-resolution image is resized (bicubic) to the UNet's input size and
  concatenated to the noisy input channels; the noise level enters through the UNet's class
  embedding (`class_labels`, an integer table: `num_class_embeds` > max_noise_level);
- sampling takes a given low-resolution image and one fixed noise level (`sample.noise_level`),
  the augmentation the model saw in training hiding the gap between its training inputs and
  real ones.

For a pixel model (the demo: 8x8 -> 32x32) the resize is a 4x bicubic upsample; for a latent
model whose VAE downsamples by `factor` (the x4 upscaler), the low-resolution image already has
the latents' size and the resize does nothing.

`config.model.low_res` (absent, or factor 0: not a super-resolution model):
    factor              high-resolution pixels per low-resolution pixel along each side
    max_noise_level     training draws noise levels in [0, max_noise_level]
    schedule, num_train_timesteps, beta_start, beta_end
                        the augmentation's noise schedule (diffusion.schedules names)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion.parameterization import add_noise
from diffusion.schedules import NoiseSchedule, make_schedule

# Low-resolution images carry 3 (RGB) channels, in [-1, 1] like the training images.
LOW_RES_CHANNELS = 3
# fold_in index of an image's key for its low-resolution augmentation noise while sampling.
# The solver draws the initial noise at index 0 and each step's at 1, 2, ...; this is far above
# any step count, so the draws never coincide.
LOW_RES_NOISE_INDEX = 2**31 - 1
# Sampling noise level of the low-res input when a config sets none (diffusers' upscale
# pipeline default): a little augmentation noise hides the gap between training inputs and
# real ones.
DEFAULT_SAMPLE_NOISE_LEVEL = 20
# Resize methods of jax.image.resize allowed for the low-res input.
RESIZE_METHODS = ("cubic", "linear", "nearest", "lanczos3")


@dataclasses.dataclass(frozen=True)
class LowResConditioning:
    """What a super-resolution model's conditioning needs (built once from the config)."""

    factor: int
    max_noise_level: int
    schedule: NoiseSchedule
    # Spatial size of the UNet input the low-res image is resized to (its sample_size).
    size: int
    method: str = "cubic"

    def low_res_size(self, image_size: int) -> int:
        """Side of the low-resolution image of an `image_size` high-resolution one."""
        return image_size // self.factor


def is_super_resolution(model_config) -> bool:
    low_res = model_config.get("low_res", None)
    return bool(low_res) and int(low_res.get("factor", 0) or 0) > 0


def low_res_from_config(model_config) -> LowResConditioning | None:
    """The conditioning `config.model` describes, or None for a model without one."""
    if not is_super_resolution(model_config):
        return None
    low_res = model_config.low_res
    schedule = make_schedule(
        low_res.get("schedule", "scaled_linear"), int(low_res.get("num_train_timesteps", 1000)),
        float(low_res.get("beta_start", 0.0001)), float(low_res.get("beta_end", 0.02)))
    return LowResConditioning(
        factor=int(low_res.factor), max_noise_level=int(low_res.max_noise_level),
        schedule=schedule, size=int(model_config.unet.sample_size),
        method=low_res.get("resize", "cubic"))


def downsample(images: jax.Array, factor: int) -> jax.Array:
    """[B, H, W, C] -> [B, H / factor, W / factor, C], each output pixel the mean of its
    factor x factor block (exact area downsampling for an integer factor)."""
    batch, height, width, channels = images.shape
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} does not divide by the low-res factor "
                         f"{factor}")
    blocks = images.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4))


def low_res_input(conditioning: LowResConditioning, low_res: jax.Array, noise: jax.Array,
                  noise_level: jax.Array) -> jax.Array:
    """The UNet's extra input channels: `low_res` ([B, h, w, 3] in [-1, 1]) noised to
    `noise_level` ([B] ints) with `noise` (its shape), then resized to size x size."""
    noisy = add_noise(conditioning.schedule, low_res.astype(jnp.float32), noise, noise_level)
    batch, height, width, channels = noisy.shape
    size = conditioning.size
    if (height, width) == (size, size):
        return noisy
    return jax.image.resize(noisy, (batch, size, size, channels), conditioning.method)


def training_low_res(conditioning: LowResConditioning, images: jax.Array, rng: jax.Array):
    """(UNet extra input [B, size, size, 3], noise levels [B] int32) made from the training
    `images` ([B, H, W, 3] pixels in [-1, 1]): downsampled, noised at a random level."""
    rng_level, rng_noise = jax.random.split(rng)
    low = downsample(images, conditioning.factor)
    levels = jax.random.randint(rng_level, (images.shape[0],), 0,
                                conditioning.max_noise_level + 1, jnp.int32)
    noise = jax.random.normal(rng_noise, low.shape, jnp.float32)
    return low_res_input(conditioning, low, noise, levels), levels


def sampling_noise(keys: jax.Array, shape: tuple) -> jax.Array:
    """Per-image augmentation noise of `shape` ([h, w, 3]) from each image's key (the keys of
    `diffusion.sampling.image_keys`): an image's low-res noise depends on its seed and index
    only, not on the batch or device count."""
    return jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, LOW_RES_NOISE_INDEX), shape, jnp.float32))(keys)


def with_low_res_inputs(denoise, conditioning: LowResConditioning):
    """A solver loop (`diffusion.sampling.make_denoise_fn`'s denoise, or the latent variant
    with the VAE's parameters first) taking two more inputs after the CFG scales: `low_res`
    ([B, h, w, 3] in [-1, 1]) and `noise_level` ([B] ints). Each image's low-res input is
    noised with its own key's draw (`sampling_noise`) and put into the conditional and the
    unconditional conditioning as "low_res" / "noise_level" (CFG guides the caption only)."""
    from diffusion.sampling import image_keys

    def wrapped(*args):
        *params, cond, uncond, seeds, image_indices, cfg_scales, low_res, noise_level = args
        noise = sampling_noise(image_keys(seeds, image_indices), low_res.shape[1:])
        noise_level = jnp.asarray(noise_level, jnp.int32)
        extra = {"low_res": low_res_input(conditioning, low_res, noise, noise_level),
                 "noise_level": noise_level}
        return denoise(*params, {**cond, **extra}, {**uncond, **extra}, seeds, image_indices,
                       cfg_scales)

    return wrapped
