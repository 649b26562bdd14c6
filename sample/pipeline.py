"""Sampling from a training workdir: restore EMA weights, encode prompts, denoise, write files."""

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from diffusion.schedules import make_schedule
from models.factory import abstract_unet, build_frozen_text_encoder, text_conditioning_fn
from sample.denoise import denoise_fn_from_config, image_grid, image_keys, to_uint8
from train import checkpoint
from train.sharding import batch_sharding, make_mesh, replicated, tree_shardings


class EmptyPromptListError(ValueError):
    """Nothing to sample."""


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


def load_model(workdir: str, step: int | None = None) -> LoadedModel:
    """The EMA UNet of the latest (or given) checkpoint, with the config saved beside it."""
    config = checkpoint.load_config(workdir)
    step = checkpoint.resolve_step(workdir, step)
    mesh = make_mesh([("data", -1)])
    unet_graphdef, abstract_params = abstract_unet(config.model)
    params, _ = checkpoint.restore_ema_params(
        workdir, step, abstract_params, tree_shardings(mesh, abstract_params)
    )
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(config.model, workdir)
    text_params = jax.device_put(text_params, replicated(mesh))
    return LoadedModel(config, step, unet_graphdef, params, tokenizer, text_graphdef,
                       text_params, mesh)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    sampler: str
    steps: int
    cfg_scale: float
    eta: float
    seed: int
    num_images_per_prompt: int = 1
    negative_prompt: str = ""


def options_from_config(config, **overrides) -> SampleOptions:
    s = config.sample
    values = dict(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, eta=s.eta,
                  seed=config.seed)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SampleOptions(**values)


def read_prompts(prompts: Sequence[str] = (), prompts_file: str | None = None) -> list[str]:
    collected = list(prompts or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            collected += [line.strip() for line in f if line.strip()]
    collected = [p for p in collected if p is not None]
    if not collected:
        where = f" ({prompts_file} has no non-empty lines)" if prompts_file else ""
        raise EmptyPromptListError(f"no prompts to sample{where}: pass --prompt or --prompts_file")
    return collected


def generate(model: LoadedModel, prompts: Sequence[str], options: SampleOptions,
             *, batch_size: int | None = None, progress: bool = True):
    """Images (uint8 [N,H,W,3]) and one record per image, prompts repeated per image.

    Image i uses key fold_in(seed, i): the same seed gives the same image whatever the batch
    size or device count.
    """
    if not prompts:
        raise EmptyPromptListError("no prompts to sample")
    too_long = model.tokenizer.truncated(list(dict.fromkeys(prompts)))
    if too_long:
        logging.warning(
            "%d prompt(s) exceed the text encoder's %d tokens and are cut off at the end, "
            "e.g. %r", len(too_long), model.tokenizer.max_length, too_long[0],
        )
    config = model.config
    diffusion = config.diffusion
    schedule = make_schedule(diffusion.schedule, diffusion.num_train_timesteps,
                             diffusion.beta_start, diffusion.beta_end)
    denoise = denoise_fn_from_config(
        model.unet_graphdef, schedule, config, sampler=options.sampler, steps=options.steps,
        cfg_scale=options.cfg_scale, eta=options.eta,
    )
    devices = model.mesh.size
    batch_size = batch_size or config.sample.batch_size
    batch_size = max(devices, -(-batch_size // devices) * devices)  # a multiple of the devices
    data = batch_sharding(model.mesh, ("data",))
    rep = replicated(model.mesh)
    param_shardings = jax.tree_util.tree_map(lambda _: rep, model.params)
    jitted = jax.jit(denoise, in_shardings=(param_shardings, data, data, data),
                     out_shardings=data)
    encode = jax.jit(text_conditioning_fn(config.model, model.tokenizer, model.text_graphdef),
                     out_shardings=data)

    per_image_prompts = [p for p in prompts for _ in range(options.num_images_per_prompt)]
    total = len(per_image_prompts)
    outputs = []
    for start in tqdm(range(0, total, batch_size), desc="sample", unit="batch",
                      disable=not progress or total <= batch_size):
        chunk = per_image_prompts[start:start + batch_size]
        pad = batch_size - len(chunk)
        ids = model.tokenizer(chunk + [chunk[-1]] * pad)
        neg = model.tokenizer([options.negative_prompt] * batch_size)
        indices = np.arange(start, start + batch_size)
        keys = jax.device_put(image_keys(options.seed, indices), data)
        context = encode(model.text_params, jax.device_put(jnp.asarray(ids), data))
        uncond = encode(model.text_params, jax.device_put(jnp.asarray(neg), data))
        images = to_uint8(jitted(model.params, context, uncond, keys))
        outputs.append(images[: len(chunk)])
    images = np.concatenate(outputs)
    records = [
        {
            "prompt": prompt,
            "negative_prompt": options.negative_prompt,
            "seed": options.seed,
            "image_index": index,
            "steps": options.steps,
            "cfg_scale": options.cfg_scale,
            "sampler": options.sampler,
            "eta": options.eta,
            "checkpoint_step": model.step,
        }
        for index, prompt in enumerate(per_image_prompts)
    ]
    return images, records


def write_outputs(out_dir: str, images: np.ndarray, records: list[dict],
                  *, columns: int | None = None) -> dict:
    """One PNG per image (settings in PNG text chunks), grid.png and manifest.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.jsonl")
    with open(manifest_path, "w", encoding="utf-8") as manifest:
        for image, record in zip(images, records, strict=True):
            name = f"{record['image_index']:05d}.png"
            info = PngImagePlugin.PngInfo()
            for key, value in record.items():
                info.add_text(key, str(value))
            Image.fromarray(image).save(os.path.join(out_dir, name), pnginfo=info)
            manifest.write(json.dumps({"file": name, **record}) + "\n")
    grid_path = os.path.join(out_dir, "grid.png")
    Image.fromarray(image_grid(images, columns)).save(grid_path)
    return {"manifest": manifest_path, "grid": grid_path, "count": len(records)}
