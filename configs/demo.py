"""Demo: a small text-conditioned UNet on the built-in synthetic captioned shapes, on CPU.

Launch:
    python -m train --config configs/demo.py --workdir /tmp/t2i_demo
    python -m sample --workdir /tmp/t2i_demo --prompt "a red circle in the top left" --out /tmp/out

`python -m demo --workdir DIR` runs the whole demo (data, training, sampling, adherence).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    # "synthetic": write the demo dataset as ArrayRecord into `<workdir>/data` (if absent).
    # "arrayrecord": ArrayRecord files named by `data.paths` (what `prepare` writes).
    # "tar": img2dataset / WebDataset tar shards named by `data.paths`.
    # "tfds": the TFDS dataset `tfds_name` (prepared in `tfds_data_dir`), read by random access.
    data.source = "synthetic"
    # Files, directories, globs, brace ranges (shard-{00000..00099}.tar), comma lists, or URLs
    # (http(s)://, gs://, s3://; s3/gs need s3fs/gcsfs).
    data.paths = ""
    # fsspec options for remote paths as a JSON object, e.g. '{"endpoint_url": "http://..."}'.
    data.storage_options = ""
    data.tfds_name = ""
    data.tfds_split = "train"
    data.tfds_data_dir = ""
    data.image_feature = "image"
    data.caption_feature = "caption"
    # JSON members: this field (a string) or its plural (a list, one chosen at random).
    data.caption_json_field = "caption"
    # Samples without a caption: "drop" them, or train on them as "unconditional" examples.
    data.empty_captions = "drop"
    data.image_size = 32
    # Tar only: the shuffle window, in samples, over `tar_cycle_length` interleaved shards.
    # Random-access sources are shuffled globally instead.
    data.shuffle_buffer = 2000
    data.tar_cycle_length = 4
    # Remote tar shards: retries with exponential backoff before a shard is skipped.
    data.read_retries = 3
    data.read_backoff_s = 1.0
    # Batches prepared ahead of the train step.
    data.prefetch = 4
    # Parallel image decoding: `num_workers` threads ("threads") or Grain worker processes
    # ("processes", random-access sources only).
    data.decode_workers = "threads"
    data.num_workers = 2
    data.synthetic_num_samples = 20_000
    data.synthetic_num_shards = 16
    data.synthetic_two_shape_prob = 0.05
    # Colour x shape combinations never shown in training; the demo measures them separately.
    data.synthetic_held_out = ("red triangle", "blue circle", "yellow square")

    config.model = model = ml_collections.ConfigDict()
    model.unet = unet = ml_collections.ConfigDict()
    unet.sample_size = 32
    unet.in_channels = 3
    unet.out_channels = 3
    # patch_size 2 folds each 2x2 pixel patch into channels, so the network runs at 16x16 and
    # 8x8: 1.4x the training throughput of a 32x32 UNet of the same depth on CPU, and the
    # budget buys more steps. Attention only at 8x8 (and the mid block):
    # on CPU, attention at 16x16 costs more than the rest of the network.
    unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet.block_out_channels = (32, 64)
    unet.layers_per_block = 1
    unet.attention_head_dim = 4
    unet.cross_attention_dim = 128
    unet.norm_num_groups = 8
    unet.transformer_layers_per_block = 1
    # The pooled prompt embedding also enters through the timestep embedding (diffusers'
    # "projection" class embedding): a global path that learns much faster than cross-attention.
    unet.class_embed_type = "projection"
    unet.projection_class_embeddings_input_dim = 128
    # diffusers' addition_embed_type="text": an attention pooling of the text states added to
    # the timestep embedding (a pooled-prompt path beside any class embedding); None: off.
    unet.addition_embed_type = None
    unet.addition_embed_type_num_heads = 8
    # "scale_shift": the embedding (timestep + pooled prompt) scales and shifts each resnet's
    # normalised features (FiLM) instead of only being added to them ("default"). Measured on
    # this demo (1700 steps, CPU): held-in adherence 0.85 with scale_shift, 0.50 with default.
    unet.resnet_time_scale_shift = "scale_shift"
    # Row/column channels appended to the input, so prompts naming a position are followed
    # from early on (convolutions alone learn absolute position slowly, from the padding).
    unet.coordinate_channels = True
    unet.patch_size = 2
    # Recompute each resnet / transformer block's activations in the backward pass instead of
    # storing them (less memory, about a third more compute).
    unet.remat = False
    model.text_encoder = text = ml_collections.ConfigDict()
    # "demo": a small CLIP-style transformer from a fixed seed with the tokenizer below (no
    # download).
    # "clip": a Hugging Face-layout directory named by `pretrained_path`.
    text.kind = "demo"
    text.pretrained_path = ""
    text.seed = 1234
    # "bytes": one token per UTF-8 byte.
    # "bpe": a byte-level BPE tokenizer trained on the first `bpe_train_captions` training
    # captions when training starts and saved as <workdir>/tokenizer.json (the sampler reads it).
    # Each caption word becomes one token: sequences 4x shorter than raw bytes ("bytes"), so
    # the encoder and the cross-attention cost less, and a position word is one token the
    # cross-attention can find. The longest synthetic caption is 21 tokens with the end token.
    text.tokenizer = "bpe"
    text.bpe_vocab_size = 512
    text.bpe_train_captions = 20_000
    text.max_length = 32
    text.hidden_size = 128
    text.intermediate_size = 256
    text.num_hidden_layers = 2
    text.num_attention_heads = 4
    # Pooled prompt vector: "eos" (CLIP's end-token feature) or "mean" over tokens.
    # With a random causal encoder, "mean" is dominated by the first words (every later token
    # attends to them); the end token sits right after the position words and weighs colour,
    # shape and position more evenly (measured on the demo captions).
    text.pooling = "eos"
    # Compute dtype of the UNet and the text encoder ("float32" or "bfloat16"); parameters,
    # gradients and optimizer state stay float32.
    model.dtype = "float32"
    # Which kernel computes the UNet's attention (same parameters and values): "auto" runs a
    # heads-major formulation with a hand-written gradient on CPU, cuDNN's fused flash
    # attention on NVIDIA GPUs for bf16/fp16 where it applies (XLA's elsewhere), XLA's on TPU;
    # "xla", "cudnn" or "heads_major" force one.
    model.attention = "auto"
    # A diffusers Stable Diffusion pipeline directory (model_index.json, unet/, vae/,
    # text_encoder/, tokenizer/, scheduler/) to fine-tune; "" trains from scratch in pixel space.
    # Its configs fix model.unet, model.text_encoder, the noise schedule and prediction type
    # (models/pretrained.py); the UNet then works on the frozen VAE's latents.
    model.pretrained = ""
    # LoRA (models/lora.py): rank > 0 trains low-rank adapters on the `targets` layers only;
    # the UNet's own weights stay frozen, read from model.pretrained, and the optimizer, EMA and
    # checkpoints hold the adapters alone. rank 0 fine-tunes (or trains) the whole UNet.
    # (Written out here, not imported from models.lora: a config must not import jax, whose
    # CPU device split is set from the config before jax starts.)
    model.lora = lora = ml_collections.ConfigDict()
    lora.rank = 0
    lora.alpha = 4.0  # scale = alpha / rank; alpha = rank gives scale 1
    lora.targets = ("to_q", "to_k", "to_v", "to_out")  # attention projections of the UNet
    lora.text_encoder = False  # adapters on the text encoder too (not supported yet)

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "cosine"
    diffusion.num_train_timesteps = 1000
    diffusion.beta_start = 0.00085
    diffusion.beta_end = 0.012
    diffusion.prediction_type = "v_prediction"
    # Lin et al. 2023: rescale the schedule so the last timestep is pure noise (SNR 0), which
    # is what sampling starts from; pair it with v_prediction and "trailing" spacing.
    diffusion.rescale_zero_terminal_snr = False
    # Plain v-prediction MSE ("none"), not Min-SNR: Min-SNR scales the v-loss by
    # min(snr, gamma) / (snr + 1), close to zero at the high noise levels where the layout (the
    # shape's position) is decided. Measured at 2000 steps x 64 (H100, same data, 4 images per
    # prompt): held-in adherence 0.16 with Min-SNR, 0.29 plain at lr 2e-3, 0.92 / 0.88 (two
    # seeds) plain at lr 4e-3.
    diffusion.loss_weighting = "none"
    # "uniform", "logit_normal" (t = T * sigmoid(logit_mean + logit_std * normal)) or
    # "shifted" (t = T * s*u / (1 + (s - 1)*u), u uniform, s = timestep_shift).
    diffusion.timestep_sampling = "uniform"
    diffusion.logit_mean = 0.0
    diffusion.logit_std = 1.0
    diffusion.timestep_shift = 1.0
    diffusion.min_snr_gamma = 5.0  # used only with loss_weighting="min_snr"
    # Noise offset (Guttenberg 2023): adds offset * N(0, 1) per example and channel to the
    # training noise, so the model learns to shift mean brightness (very dark or light images).
    diffusion.noise_offset = 0.0

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 4e-3
    optim.warmup_steps = 100
    # After the linear warmup: "cosine" or "linear" down to learning_rate *
    # end_learning_rate_factor at num_train_steps, or "constant".
    optim.decay = "cosine"
    optim.end_learning_rate_factor = 0.05
    optim.b1 = 0.9
    optim.b2 = 0.99
    optim.weight_decay = 0.01
    optim.grad_clip_norm = 1.0
    optim.ema_decay = 0.995

    config.train = train = ml_collections.ConfigDict()
    train.global_batch_size = 64
    # 2300 steps fit the 15-minute CPU budget with the Grain input pipeline (818 s in all;
    # 1750 steps took 616 s and reached held-in adherence 0.910, 2300 steps 0.993).
    train.num_train_steps = 2300
    # Split each global batch into this many micro-batches, gradients summed in the step (the
    # same update, the activation memory of one micro-batch).
    train.grad_accum_steps = 1
    train.caption_dropout_prob = 0.1
    train.log_every_steps = 25
    # Each save or sample grid costs the CPU demo a few seconds; twice per run is enough here.
    train.checkpoint_every_steps = 1150
    # Checkpoints kept: the last `keep_checkpoints`, plus every step divisible by `keep_period`
    # (0: none) for looking back at a long run.
    train.keep_checkpoints = 2
    train.keep_period = 0
    # Non-finite steps are skipped (update dropped, counted); this many in a row stop the job
    # with the last good checkpoint kept (0: never stop).
    train.max_consecutive_nonfinite = 20
    train.sample_every_steps = 1150
    train.sample_prompts = (
        "a red circle in the top left",
        "a blue square in the bottom right",
        "a green triangle in the center",
        "a yellow circle in the top right",
    )

    config.sample = sample = ml_collections.ConfigDict()
    sample.sampler = "ddim"
    # DDIM with "trailing" spacing needs few steps here: held-in adherence of the demo
    # checkpoint was 0.953 / 0.943 / 0.927 / 0.923 at 10 / 15 / 20 / 25 steps (CPU, 300 images).
    sample.steps = 15
    sample.eta = 0.0
    sample.cfg_scale = 4.0
    sample.timestep_spacing = "trailing"
    # Added to every sampling timestep ("leading" spacing); Stable Diffusion's schedulers use 1.
    sample.steps_offset = 0
    # Karras et al. 2022 sigma spacing (dpmpp_2m, euler, euler_ancestral, heun only).
    sample.karras_sigmas = False
    # Lin et al. 2023 guidance rescale in [0, 1]; 0 is plain classifier-free guidance.
    sample.guidance_rescale = 0.0
    sample.batch_size = 64

    config.mesh = mesh = ml_collections.ConfigDict()
    # Mesh axes and sizes; -1 takes all remaining devices. ("fsdp", N) splits parameters,
    # gradients, optimizer state and EMA N ways (FSDP); the batch is split over both axes.
    mesh.shape = (("data", -1), ("fsdp", 1))
    mesh.batch_axes = ("data", "fsdp")
    # Logical parameter axis -> mesh axis (None: replicated). Names: "embed" (input features of
    # a kernel, width of an embedding table), "mlp" (output features, biases), "vocab", "norm".
    # A dimension that does not divide over its mesh axis stays whole.
    mesh.rules = (("embed", "fsdp"), ("mlp", None), ("vocab", None), ("norm", None))
    return config
