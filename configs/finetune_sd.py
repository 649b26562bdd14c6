r"""Fine-tune a Stable Diffusion 1.x / 2.x pipeline (diffusers layout) on your captioned images.

Launch:
    python -m data_pipeline.prepare --input my_images/ --output /data/my_shards
    python -m train --config configs/finetune_sd.py --workdir /runs/sd_ft \
        --config.model.pretrained=/models/stable-diffusion-v1-5 \
        --config.data.paths=/data/my_shards
    python -m sample --workdir /runs/sd_ft --prompt "a photo of ..." --out /runs/sd_ft/samples

LoRA (adapters only; the UNet stays frozen; see docs/notes_lora.md):
    python -m train --config configs/finetune_sd.py --workdir /runs/sd_lora \
        --config.model.pretrained=/models/stable-diffusion-v1-5 \
        --config.data.paths=/data/my_shards --config.model.lora.rank=16 \
        --config.model.lora.alpha=16 --config.optim.learning_rate=1e-4
    python -m export --workdir /runs/sd_lora --out /runs/sd_lora/lora --lora

The UNet, text encoder, VAE, noise schedule and prediction type come from the pipeline
directory (models/pretrained.py); only the UNet trains, the text encoder and the VAE stay frozen
and the UNet denoises VAE latents (512px images -> 64x64x4 latents). Sizes here fit one 80 GB
accelerator for an SD 1.5-size UNet with bf16 compute and remat; lower `train.global_batch_size`
(or raise `train.grad_accum_steps`) for smaller memory.
"""

from ml_collections import config_dict

from configs import demo


def get_config():
    config = demo.get_config()

    data = config.data
    data.source = "arrayrecord"  # what `prepare` writes; "tar" for img2dataset shards
    data.paths = ""  # required: the shards (--config.data.paths=...)
    data.image_size = 512
    data.shuffle_buffer = 1000
    data.num_workers = 8

    model = config.model
    # Required: a local diffusers pipeline directory (no download happens).
    model.pretrained = config_dict.placeholder(str)
    model.dtype = "bfloat16"  # compute; parameters, gradients and Adam state stay float32
    model.unet.remat = True

    diffusion = config.diffusion
    # Min-SNR-5 (Hang et al. 2023): faster convergence than the plain MSE; the weight adapts to
    # the pipeline's prediction type (epsilon for SD 1.x, v for SD 2.x).
    diffusion.loss_weighting = "min_snr"
    diffusion.min_snr_gamma = 5.0
    diffusion.timestep_sampling = "uniform"
    # 0.05-0.1 helps a model learn very dark or light images; 0 keeps the original objective.
    diffusion.noise_offset = 0.0

    optim = config.optim
    optim.learning_rate = 1e-5
    optim.warmup_steps = 500
    optim.decay = "constant"
    optim.b1, optim.b2 = 0.9, 0.999
    optim.weight_decay = 1e-2
    optim.grad_clip_norm = 1.0
    optim.ema_decay = 0.9999

    train = config.train
    train.global_batch_size = 8
    train.num_train_steps = 10_000
    train.caption_dropout_prob = 0.1
    train.log_every_steps = 50
    train.checkpoint_every_steps = 1000
    train.keep_checkpoints = 3
    train.sample_every_steps = 1000
    train.sample_prompts = ("a photo of an astronaut riding a horse", "a watercolor landscape")

    sample = config.sample
    # Spacing and steps offset are the pipeline scheduler's (set from scheduler_config.json).
    sample.sampler = "ddim"
    sample.steps = 30
    sample.cfg_scale = 7.5
    sample.batch_size = 4
    return config
