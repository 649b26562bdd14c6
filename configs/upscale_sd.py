r"""Fine-tune Stable Diffusion's x4 upscaler (a diffusers `StableDiffusionUpscalePipeline`
directory, e.g. stabilityai/stable-diffusion-x4-upscaler) on your captioned images.

Launch:
    python -m data_pipeline.prepare --input my_images/ --output /data/my_shards
    python -m train --config configs/upscale_sd.py --workdir /runs/x4_ft \
        --config.model.pretrained=/models/stable-diffusion-x4-upscaler \
        --config.data.paths=/data/my_shards
    python -m sample --workdir /runs/x4_ft --low_res my_128px_images/ \
        --prompt "a photo of ..." --out /runs/x4_ft/samples

Any captioned dataset serves: each training image (data.image_size, 512 here) is the target,
and its low-resolution input (image_size / 4, 128 here) is made from it inside the train step
(box downsample, then noise augmentation at a random level up to the pipeline's
max_noise_level). The UNet denoises the VAE's latents (512px -> 128x128x4, the low-resolution
image's size) with the noisy low-resolution image as 3 more input channels and its noise level
as the class label.

Fixed by the directory (models/pretrained.py): the UNet, text encoder and VAE, the noise
schedule and prediction type (v), and model.low_res (factor 4, max_noise_level, the
low_res_scheduler's schedule). The VAE scales latents by 0.08333, as diffusers' upscale
pipeline does. Only the UNet trains.

Sizes here fit one 80 GB accelerator with bf16 compute and remat: the x4 upscaler's UNet has
473M parameters and runs at 128x128 latents, twice SD 1.5's side; lower
`train.global_batch_size` (or raise `train.grad_accum_steps`) for smaller memory.
"""

from ml_collections import config_dict

from configs import finetune_sd


def get_config():
    config = finetune_sd.get_config()

    data = config.data
    # High-resolution training images; multiples of 32 (VAE 4x, then the UNet's 3 downsamples).
    data.image_size = 512

    model = config.model
    # Required: a local diffusers StableDiffusionUpscalePipeline directory (no download).
    model.pretrained = config_dict.placeholder(str)
    model.dtype = "bfloat16"
    model.unet.remat = True

    optim = config.optim
    optim.learning_rate = 1e-5
    optim.warmup_steps = 500

    train = config.train
    train.global_batch_size = 4
    train.num_train_steps = 10_000
    # The upscaler sees the caption through cross-attention; dropping it sometimes trains
    # the unconditional branch that guidance (sample.cfg_scale) needs.
    train.caption_dropout_prob = 0.1

    sample = config.sample
    # diffusers' StableDiffusionUpscalePipeline defaults: 75 DDIM steps, guidance 9, noise
    # level 20 on the low-resolution input (higher: more freedom, less fidelity to it).
    sample.sampler = "ddim"
    sample.steps = 75
    sample.cfg_scale = 9.0
    sample.noise_level = 20
    sample.batch_size = 4
    return config
