"""Sampling from a training workdir: restore the EMA UNet, stream prompts, batch them over all
devices of all hosts, write PNGs and a manifest as batches finish.

The denoising loop itself is `diffusion.sampling`; this module is I/O and batching.

Determinism: image (prompt, seed, image index) gets the key fold_in(PRNGKey(seed), image index)
and is computed by the same per-device program whatever the device or host count (the loop runs
under shard_map, one per-device batch of `batch_size` images, conditional and unconditional
halves side by side on the same device), so it is bitwise identical on CPU for a given
per-device batch size. Across per-device batch sizes XLA may order float reductions
differently: measured, at most one uint8 level on a few pixels.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from diffusion.low_res import (
    DEFAULT_SAMPLE_NOISE_LEVEL,
    LowResConditioning,
    low_res_from_config,
    with_low_res_inputs,
)
from diffusion.sampling import (
    image_grid,
    make_denoise_fn,
    make_solver,
    to_uint8,
)
from diffusion.schedules import schedule_from_config
from models.factory import (
    abstract_trainable_unet,
    build_frozen_text_encoder,
    build_frozen_vae,
    denoiser_apply_fn,
    latent_decoder_fn,
    text_conditioning_fn,
)
from sample.prompts import (
    EmptyPromptListError,
    PromptDefaults,
    PromptSpec,
    iter_prompt_specs,
    scan_prompts,
)
from train import checkpoint
from train.sharding import make_mesh, replicated

MANIFEST = "manifest.jsonl"
_PART_GLOB = "manifest.part-*.jsonl"

__all__ = [
    "EmptyPromptListError", "LoadedModel", "SampleOptions", "generate", "load_model",
    "make_latent_image_fn", "options_from_config", "read_prompts", "sample_to_dir",
    "write_outputs",
]


def make_latent_image_fn(apply_fn, solver, latent_shape, decode, *,
                         guidance_rescale: float = 0.0):
    """images(params, vae_params, cond, uncond, seeds, image_indices, cfg_scales) -> images in
    [-1, 1]: `diffusion.sampling.make_denoise_fn`'s loop over latents of `latent_shape` (same
    keys: an image's latent noise depends only on its seed and index), then
    `decode(vae_params, latents)`. The clip to [-1, 1] comes after decoding: scaled latents are
    about unit variance, not a pixel range.
    """
    denoise = make_denoise_fn(apply_fn, solver, latent_shape, guidance_rescale=guidance_rescale,
                              clip=False)

    def images(params, vae_params, cond, uncond, seeds, image_indices, cfg_scales):
        latents = denoise(params, cond, uncond, seeds, image_indices, cfg_scales)
        return jnp.clip(decode(vae_params, latents), -1.0, 1.0)

    return images


@dataclasses.dataclass
class LoadedModel:
    config: ml_collections.ConfigDict
    step: int
    unet_graphdef: object
    params: object
    tokenizer: object
    text_graphdef: object
    text_params: object
    mesh: jax.sharding.Mesh
    # Latent models (`model.pretrained`): the frozen VAE's parameters and decoder.
    vae_params: object = None
    decode_latents: object = None
    # Super-resolution models (`model.low_res`): their low-res conditioning. None otherwise.
    low_res: LowResConditioning | None = None

    @property
    def image_size(self) -> int:
        """Side of the images the model makes (pixels, after any VAE decode)."""
        return int(self.config.data.image_size)

    @property
    def low_res_size(self) -> int | None:
        """Side of the low-resolution images a super-resolution model takes; None otherwise."""
        return None if self.low_res is None else self.low_res.low_res_size(self.image_size)


def with_lora_files(model: LoadedModel, paths: Sequence[str], *, scale: float = 1.0,
                    merge: bool = True) -> LoadedModel:
    """`model` with LoRA files (ours, diffusers / PEFT, kohya-ss) applied to its UNet and, where
    a file has one, its text encoder, each at `scale` x alpha / rank. `merge` folds them into
    the weights (no extra matmuls per step); otherwise they stay separate adapter layers."""
    from models.lora import apply_lora_weights, load_lora_file

    if not paths:
        return model
    # Copies: merging writes into the kernels, and `model` must stay as it was.
    unet = nnx.merge(model.unet_graphdef, model.params, copy=True)
    text = nnx.merge(model.text_graphdef, model.text_params, copy=True)
    for path in paths:
        lora = load_lora_file(path)
        if "unet" in lora:
            apply_lora_weights(unet, lora, scale=scale, merge=merge)
        if "text_encoder" in lora:
            apply_lora_weights(text, lora, component="text_encoder", scale=scale, merge=merge)
    rep = replicated(model.mesh)
    unet_graphdef, params = nnx.split(unet)
    text_graphdef, text_params = nnx.split(text)
    return dataclasses.replace(
        model, unet_graphdef=unet_graphdef, params=jax.device_put(params, rep),
        text_graphdef=text_graphdef, text_params=jax.device_put(text_params, rep))


def load_model(workdir: str, step: int | None = None, *, devices=None,
               merge_lora: bool = True) -> LoadedModel:
    """The EMA UNet of the latest (or given) checkpoint, with the config saved beside it,
    parameters replicated over a 1-D ("data",) mesh of `devices` (default: all). A LoRA run's
    checkpoint holds adapters: they go on the frozen UNet of its `model.pretrained`, folded
    into its kernels (`merge_lora`, no extra matmuls per solver step) or as adapter layers."""
    from models import lora
    from models.pretrained import load_unet_params

    step = checkpoint.resolve_step(workdir, step)
    config = checkpoint.load_config(workdir, step)
    mesh = make_mesh([("data", -1)], devices=devices)
    unet_graphdef, abstract_params, abstract_base = abstract_trainable_unet(
        config.model, remat=False)
    # Parameter shapes that do not fit the stored config fail here with the names, not deep
    # inside Orbax.
    checkpoint.check_compatible(workdir, step, config, abstract_params)
    rep = replicated(mesh)
    everywhere = lambda tree: jax.tree_util.tree_map(lambda _: rep, tree)
    params, _ = checkpoint.restore_ema_params(workdir, step, abstract_params,
                                              everywhere(abstract_params))
    if abstract_base is not None:
        base = load_unet_params(f"{config.model.pretrained}/unet", abstract_base,
                                everywhere(abstract_base))
        params = lora.merge_params(base, params)
        if merge_lora:
            unet = nnx.merge(unet_graphdef, params)
            lora.merge_lora(unet)
            unet_graphdef, params = nnx.split(unet)
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(config.model, workdir)
    text_params = jax.device_put(text_params, rep)
    # The saved config names the pretrained directory: the VAE is read from there.
    vae = build_frozen_vae(config.model)
    return LoadedModel(config, step, unet_graphdef, params, tokenizer, text_graphdef,
                       text_params, mesh,
                       vae_params=None if vae is None else jax.device_put(vae.params, rep),
                       decode_latents=None if vae is None else latent_decoder_fn(vae),
                       low_res=low_res_from_config(config.model))


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    sampler: str
    steps: int
    cfg_scale: float
    eta: float
    seed: int
    num_images_per_prompt: int = 1
    negative_prompt: str = ""
    karras_sigmas: bool = False
    guidance_rescale: float = 0.0
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    # Super-resolution models: the noise level of the low-res input (config.sample.noise_level).
    noise_level: int = DEFAULT_SAMPLE_NOISE_LEVEL

    def defaults(self) -> PromptDefaults:
        return PromptDefaults(seed=self.seed, cfg_scale=self.cfg_scale,
                              num_images=self.num_images_per_prompt, steps=self.steps,
                              negative_prompt=self.negative_prompt)


def options_from_config(config, **overrides) -> SampleOptions:
    s = config.sample
    values = dict(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, eta=s.eta,
                  seed=config.seed, karras_sigmas=bool(s.get("karras_sigmas", False)),
                  guidance_rescale=float(s.get("guidance_rescale", 0.0)),
                  timestep_spacing=s.timestep_spacing, steps_offset=int(s.get("steps_offset", 0)),
                  noise_level=int(s.get("noise_level", DEFAULT_SAMPLE_NOISE_LEVEL)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SampleOptions(**values)


def read_prompts(prompts: Sequence[str] = (), prompts_file: str | None = None) -> list[str]:
    """Plain prompt list (for small runs and tests): --prompt values, then the file's lines."""
    defaults = PromptDefaults(seed=0, cfg_scale=1.0, num_images=1, steps=1)
    scan_prompts(prompts, prompts_file, defaults)
    return [spec.prompt for spec in iter_prompt_specs(prompts, prompts_file, defaults)]


@dataclasses.dataclass(frozen=True)
class ImageJob:
    spec: PromptSpec
    image_index: int
    # Super-resolution: the low-res input (uint8 [h, w, 3]) and the name it goes by in the
    # output file name ("" keeps the plain name) and the manifest.
    low_res: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    low_res_name: str = ""
    low_res_source: str = ""

    @property
    def name(self) -> str:
        suffix = f"_{self.low_res_name}" if self.low_res_name else ""
        return f"{self.spec.index:06d}_{self.image_index:03d}{suffix}.png"


class Sampler:
    """Compiled programs for one model and options, one per step count, each compiled once."""

    def __init__(self, model: LoadedModel, options: SampleOptions, per_device_batch: int):
        self.model = model
        self.options = options
        self.per_device_batch = per_device_batch
        self.global_batch = per_device_batch * model.mesh.size
        config = model.config
        self.schedule = schedule_from_config(config.diffusion)
        # Latent models denoise latents of the UNet's sample size; pixel models images.
        size = config.model.unet.sample_size
        self.image_shape = (size, size, config.model.unet.out_channels)
        self.data = NamedSharding(model.mesh, P("data"))
        self._programs = {}
        # The text encoder too runs per device on its own rows (see program()).
        self._encode = jax.jit(jax.shard_map(
            text_conditioning_fn(config.model, model.tokenizer, model.text_graphdef),
            mesh=model.mesh, in_specs=(P(), P("data")), out_specs=P("data"), check_vma=False))

    def program(self, steps: int):
        if steps not in self._programs:
            options, graphdef = self.options, self.model.unet_graphdef
            solver = make_solver(options.sampler, self.schedule,
                                 self.model.config.diffusion.prediction_type, steps,
                                 timestep_spacing=options.timestep_spacing,
                                 karras_sigmas=options.karras_sigmas, eta=options.eta,
                                 steps_offset=options.steps_offset)

            low_res = self.model.low_res
            apply = denoiser_apply_fn(graphdef, super_resolution=low_res is not None)
            batched = P("data")
            if self.model.decode_latents is None:
                denoise = make_denoise_fn(apply, solver, self.image_shape,
                                          guidance_rescale=options.guidance_rescale)
                params_specs = (P(),)
            else:
                denoise = make_latent_image_fn(apply, solver, self.image_shape,
                                               self.model.decode_latents,
                                               guidance_rescale=options.guidance_rescale)
                params_specs = (P(), P())
            extra_specs = ()
            if low_res is not None:  # + the low-res images and their noise levels
                denoise = with_low_res_inputs(denoise, low_res)
                extra_specs = (batched, batched)
            # shard_map: every device runs the one-device program on its own rows, so an
            # image does not depend on the device count.
            mapped = jax.shard_map(denoise, mesh=self.model.mesh,
                                   in_specs=(*params_specs, batched, batched, batched, batched,
                                             batched, *extra_specs),
                                   out_specs=batched, check_vma=False)
            self._programs[steps] = jax.jit(mapped)
        return self._programs[steps]

    def _global(self, host_array: np.ndarray) -> jax.Array:
        # Every host holds the whole batch's inputs (cheap: token ids and scalars) and hands
        # JAX the rows of its own devices.
        return jax.make_array_from_callback(host_array.shape, self.data,
                                            lambda index: host_array[index])

    def run(self, jobs: Sequence[ImageJob]) -> dict[int, np.ndarray]:
        """Images (uint8) of this host's rows of one global batch, by position in `jobs`."""
        steps = jobs[0].spec.steps
        padded = list(jobs) + [jobs[-1]] * (self.global_batch - len(jobs))
        tokenizer = self.model.tokenizer
        ids = np.asarray(tokenizer([j.spec.prompt for j in padded]), np.int32)
        neg = np.asarray(tokenizer([j.spec.negative_prompt for j in padded]), np.int32)
        seeds = np.asarray([j.spec.seed for j in padded], np.uint32)
        indices = np.asarray([j.image_index for j in padded], np.uint32)
        scales = np.asarray([j.spec.cfg_scale for j in padded], np.float32)
        text_params = self.model.text_params
        cond = self._encode(text_params, self._global(ids))
        uncond = self._encode(text_params, self._global(neg))
        frozen = () if self.model.vae_params is None else (self.model.vae_params,)
        extra = ()
        if self.model.low_res is not None:
            missing = [j.name for j in padded if j.low_res is None]
            if missing:
                raise ValueError(f"{missing[0]}: a super-resolution model needs a low-res image "
                                 "for every image it makes")
            low = np.stack([j.low_res for j in padded]).astype(np.float32) / 127.5 - 1.0
            levels = np.full((len(padded),), self.options.noise_level, np.int32)
            extra = (self._global(low), self._global(levels))
        images = self.program(steps)(self.model.params, *frozen, cond, uncond,
                                     self._global(seeds), self._global(indices),
                                     self._global(scales), *extra)
        rows = {}
        for shard in images.addressable_shards:
            start = shard.index[0].start or 0
            block = to_uint8(shard.data)
            for offset, image in enumerate(block):
                if start + offset < len(jobs):
                    rows[start + offset] = image
        return rows


def _record(job: ImageJob, options: SampleOptions, checkpoint_step: int) -> dict:
    spec = job.spec
    return {"file": job.name, "prompt_index": spec.index, "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt, "seed": spec.seed,
            "image_index": job.image_index, "steps": spec.steps, "cfg_scale": spec.cfg_scale,
            "sampler": options.sampler, "eta": options.eta,
            "karras_sigmas": options.karras_sigmas,
            "guidance_rescale": options.guidance_rescale, "checkpoint_step": checkpoint_step,
            **({"low_res": job.low_res_source or job.low_res_name,
                "noise_level": options.noise_level} if job.low_res is not None else {})}


def _save_png(path: str, image: np.ndarray, record: dict) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in record.items():
        info.add_text(key, str(value))
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)  # a kill never leaves a truncated PNG under the final name


def _read_manifest_entries(out_dir: str) -> dict[str, dict]:
    entries = {}
    for path in [os.path.join(out_dir, MANIFEST), *sorted(glob.glob(
            os.path.join(out_dir, _PART_GLOB)))]:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that image is redone
                if os.path.exists(os.path.join(out_dir, entry["file"])):
                    entries[entry["file"]] = entry
    return entries


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# low_res_for(spec, image_index) -> [(name, source, uint8 [h, w, 3])]: the low-res inputs of
# one (prompt, image index), one output image each; None for a text-to-image model.
LowResFor = Callable[[PromptSpec, int], Sequence[tuple[str, str, np.ndarray]]]


def _jobs(specs: Iterable[PromptSpec], done: set[str],
          low_res_for: LowResFor | None = None) -> Iterator[ImageJob]:
    for spec in specs:
        for image_index in range(spec.num_images):
            if low_res_for is None:
                inputs = [(None, "", "")]
            else:
                inputs = [(array, name, source)
                          for name, source, array in low_res_for(spec, image_index)]
            for array, name, source in inputs:
                job = ImageJob(spec, image_index, array, name, source)
                if job.name not in done:
                    yield job


def _batches(jobs: Iterable[ImageJob], size: int) -> Iterator[list[ImageJob]]:
    """Global batches of one step count each (the step count sets the compiled program)."""
    pending: dict[int, list[ImageJob]] = {}
    for job in jobs:
        bucket = pending.setdefault(job.spec.steps, [])
        bucket.append(job)
        if len(bucket) == size:
            yield pending.pop(job.spec.steps)
    for bucket in pending.values():
        yield bucket


def sample_to_dir(model: LoadedModel, prompts: Sequence[str], prompts_file: str | None,
                  options: SampleOptions, out_dir: str, *, batch_size: int | None = None,
                  grid: bool = True, grid_max_images: int = 64, progress: bool = True,
                  low_res_for: LowResFor | None = None, low_res_per_image: int = 1) -> dict:
    """Samples every (prompt, image) not already in `out_dir`, writing as batches finish.

    A super-resolution model needs `low_res_for` (see LowResFor; `low_res_per_image` outputs
    per (prompt, image index), for the count): `low_res_images` for given files, or
    `sample_cascade` for a base model's outputs.

    batch_size is per device (default config.sample.batch_size). Each host writes the images
    of its own devices and appends to its manifest part; at the end process 0 merges the
    parts into manifest.jsonl (one entry per image, in prompt order). A rerun skips images
    already listed with their PNG present, so a killed run resumes.
    """
    _check_low_res_use(model, low_res_for is not None, options)
    defaults = options.defaults()
    totals = dict(scan_prompts(prompts, prompts_file, defaults))
    totals["images"] *= low_res_per_image
    per_device = batch_size or model.config.sample.batch_size
    if per_device < 1:
        raise ValueError(f"--batch_size must be >= 1, got {per_device}")
    sampler = Sampler(model, options, per_device)
    os.makedirs(out_dir, exist_ok=True)
    done = set(_read_manifest_entries(out_dir))
    # Every host must see the same finished set before anyone writes, or their batches differ.
    _barrier("sample_scan_done")
    process, count = jax.process_index(), jax.process_count()
    part_path = os.path.join(out_dir, f"manifest.part-{process:05d}-of-{count:05d}.jsonl")
    todo = totals["images"] - len(done)
    bar = tqdm(total=totals["images"], initial=len(done), unit="img", desc="sample",
               disable=not progress or process != 0, dynamic_ncols=True)
    written = sampled = 0
    started = time.time()
    with open(part_path, "a", encoding="utf-8") as part:
        specs = iter_prompt_specs(prompts, prompts_file, defaults)
        for jobs in _batches(_jobs(specs, done, low_res_for), sampler.global_batch):
            rows = sampler.run(jobs)
            for position, image in sorted(rows.items()):
                job = jobs[position]
                record = _record(job, options, model.step)
                _save_png(os.path.join(out_dir, job.name), image, record)
                part.write(json.dumps(record) + "\n")
                written += 1
            part.flush()
            bar.update(len(jobs))
            sampled += len(jobs)
            bar.set_postfix(images_per_s=f"{sampled / max(time.time() - started, 1e-9):.2f}")
    bar.close()
    _barrier("sample_written")
    summary = {"images": totals["images"], "skipped": len(done), "sampled": todo,
               "written_by_this_host": written, "manifest": os.path.join(out_dir, MANIFEST),
               "grid": None}
    if process == 0:
        entries = _read_manifest_entries(out_dir)
        ordered = sorted(entries.values(), key=lambda e: (e["prompt_index"], e["image_index"]))
        tmp = os.path.join(out_dir, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in ordered:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, os.path.join(out_dir, MANIFEST))
        for path in glob.glob(os.path.join(out_dir, _PART_GLOB)):
            os.remove(path)
        summary["complete"] = len(ordered)
        if grid and ordered:
            shown = [np.asarray(Image.open(os.path.join(out_dir, e["file"])).convert("RGB"))
                     for e in ordered[:grid_max_images]]
            summary["grid"] = os.path.join(out_dir, "grid.png")
            Image.fromarray(image_grid(np.stack(shown))).save(summary["grid"])
    _barrier("sample_manifest")
    return summary


_SAMPLER_CACHE: dict = {}


def _cached_sampler(model: LoadedModel, options: SampleOptions, per_device_batch: int):
    # Repeated small calls (tests, benchmarks) reuse their compiled programs.
    key = (id(model), options, per_device_batch)
    if key not in _SAMPLER_CACHE or _SAMPLER_CACHE[key].model is not model:
        _SAMPLER_CACHE[key] = Sampler(model, options, per_device_batch)
    return _SAMPLER_CACHE[key]


def generate(model: LoadedModel, prompts: Sequence[str], options: SampleOptions,
             *, batch_size: int | None = None, progress: bool = True,
             low_res: np.ndarray | None = None):
    """In memory, for small runs (tests, the demo's evaluation): uint8 images [N,H,W,3] and one
    record per image, in prompt order, `options.num_images_per_prompt` per prompt.

    batch_size is the global batch (rounded up to a multiple of the device count). A
    super-resolution model takes `low_res`: uint8 [len(prompts), h, w, 3], prompt i upscaling
    low_res[i] (or one [h, w, 3] image for every prompt)."""
    if not prompts:
        raise EmptyPromptListError("no prompts to sample")
    _check_low_res_use(model, low_res is not None, options)
    low_res_for = None
    if low_res is not None:
        low_res = np.asarray(low_res)
        if low_res.ndim == 3:
            low_res = np.broadcast_to(low_res, (len(prompts), *low_res.shape))
        if len(low_res) != len(prompts):
            raise ValueError(f"low_res holds {len(low_res)} images for {len(prompts)} prompts")
        for index, image in enumerate(low_res):
            check_low_res_image(model, image, f"low_res[{index}]")
        low_res_for = lambda spec, image_index: [("", f"low_res[{spec.index}]",
                                                  low_res[spec.index])]
    too_long = model.tokenizer.truncated(list(dict.fromkeys(prompts)))
    if too_long:
        logging.warning(
            "%d prompt(s) exceed the text encoder's %d tokens and are cut off at the end, "
            "e.g. %r", len(too_long), model.tokenizer.max_length, too_long[0])
    devices = model.mesh.size
    global_batch = batch_size or model.config.sample.batch_size
    sampler = _cached_sampler(model, options, max(1, -(-global_batch // devices)))
    defaults = options.defaults()
    specs = list(iter_prompt_specs(prompts, None, defaults))
    jobs = list(_jobs(specs, set(), low_res_for))
    images, records = [], []
    for batch in tqdm(list(_batches(jobs, sampler.global_batch)), desc="sample", unit="batch",
                      disable=not progress):
        rows = sampler.run(batch)
        for position, job in enumerate(batch):
            images.append(rows[position])
            records.append(_record(job, options, model.step))
    order = sorted(range(len(records)),
                   key=lambda i: (records[i]["prompt_index"], records[i]["image_index"]))
    return np.stack([images[i] for i in order]), [records[i] for i in order]


def write_outputs(out_dir: str, images: np.ndarray, records: list[dict],
                  *, columns: int | None = None) -> dict:
    """One PNG per image (settings in PNG text chunks), grid.png and manifest.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    with open(manifest_path, "w", encoding="utf-8") as manifest:
        for image, record in zip(images, records, strict=True):
            _save_png(os.path.join(out_dir, record["file"]), image, record)
            manifest.write(json.dumps(record) + "\n")
    grid_path = os.path.join(out_dir, "grid.png")
    Image.fromarray(image_grid(images, columns)).save(grid_path)
    return {"manifest": manifest_path, "grid": grid_path, "count": len(records)}


# Low-resolution inputs of a super-resolution model ----------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _check_low_res_use(model: LoadedModel, given: bool,
                       options: SampleOptions | None = None) -> None:
    if model.low_res is not None and not given:
        raise ValueError(
            f"checkpoint step {model.step} is a super-resolution model (config.model.low_res, "
            f"{model.low_res_size}x{model.low_res_size} -> {model.image_size}x"
            f"{model.image_size}): give it low-res images (--low_res IMAGE_OR_DIR), or run it "
            "as a base model's --upscaler_workdir")
    if model.low_res is None and given:
        raise ValueError(
            "low-res images were given, but this checkpoint is not a super-resolution model "
            "(its config has no model.low_res); --low_res needs an upscaler's workdir")
    if model.low_res is not None and options is not None and not (
            0 <= options.noise_level <= model.low_res.max_noise_level):
        raise ValueError(f"--noise_level={options.noise_level} must be in [0, "
                         f"{model.low_res.max_noise_level}] (model.low_res.max_noise_level)")


def check_low_res_image(model: LoadedModel, image: np.ndarray, what: str) -> None:
    """Raises ValueError naming `what` unless `image` is the uint8 RGB size the model takes."""
    size = model.low_res_size
    if image.ndim != 3 or image.shape[-1] != 3:
        channels = 1 if image.ndim == 2 else image.shape[-1]
        raise ValueError(f"{what}: {channels} channel(s); the upscaler takes RGB images "
                         f"({size}x{size}x3)")
    if image.shape[:2] != (size, size):
        raise ValueError(
            f"{what}: {image.shape[1]}x{image.shape[0]} pixels; this upscaler takes {size}x{size} "
            f"images (x{model.low_res.factor} -> {model.image_size}x{model.image_size})")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: dtype {image.dtype}; uint8 images expected")


def _read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            mode, array = image.mode, np.asarray(image)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    if mode != "RGB":
        try:
            channels = Image.getmodebands(mode)
        except ValueError:
            channels = "?"
        raise ValueError(f"{path}: image mode {mode!r} ({channels} channel(s)); the upscaler "
                         "takes RGB images")
    return array


def low_res_images(model: LoadedModel, path: str) -> list[tuple[str, str, np.ndarray]]:
    """[(name, path, uint8 [h, w, 3])] of an image file or of every image in a directory
    (sorted by name), each checked against the size the model takes. Raises ValueError naming
    the problem: a missing path, an empty directory, an unreadable, non-RGB or wrong-size
    image."""
    _check_low_res_use(model, True)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"--low_res {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                             "this directory")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"--low_res {path}: no such file or directory")
    images, by_name = [], {}
    for file in files:
        name = os.path.splitext(os.path.basename(file))[0]
        if name in by_name:  # the outputs are named after the inputs
            raise ValueError(f"--low_res {path}: {os.path.basename(by_name[name])} and "
                             f"{os.path.basename(file)} would give their outputs the same names; "
                             "rename one")
        by_name[name] = file
        array = _read_rgb(file)
        check_low_res_image(model, array, file)
        images.append((name, file, array))
    return images


def sample_cascade(base: LoadedModel, upscaler: LoadedModel, prompts: Sequence[str],
                   prompts_file: str | None, base_options: SampleOptions,
                   upscale_options: SampleOptions, out_dir: str, *,
                   batch_size: int | None = None, grid: bool = True,
                   progress: bool = True) -> dict:
    """Base text-to-image samples into `out_dir`/base, then each upscaled by `upscaler` with
    its own prompt into `out_dir` (same file names). Both stages are `sample_to_dir` runs:
    sharded over all devices of all hosts, resumable, with manifests."""
    if base.low_res is not None:
        raise ValueError("the base workdir holds a super-resolution model; the cascade starts "
                         "from a text-to-image model")
    _check_low_res_use(upscaler, True, upscale_options)
    if base.image_size != upscaler.low_res_size:
        raise ValueError(
            f"the base model makes {base.image_size}x{base.image_size} images; the upscaler "
            f"takes {upscaler.low_res_size}x{upscaler.low_res_size} (x{upscaler.low_res.factor}"
            f" -> {upscaler.image_size}x{upscaler.image_size})")
    base_dir = os.path.join(out_dir, "base")
    base_summary = sample_to_dir(base, prompts, prompts_file, base_options, base_dir,
                                 batch_size=batch_size, grid=grid, progress=progress)

    def from_base(spec: PromptSpec, image_index: int):
        name = ImageJob(spec, image_index).name
        path = os.path.join(base_dir, name)
        return [("", os.path.join("base", name), _read_rgb(path))]

    summary = sample_to_dir(upscaler, prompts, prompts_file, upscale_options, out_dir,
                            batch_size=batch_size, grid=grid, progress=progress,
                            low_res_for=from_base)
    summary["base"] = base_summary
    return summary
