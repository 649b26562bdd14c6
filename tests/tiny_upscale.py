"""A tiny random Stable Diffusion x4 upscaler pipeline directory, built offline with diffusers'
PyTorch classes.

`build_tiny_upscale_pipeline(path)` writes the layout `StableDiffusionUpscalePipeline.
save_pretrained` gives (`model_index.json` with `max_noise_level`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`, `low_res_scheduler/`), with the options of
`stabilityai/stable-diffusion-x4-upscaler` at toy sizes:

- UNet: 4 latent + 3 low-resolution image channels in, 4 out; the noise level through a
  `num_class_embeds` table (100 rows, max_noise_level 99: the largest level that fits);
  `only_cross_attention` on one attention level, linear projections, a head width per level.
- VAE: 3 levels (factor 4, so the 8x8 low-resolution image has the 8x8 latents' size),
  scaling_factor 0.08333.
- Text: SD 2.x's CLIP layout (gelu, "!" padding) from tests/tiny_sd.py's tokenizer.
- Schedulers: DDIM with v-prediction (scaled_linear, steps_offset 1, set_alpha_to_one False),
  and a DDPM low_res_scheduler on a different ("linear") schedule, so a test can tell which
  one a field came from.

Sizes: images 32x32 -> latents 8x8x4; low-resolution images 8x8x3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_sd import TEXT_WIDTH, tiny_text_encoder, tiny_tokenizer

IMAGE_SIZE = 32
LATENT_SIZE = 8
LOW_RES_SIZE = 8
LATENT_CHANNELS = 4
NUM_CLASS_EMBEDS = 100
MAX_NOISE_LEVEL = 99
VAE_SCALING = 0.08333
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="scaled_linear")
LOW_RES_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                        beta_schedule="linear")


def build_tiny_upscale_pipeline(path, *, seed: int = 0) -> Path:
    """Writes a tiny random x4-upscaler pipeline to `path` (created) and returns it."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    path = Path(path)
    torch.manual_seed(seed)

    tokenizer = tiny_tokenizer(path / "_tokenizer_src", version="2.x")
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS + 3,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 2, 4),
        only_cross_attention=(True, True, False),
        use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        num_class_embeds=NUM_CLASS_EMBEDS,
    )
    # diffusers initialises the class table like any embedding; scale it up so a wrong noise
    # level (or none) changes the output well beyond the parity tolerances.
    with torch.no_grad():
        unet.class_embedding.weight.mul_(4.0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=VAE_SCALING,
    )
    text_encoder = tiny_text_encoder(tokenizer, version="2.x")
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", steps_offset=1,
                                        set_alpha_to_one=False, clip_sample=False, **SCHEDULE)
    low_res_scheduler = diffusers.DDPMScheduler(**LOW_RES_SCHEDULE)
    pipeline = diffusers.StableDiffusionUpscalePipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        low_res_scheduler=low_res_scheduler, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, watermarker=None, max_noise_level=MAX_NOISE_LEVEL,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    for leftover in (path / "_tokenizer_src").iterdir():
        leftover.unlink()
    (path / "_tokenizer_src").rmdir()
    return path
