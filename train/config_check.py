"""Config validation: runs before anything is built or compiled, so a bad value fails in seconds
with a message that names the field and what is allowed."""

from collections.abc import Iterable

import ml_collections

from data_pipeline.captions import EMPTY_CAPTION_POLICIES
from data_pipeline.input_pipeline import DATA_SOURCES, DECODE_WORKER_KINDS, storage_options
from diffusion.loss import LOSS_WEIGHTINGS
from diffusion.low_res import (
    DEFAULT_SAMPLE_NOISE_LEVEL,
    LOW_RES_CHANNELS,
    RESIZE_METHODS,
    is_super_resolution,
)
from diffusion.parameterization import PREDICTION_TYPES
from diffusion.sampling import KARRAS_SOLVERS, SOLVER_NAMES
from diffusion.schedules import SCHEDULES
from diffusion.solvers import TIMESTEP_SPACINGS
from diffusion.timestep_sampling import TIMESTEP_SAMPLINGS
from models.logical_axes import LOGICAL_AXES
from models.lora import check_lora_config
from models.text_encoder import DEMO_TOKENIZERS, TEXT_ENCODER_KINDS
from models.unet import ADDITION_EMBED_TYPES, ATTENTION_IMPLEMENTATIONS, RESNET_TIME_SCALE_SHIFTS
from train.sharding import MESH_AXES
from train.state import LR_DECAYS

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field holds a value the pipeline cannot use."""


def _choice(field: str, value, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config.{field}={value!r} is not allowed; choose one of {allowed}")


def _positive(field: str, value, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{field}={value!r} must be {bound}")


def _probability(field: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"config.{field}={value!r} must be in [0, 1]")


def resolve_and_validate(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the config with `model.pretrained`'s fields taken from its directory, lines saying what
    was taken), checked by `validate_config`. Reads the directory's JSON configs only, touches
    no JAX backend: `python -m train` calls it before anything starts, so a bad value is a
    one-line error in about a second, not after the devices, the cluster and the data."""
    from models.pretrained import PretrainedError, resolve_pretrained_config

    try:
        config, taken = resolve_pretrained_config(config)
    except PretrainedError as error:
        raise ConfigError(str(error)) from error
    validate_config(config)
    return config, taken


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError on the first field that cannot work."""
    for section in ("data", "model", "diffusion", "optim", "train", "sample", "mesh"):
        if section not in config:
            raise ConfigError(f"config has no section {section!r}")
    data, model, diffusion = config.data, config.model, config.diffusion
    optim, train, sample = config.optim, config.train, config.sample

    _choice("data.source", data.source, DATA_SOURCES)
    if data.source in ("tar", "arrayrecord") and not data.paths:
        raise ConfigError(f"config.data.paths is empty; data.source={data.source!r} needs files, "
                          "globs or URLs")
    if data.source == "tfds" and not data.tfds_name:
        raise ConfigError("config.data.tfds_name is empty; data.source='tfds' needs a name")
    _choice("data.empty_captions", data.empty_captions, EMPTY_CAPTION_POLICIES)
    _choice("data.decode_workers", data.decode_workers, DECODE_WORKER_KINDS)
    if data.source == "tar" and data.decode_workers != "threads":
        raise ConfigError("config.data.decode_workers='processes' needs a random-access source; "
                          "tar shards are decoded by threads")
    _positive("data.num_workers", data.num_workers)
    _positive("data.prefetch", data.prefetch, allow_zero=True)
    _positive("data.tar_cycle_length", data.tar_cycle_length)
    _positive("data.read_retries", data.read_retries, allow_zero=True)
    try:
        storage_options(data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _positive("data.image_size", data.image_size)
    _positive("data.shuffle_buffer", data.shuffle_buffer, allow_zero=True)

    unet = model.unet
    lora = model.get("lora")
    if lora is not None:
        try:
            check_lora_config(lora.rank, lora.alpha, lora.targets, field="config.model.lora")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if lora.rank and not model.get("pretrained", ""):
            raise ConfigError(
                f"config.model.lora.rank={lora.rank} trains adapters on a frozen pretrained UNet: "
                "set config.model.pretrained (rank 0 trains the whole UNet)")
        if lora.rank and lora.get("text_encoder", False):
            # The step encodes prompts outside the differentiated loss, with frozen weights.
            raise ConfigError(
                "config.model.lora.text_encoder=True: training text-encoder adapters is not "
                "supported yet; set it to False (the UNet's adapters still train)")
    # With model.pretrained the UNet works on VAE latents: models.pretrained sets its
    # sample_size from data.image_size and checks the sizes against the VAE.
    if not model.get("pretrained", "") and unet.sample_size != data.image_size:
        raise ConfigError(
            f"config.model.unet.sample_size={unet.sample_size} must equal "
            f"config.data.image_size={data.image_size} (pixel-space diffusion)"
        )
    if is_super_resolution(model):
        _check_low_res(model, data.image_size, sample)
    levels = len(unet.block_out_channels)
    if len(unet.down_block_types) != levels or len(unet.up_block_types) != levels:
        raise ConfigError(
            "config.model.unet.down_block_types and up_block_types need one entry per "
            f"block_out_channels entry ({levels})"
        )
    patch = unet.get("patch_size", 1)
    if not isinstance(patch, int) or patch < 1:
        raise ConfigError(f"config.model.unet.patch_size={patch!r} must be a positive int")
    if data.image_size % (2 ** (levels - 1) * patch):
        raise ConfigError(
            f"config.data.image_size={data.image_size} must be divisible by 2**{levels - 1} "
            f"x patch_size {patch} (one downsample per UNet level after the patch fold)"
        )
    for channels in unet.block_out_channels:
        if channels % unet.norm_num_groups:
            raise ConfigError(
                f"config.model.unet.block_out_channels entry {channels} is not divisible by "
                f"norm_num_groups={unet.norm_num_groups}"
            )
    _choice("model.unet.resnet_time_scale_shift", unet.get("resnet_time_scale_shift", "default"),
            RESNET_TIME_SCALE_SHIFTS)
    _choice("model.text_encoder.kind", model.text_encoder.kind, TEXT_ENCODER_KINDS)
    if model.text_encoder.kind == "demo" and (
        unet.cross_attention_dim != model.text_encoder.hidden_size
    ):
        raise ConfigError(
            f"config.model.unet.cross_attention_dim={unet.cross_attention_dim} must equal "
            f"config.model.text_encoder.hidden_size={model.text_encoder.hidden_size}"
        )
    tokenizer = model.text_encoder.get("tokenizer", "bytes")
    if model.text_encoder.kind == "demo":
        _choice("model.text_encoder.tokenizer", tokenizer, DEMO_TOKENIZERS)
        if tokenizer == "bpe":
            if model.text_encoder.bpe_vocab_size < 260:
                raise ConfigError(
                    f"config.model.text_encoder.bpe_vocab_size={model.text_encoder.bpe_vocab_size}"
                    " must be >= 260 (256 bytes, 3 special tokens and at least one merge)"
                )
            _positive("model.text_encoder.bpe_train_captions",
                      model.text_encoder.bpe_train_captions)
    if data.source == "synthetic" and model.text_encoder.kind == "demo" and tokenizer == "bytes":
        # (A BPE tokenizer's lengths are known once it is trained; training checks them then.)
        from data_pipeline.synthetic import max_caption_bytes

        needed = max_caption_bytes() + 1  # + the end token
        if model.text_encoder.max_length < needed:
            raise ConfigError(
                f"config.model.text_encoder.max_length={model.text_encoder.max_length} would "
                f"truncate the synthetic captions (up to {needed - 1} bytes + end token); use "
                f">= {needed}"
            )
    _choice("model.text_encoder.pooling", model.text_encoder.pooling, ("eos", "mean"))
    if unet.get("class_embed_type") == "projection" and (
        unet.projection_class_embeddings_input_dim != unet.cross_attention_dim
    ):
        raise ConfigError(
            "config.model.unet.projection_class_embeddings_input_dim="
            f"{unet.projection_class_embeddings_input_dim} must equal the text encoder width "
            f"({unet.cross_attention_dim}): it receives the pooled prompt embedding"
        )
    _choice("model.unet.addition_embed_type", unet.get("addition_embed_type"),
            ADDITION_EMBED_TYPES)
    heads = unet.get("addition_embed_type_num_heads", 64)
    if unet.get("addition_embed_type") == "text" and (
            not isinstance(heads, int) or heads < 1 or unet.cross_attention_dim % heads):
        raise ConfigError(
            f"config.model.unet.addition_embed_type_num_heads={heads!r} must divide "
            f"cross_attention_dim={unet.cross_attention_dim} (the text pooling's heads)")
    _choice("model.dtype", model.dtype, DTYPES)
    _choice("model.attention", model.get("attention", "auto"), ATTENTION_IMPLEMENTATIONS)
    if not isinstance(unet.get("remat", False), bool):
        raise ConfigError(f"config.model.unet.remat={unet.remat!r} must be True or False")

    _choice("diffusion.schedule", diffusion.schedule, SCHEDULES)
    _choice("diffusion.prediction_type", diffusion.prediction_type, PREDICTION_TYPES)
    _choice("diffusion.loss_weighting", diffusion.loss_weighting, LOSS_WEIGHTINGS)
    _positive("diffusion.num_train_timesteps", diffusion.num_train_timesteps)
    _choice("diffusion.timestep_sampling", diffusion.get("timestep_sampling", "uniform"),
            TIMESTEP_SAMPLINGS)
    _positive("diffusion.logit_std", diffusion.get("logit_std", 1.0))
    _positive("diffusion.timestep_shift", diffusion.get("timestep_shift", 1.0))
    _positive("diffusion.noise_offset", diffusion.get("noise_offset", 0.0), allow_zero=True)

    _positive("optim.learning_rate", optim.learning_rate)
    _positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    _choice("optim.decay", optim.decay, LR_DECAYS)
    _probability("optim.end_learning_rate_factor", optim.end_learning_rate_factor)
    _probability("optim.ema_decay", optim.ema_decay)
    _positive("optim.grad_clip_norm", optim.grad_clip_norm, allow_zero=True)

    _positive("train.global_batch_size", train.global_batch_size)
    _positive("train.num_train_steps", train.num_train_steps)
    accum = train.get("grad_accum_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"config.train.grad_accum_steps={accum!r} must be an int >= 1")
    if train.global_batch_size % accum:
        raise ConfigError(
            f"config.train.global_batch_size={train.global_batch_size} must be divisible by "
            f"config.train.grad_accum_steps={accum}"
        )
    _probability("train.caption_dropout_prob", train.caption_dropout_prob)
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _positive(f"train.{field}", train[field])
    _positive("train.sample_every_steps", train.sample_every_steps, allow_zero=True)
    for field in ("keep_period", "max_consecutive_nonfinite"):
        _positive(f"train.{field}", train.get(field, 0), allow_zero=True)

    _check_mesh(config.mesh)

    _choice("sample.sampler", sample.sampler, SOLVER_NAMES)
    if sample.get("karras_sigmas", False) and sample.sampler not in KARRAS_SOLVERS:
        raise ConfigError(
            f"config.sample.karras_sigmas=True needs a sampler in {KARRAS_SOLVERS}, "
            f"got {sample.sampler!r}"
        )
    _positive("sample.cfg_scale", sample.cfg_scale, allow_zero=True)
    _probability("sample.guidance_rescale", sample.get("guidance_rescale", 0.0))
    if diffusion.get("rescale_zero_terminal_snr", False) and (
        diffusion.prediction_type == "epsilon"
    ):
        raise ConfigError(
            "config.diffusion.rescale_zero_terminal_snr=True needs prediction_type "
            "'v_prediction' or 'sample': epsilon cannot recover x0 at zero SNR"
        )
    _choice("sample.timestep_spacing", sample.timestep_spacing, TIMESTEP_SPACINGS)
    if not 1 <= sample.steps <= diffusion.num_train_timesteps:
        raise ConfigError(
            f"config.sample.steps={sample.steps} must be in [1, "
            f"diffusion.num_train_timesteps={diffusion.num_train_timesteps}]"
        )
    _positive("sample.batch_size", sample.batch_size)
    steps_offset = sample.get("steps_offset", 0)
    if not isinstance(steps_offset, int) or steps_offset < 0:
        raise ConfigError(f"config.sample.steps_offset={steps_offset!r} must be an int >= 0")
    _positive("sample.eta", sample.eta, allow_zero=True)


def _check_low_res(model, image_size: int, sample) -> None:
    """A super-resolution model (`model.low_res`, diffusion.low_res): the UNet takes the
    low-res image's channels and its noise level as integer class labels."""
    low_res, unet = model.low_res, model.unet
    factor = low_res.factor
    if not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"config.model.low_res.factor={factor!r} must be an int >= 1")
    if image_size % factor:
        raise ConfigError(f"config.data.image_size={image_size} must be divisible by "
                          f"config.model.low_res.factor={factor}")
    _choice("model.low_res.schedule", low_res.get("schedule", "scaled_linear"), SCHEDULES)
    _choice("model.low_res.resize", low_res.get("resize", "cubic"), RESIZE_METHODS)
    steps = low_res.get("num_train_timesteps", 1000)
    level = low_res.max_noise_level
    if not isinstance(level, int) or not 0 <= level < steps:
        raise ConfigError(f"config.model.low_res.max_noise_level={level!r} must be an int in "
                          f"[0, model.low_res.num_train_timesteps={steps})")
    if unet.get("class_embed_type") is not None:
        raise ConfigError(
            f"config.model.unet.class_embed_type={unet.class_embed_type!r}: a super-resolution "
            "model's class embedding is its noise-level table; set it to None (and "
            "num_class_embeds > model.low_res.max_noise_level)")
    classes = unet.get("num_class_embeds")
    if not isinstance(classes, int) or classes <= level:
        raise ConfigError(
            f"config.model.unet.num_class_embeds={classes!r} must be an int > "
            f"model.low_res.max_noise_level={level}: the noise level indexes that table")
    if not model.get("pretrained", ""):
        expected = unet.out_channels + LOW_RES_CHANNELS
        if unet.in_channels != expected:
            raise ConfigError(
                f"config.model.unet.in_channels={unet.in_channels} must be {expected}: "
                f"out_channels={unet.out_channels} noisy channels + {LOW_RES_CHANNELS} of the "
                "low-res image")
    noise_level = sample.get("noise_level", DEFAULT_SAMPLE_NOISE_LEVEL)
    if not isinstance(noise_level, int) or not 0 <= noise_level <= level:
        raise ConfigError(f"config.sample.noise_level={noise_level!r} must be an int in [0, "
                          f"model.low_res.max_noise_level={level}]")


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
    names = []
    for entry in mesh.shape:
        if len(entry) != 2 or not isinstance(entry[1], int) or (entry[1] < 1 and entry[1] != -1):
            raise ConfigError(
                f"config.mesh.shape entry {tuple(entry)!r} must be (axis name, size >= 1 or -1)")
        _choice("mesh.shape axis", entry[0], MESH_AXES)
        names.append(entry[0])
    if len(set(names)) != len(names):
        raise ConfigError(f"config.mesh.shape={tuple(map(tuple, mesh.shape))} repeats an axis")
    for axis in mesh.batch_axes:
        if axis not in names:
            raise ConfigError(
                f"config.mesh.batch_axes names {axis!r}, which config.mesh.shape does not have "
                f"({tuple(names)})")
    for rule in mesh.get("rules", ()):
        if len(rule) != 2:
            raise ConfigError(f"config.mesh.rules entry {tuple(rule)!r} must be (logical, mesh)")
        _choice("mesh.rules logical axis", rule[0], LOGICAL_AXES)
        if rule[1] is not None:
            _choice("mesh.rules mesh axis", rule[1], MESH_AXES)
