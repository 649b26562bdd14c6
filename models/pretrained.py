"""Import a Stable Diffusion pipeline directory in the diffusers layout (`model.pretrained`).

A directory as `StableDiffusionPipeline.save_pretrained` writes it (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) is turned into

- config fields: `model.unet` from `unet/config.json`, `model.text_encoder` (the Hugging Face
  CLIP text model in `text_encoder/` with the tokenizer in `tokenizer/`), `diffusion` (noise
  schedule, prediction type) and `sample` (timestep spacing, steps offset) from
  `scheduler/scheduler_config.json`. `resolve_pretrained_config` writes them into the run's
  config, which the checkpoint stores, so the sampler and a resumed run need nothing else;
- UNet parameters read tensor by tensor straight into their training shardings
  (`load_unet_params`): each device reads only its slice of each safetensors tensor, so a large
  UNet is never whole on one device;
- the frozen VAE (`load_pipeline_vae`, through `models.vae.load_vae`).

A `StableDiffusionUpscalePipeline` directory (Stable Diffusion's x4 upscaler) also has a
`low_res_scheduler/` (the noise augmentation of the low-resolution input) and `max_noise_level`
in model_index.json; its UNet takes the latents plus the 3 low-resolution image channels, and
the noise level through its class embedding. It resolves to a super-resolution model
(`model.low_res`, diffusion.low_res) whose low-resolution image has the latents' size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from diffusion.low_res import DEFAULT_SAMPLE_NOISE_LEVEL, LOW_RES_CHANNELS, is_super_resolution
from models.hf_weights import torch_name
from models.unet import unet_kwargs_from_diffusers_config

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# model_index.json entries we can build, by part: (library, class names).
SUPPORTED_CLASSES = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
}
# Pipelines with parts we do not model (SDXL's second text encoder, refiners, ...).
_UNSUPPORTED_PARTS = ("text_encoder_2", "tokenizer_2", "prior", "transformer")
# diffusers beta_schedule -> diffusion.schedule (ours).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}
# Scheduler options that only change how a PyTorch scheduler samples, with the value at which
# our solvers do the same; any other value is reported as not carried over.
_SAMPLING_ONLY_OPTIONS = {
    "clip_sample": False,
    "thresholding": False,
    "set_alpha_to_one": None,  # ours: the step after the last uses alpha_cumprod 1
    "skip_prk_steps": None,
    "variance_type": None,
    "use_karras_sigmas": False,
    "timestep_type": None,
}
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
# diffusers' StableDiffusionUpscalePipeline defaults: max_noise_level when model_index.json has
# none; the latent scaling it forces onto the VAE whatever the VAE config says (the x4
# upscaler's VAE config has no scaling_factor, and 0.18215 would be wrong for its latents).
UPSCALE_MAX_NOISE_LEVEL = 350
UPSCALE_LATENT_SCALING = 0.08333
# Parts of an upscale pipeline that post-process its outputs; we do not apply them.
_POSTPROCESSING_PARTS = ("safety_checker", "feature_extractor", "watermarker")
UNET_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.fp16.safetensors")


class PretrainedError(ValueError):
    """A `model.pretrained` directory that cannot be imported (the message says what and where)."""


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PretrainedError(f"{path} is not valid JSON: {error}") from None


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The parsed configs of a diffusers pipeline directory."""

    root: Path
    model_index: dict
    unet_config: dict
    vae_config: dict
    text_encoder_config: dict
    scheduler_config: dict
    # Upscale pipelines only (None otherwise): low_res_scheduler/scheduler_config.json and the
    # largest noise level of the low-resolution input.
    low_res_scheduler_config: dict | None = None
    max_noise_level: int | None = None

    @property
    def is_upscaler(self) -> bool:
        return self.low_res_scheduler_config is not None

    @property
    def ignored_parts(self) -> list[str]:
        """Non-null post-processing parts (safety checker, watermarker) we do not apply."""
        return [part for part in _POSTPROCESSING_PARTS
                if isinstance(self.model_index.get(part), list)
                and self.model_index[part][0] is not None]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))


def read_pipeline(directory: str | Path) -> Pipeline:
    """Parses and checks `directory`'s model_index.json and the parts' configs (no weights)."""
    root = Path(directory).expanduser()
    field = "config.model.pretrained"
    if not root.is_dir():
        raise FileNotFoundError(f"{field}={str(directory)!r} is not a directory")
    index = _read_json(root / "model_index.json",
                       f"{field} must be a diffusers pipeline directory (save_pretrained layout)")
    for part in _UNSUPPORTED_PARTS:
        if index.get(part) and index[part][0] is not None:
            raise PretrainedError(
                f"{root / 'model_index.json'}: part {part!r} ({index.get('_class_name')}) is not "
                f"supported; Stable Diffusion 1.x / 2.x pipelines have only {PIPELINE_PARTS}")
    for part, (library, classes) in SUPPORTED_CLASSES.items():
        entry = index.get(part)
        if not entry or entry[0] is None:
            raise PretrainedError(f"{root / 'model_index.json'} has no {part!r} entry")
        if entry[1] not in classes:
            raise PretrainedError(
                f"{root / 'model_index.json'}: {part} is {entry[0]}.{entry[1]}; supported: "
                f"{library}.{' / '.join(classes)}")
    text_config = _read_json(root / "text_encoder" / "config.json", "the CLIP text encoder")
    architectures = text_config.get("architectures") or ["CLIPTextModel"]
    if architectures[0] != "CLIPTextModel":
        raise PretrainedError(
            f"{root / 'text_encoder' / 'config.json'}: architecture {architectures[0]!r} is not "
            "supported; Stable Diffusion 1.x / 2.x use CLIPTextModel")
    if not (root / "tokenizer").is_dir():
        raise FileNotFoundError(f"{root / 'tokenizer'} not found: the CLIP tokenizer's files")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    low_res_scheduler, max_noise_level = (
        _read_upscale_parts(root, index) if index.get("_class_name") == UPSCALE_PIPELINE
        else (None, None))
    return Pipeline(
        root=root, model_index=index,
        unet_config=_read_json(root / "unet" / "config.json", "the UNet's architecture"),
        vae_config=_read_json(root / "vae" / "config.json", "the VAE's architecture"),
        text_encoder_config=text_config,
        scheduler_config=_read_json(scheduler_path, "the noise schedule"),
        low_res_scheduler_config=low_res_scheduler,
        max_noise_level=max_noise_level,
    )


def _read_upscale_parts(root: Path, index: dict) -> tuple[dict, int]:
    """(low_res_scheduler config, max_noise_level) of an upscale pipeline's directory."""
    where = root / "model_index.json"
    entry = index.get("low_res_scheduler")
    if not entry or entry[0] is None:
        raise PretrainedError(
            f"{where}: a {UPSCALE_PIPELINE} needs a 'low_res_scheduler' entry (the noise "
            "augmentation schedule of its low-resolution input)")
    if entry[1] != "DDPMScheduler":
        raise PretrainedError(f"{where}: low_res_scheduler is {entry[0]}.{entry[1]}; supported: "
                              "diffusers.DDPMScheduler")
    max_noise_level = index.get("max_noise_level", UPSCALE_MAX_NOISE_LEVEL)
    if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int) \
            or max_noise_level < 0:
        raise PretrainedError(
            f"{where}: max_noise_level={max_noise_level!r} must be a non-negative int")
    config = _read_json(root / "low_res_scheduler" / "scheduler_config.json",
                        "the low-resolution input's noise schedule")
    return config, max_noise_level


def diffusion_fields_from_scheduler(scheduler: Mapping[str, Any]) -> tuple[dict, dict, list]:
    """(config.diffusion fields, config.sample fields, notes on what is not carried over) from a
    diffusers `scheduler_config.json` dict. Raises PretrainedError for a schedule we cannot
    train with (the training noise would differ)."""
    name = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None:
        raise PretrainedError("scheduler: trained_betas (an explicit beta list) is not supported")
    if name not in BETA_SCHEDULES:
        raise PretrainedError(
            f"scheduler: beta_schedule={name!r} is not supported; supported: "
            f"{tuple(BETA_SCHEDULES)}")
    diffusion = {
        "schedule": BETA_SCHEDULES[name],
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "beta_start": float(scheduler.get("beta_start", 0.0001)),
        "beta_end": float(scheduler.get("beta_end", 0.02)),
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "rescale_zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
    }
    sample = {
        "timestep_spacing": scheduler.get("timestep_spacing", "leading"),
        "steps_offset": int(scheduler.get("steps_offset", 0)),
    }
    notes = []
    for key, same in _SAMPLING_ONLY_OPTIONS.items():
        if key in scheduler and same is not None and scheduler[key] != same:
            notes.append(f"{key}={scheduler[key]!r} (sampling only) is not carried over")
    if scheduler.get("set_alpha_to_one") is False:
        notes.append("set_alpha_to_one=False: our DDIM's final step goes to alpha_cumprod 1 "
                     "(a difference in the last step only)")
    return diffusion, sample, notes


def low_res_fields(pipeline: Pipeline) -> dict:
    """config.model.low_res of an upscale pipeline (diffusion.low_res): the low-resolution
    image has the latents' size (factor = the VAE's), noised on low_res_scheduler's schedule."""
    where = pipeline.root / "low_res_scheduler" / "scheduler_config.json"
    try:
        diffusion, _, _ = diffusion_fields_from_scheduler(pipeline.low_res_scheduler_config)
    except PretrainedError as error:
        raise PretrainedError(f"{where}: {error}") from None
    if diffusion["rescale_zero_terminal_snr"]:
        # The augmentation's schedule has no such option (diffusion.low_res.low_res_from_config).
        raise PretrainedError(f"{where}: rescale_betas_zero_snr=True is not supported for the "
                              "low-resolution noise schedule")
    return {
        "factor": pipeline.vae_scale_factor,
        "max_noise_level": pipeline.max_noise_level,
        "schedule": diffusion["schedule"],
        "num_train_timesteps": diffusion["num_train_timesteps"],
        "beta_start": diffusion["beta_start"],
        "beta_end": diffusion["beta_end"],
    }


def unet_fields(pipeline: Pipeline, image_size: int, remat: bool) -> dict:
    """config.model.unet from the pipeline's UNet config; `sample_size` set to the latent size of
    `image_size` images (a UNet is convolutional: it fine-tunes at other sizes than its own).
    An upscale pipeline's UNet also reads the low-resolution image (3 more input channels) and
    its noise level (a class-embedding row per level 0..max_noise_level)."""
    try:
        kwargs = unet_kwargs_from_diffusers_config(pipeline.unet_config)
    except ValueError as error:
        raise PretrainedError(f"{pipeline.root / 'unet' / 'config.json'}: {error}") from None
    factor = pipeline.vae_scale_factor
    levels = len(kwargs.get("block_out_channels", ()))
    multiple = factor * 2 ** (levels - 1)
    if image_size % multiple:
        raise PretrainedError(
            f"config.data.image_size={image_size} must be a multiple of {multiple} (the VAE "
            f"downsamples {factor}x, the UNet {2 ** (levels - 1)}x more)")
    where = pipeline.root / "unet" / "config.json"
    if pipeline.is_upscaler:
        expected = pipeline.latent_channels + LOW_RES_CHANNELS
        if kwargs.get("in_channels") != expected:
            raise PretrainedError(
                f"{where}: in_channels={kwargs.get('in_channels')} must be {expected} for a "
                f"{UPSCALE_PIPELINE}: the VAE's latent_channels={pipeline.latent_channels} + "
                f"{LOW_RES_CHANNELS} low-resolution image channels")
        classes = kwargs.get("num_class_embeds")
        if kwargs.get("class_embed_type") is not None or not classes \
                or classes <= pipeline.max_noise_level:
            raise PretrainedError(
                f"{where}: num_class_embeds={classes!r} (class_embed_type="
                f"{kwargs.get('class_embed_type')!r}) cannot embed the noise levels 0.."
                f"{pipeline.max_noise_level} (max_noise_level in model_index.json): an upscale "
                "pipeline's UNet needs class_embed_type None and num_class_embeds > "
                "max_noise_level")
    elif kwargs.get("in_channels") != pipeline.latent_channels:
        raise PretrainedError(
            f"unet in_channels={kwargs.get('in_channels')} differs from the VAE's "
            f"latent_channels={pipeline.latent_channels}")
    kwargs["sample_size"] = image_size // factor
    kwargs["remat"] = bool(remat)
    return kwargs


def resolve_pretrained_config(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(a copy of `config` with the fields the pipeline fixes, lines saying what was taken).

    Without `model.pretrained` the config is returned unchanged. Idempotent: a resumed run
    resolves its saved config to the same fields. What the directory fixes (every architecture
    field of the UNet and the text encoder, the noise schedule, the prediction type) overrides
    the config file and `--config` flags; `model.unet.remat`, `model.dtype` and the training and
    sampling settings stay the user's.
    """
    directory = config.model.get("pretrained", "")
    if directory is None:  # a config_dict.placeholder: the config needs a directory
        raise PretrainedError(
            "config.model.pretrained is not set: this config fine-tunes a diffusers pipeline "
            "directory; pass --config.model.pretrained=DIR")
    if not directory:
        return config, []
    pipeline = read_pipeline(directory)
    diffusion, sample, notes = diffusion_fields_from_scheduler(pipeline.scheduler_config)
    unet = unet_fields(pipeline, int(config.data.image_size),
                       config.model.unet.get("remat", False))
    text = {"kind": "clip", "pretrained_path": str(pipeline.root), "max_length": 0,
            "pooling": "eos"}
    low_res = low_res_fields(pipeline) if pipeline.is_upscaler else None
    if low_res is None and is_super_resolution(config.model):
        raise PretrainedError(
            f"config.model.low_res asks for a super-resolution model, but "
            f"config.model.pretrained={str(pipeline.root)!r} is a "
            f"{pipeline.model_index.get('_class_name')}, not a {UPSCALE_PIPELINE}")
    # The user's level is kept (train.config_check checks it against max_noise_level).
    noise_level = config.sample.get("noise_level", DEFAULT_SAMPLE_NOISE_LEVEL)
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model.unet = ml_collections.ConfigDict(unet)
        if low_res is not None:
            resolved.model.low_res = ml_collections.ConfigDict(low_res)
            resolved.sample.noise_level = noise_level
        for key, value in text.items():
            resolved.model.text_encoder[key] = value
        for key, value in diffusion.items():
            resolved.diffusion[key] = value
        for key, value in sample.items():
            resolved.sample[key] = value
    lines = [f"model.pretrained={str(pipeline.root)!r} ({pipeline.model_index.get('_class_name')}"
             f", VAE factor {pipeline.vae_scale_factor}, {pipeline.latent_channels} latent "
             "channels)"]
    lines.append("model.unet from unet/config.json: " + ", ".join(
        f"{k}={v!r}" for k, v in sorted(unet.items())))
    lines.append("model.text_encoder from text_encoder/ + tokenizer/: " + ", ".join(
        f"{k}={v!r}" for k, v in text.items()) + f" (hidden_act="
        f"{pipeline.text_encoder_config.get('hidden_act', 'quick_gelu')!r})")
    lines.append("diffusion from scheduler/scheduler_config.json: " + ", ".join(
        f"{k}={v!r}" for k, v in diffusion.items()))
    lines.append("sample from scheduler/scheduler_config.json: " + ", ".join(
        f"{k}={v!r}" for k, v in sample.items()))
    lines.extend(f"scheduler: {note}" for note in notes)
    if low_res is not None:
        lines.append("model.low_res from low_res_scheduler/ and model_index.json: " + ", ".join(
            f"{k}={v!r}" for k, v in low_res.items()) + f"; sample.noise_level={noise_level}")
    lines.extend(f"{part} in model_index.json is not applied by our sampler"
                 for part in pipeline.ignored_parts)
    return resolved, lines


def unet_weights_file(unet_dir: str | Path) -> Path:
    unet_dir = Path(unet_dir)
    for name in UNET_WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    if (unet_dir / "diffusion_pytorch_model.bin").is_file():
        raise PretrainedError(
            f"{unet_dir} holds PyTorch pickle weights (diffusion_pytorch_model.bin) only; save "
            "the pipeline with safe_serialization=True (safetensors)")
    raise FileNotFoundError(f"no UNet weights in {unet_dir}: expected one of {UNET_WEIGHT_FILES}")


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or an index-sharded set)."""
    from safetensors import safe_open

    if path.name.endswith(".index.json"):
        weight_map = _read_json(path, "the sharded weights' index")["weight_map"]
        return {name: path.parent / shard for name, shard in weight_map.items()}
    with safe_open(str(path), framework="numpy") as handle:
        return dict.fromkeys(handle.keys(), path)


def _flax_shape(leaf: str, torch_shape) -> tuple:
    torch_shape = tuple(torch_shape)
    if leaf != "kernel":
        return torch_shape
    return (*torch_shape[2:], torch_shape[1], torch_shape[0])


def _shard_reader(tensor, is_kernel: bool, dtype, ndim: int):
    """index (slices in the Flax layout) -> that block of a safetensors tensor, as `dtype`."""

    def read(index):
        index = tuple(index) + (slice(None),) * (ndim - len(index))
        if not is_kernel:
            return np.asarray(tensor[index]).astype(dtype)
        # Flax (*spatial, in, out) <- torch (out, in, *spatial): read the torch block, permute.
        block = np.asarray(tensor[(index[-1], index[-2], *index[:-2])])
        return np.transpose(block, (*range(2, ndim), 1, 0)).astype(dtype)

    return read


def load_unet_params(unet_dir: str | Path, abstract_params, shardings):
    """The UNet parameters of a diffusers `unet/` directory, each placed on its sharding.

    `abstract_params`: the UNet's nnx.State of abstract parameters (what `nnx.split` of an
    `nnx.eval_shape` UNet gives); `shardings`: the same tree with a NamedSharding per parameter
    (train.sharding.tree_shardings). Each device's shard is read from disk as a slice of the
    tensor (safetensors reads slices without loading the rest), converted to the Flax layout
    and cast to the parameter's dtype, so no device or host holds a whole large tensor more
    than once. Raises PretrainedError naming every missing, unexpected or mis-shaped tensor.
    """
    from safetensors import safe_open

    files = _tensor_files(unet_weights_file(unet_dir))
    flat_abstract = nnx.to_flat_state(abstract_params)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    missing, mismatched, expected = [], [], {}
    handles: dict[Path, Any] = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="numpy")
        return handles[path]

    for path, variable in flat_abstract:
        name = torch_name(path)
        expected[name] = path
        if name not in files:
            missing.append(name)
            continue
        torch_shape = handle(files[name]).get_slice(name).get_shape()
        shape = _flax_shape(str(path[-1]), torch_shape)
        if shape != tuple(variable.shape):
            mismatched.append(f"{name}: checkpoint {tuple(torch_shape)} (torch layout) vs model "
                              f"{tuple(variable.shape)} (flax layout)")
    unexpected = sorted(set(files) - set(expected))
    problems = [f"{label} ({len(names)}): {'; '.join(names[:10])}"
                for label, names in (("missing from checkpoint", missing),
                                     ("unexpected in checkpoint", unexpected),
                                     ("shape mismatch", mismatched)) if names]
    if problems:
        raise PretrainedError(f"cannot load the UNet from {unet_dir}: " + " | ".join(problems))

    placed = []
    for path, variable in flat_abstract:
        name = torch_name(path)
        read = _shard_reader(handle(files[name]).get_slice(name), str(path[-1]) == "kernel",
                             variable.dtype, len(variable.shape))
        sharding = flat_shardings[path].get_value()
        placed.append((path, variable.replace(
            jax.make_array_from_callback(tuple(variable.shape), sharding, read))))
    handles.clear()
    return nnx.from_flat_state(placed)


def load_pipeline_vae(directory: str | Path, *, dtype):
    """(AutoencoderKL module, info) of the pipeline's `vae/` (models.vae.load_vae).

    An upscale pipeline's latents are scaled by 0.08333 whatever its VAE config says, as
    diffusers' StableDiffusionUpscalePipeline does (a warning when the config disagrees)."""
    from models.vae import load_vae

    root = Path(directory).expanduser()
    vae, info = load_vae(root / "vae", dtype=dtype)
    index_path = root / "model_index.json"
    index = _read_json(index_path, "the pipeline's parts") if index_path.is_file() else {}
    if index.get("_class_name") == UPSCALE_PIPELINE:
        stated = _read_json(root / "vae" / "config.json", "the VAE's architecture").get(
            "scaling_factor")
        if stated != UPSCALE_LATENT_SCALING:
            logging.warning(
                "%s: scaling_factor=%r; using %s, the latent scaling of %s (as diffusers does)",
                root / "vae" / "config.json", stated, UPSCALE_LATENT_SCALING, UPSCALE_PIPELINE)
        info = {**info, "scaling_factor": UPSCALE_LATENT_SCALING}
    return vae, info
