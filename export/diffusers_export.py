"""Write a training checkpoint's UNet as a diffusers directory that PyTorch tools load.

`export_checkpoint(workdir, out)` writes `out/unet/` (config.json + safetensors) from the EMA
(or raw) UNet parameters. When the run was a fine-tune of a diffusers pipeline
(`config.model.pretrained`), the pipeline's other parts (VAE, text encoder, tokenizer,
scheduler, ...) are hard-linked (copied across filesystems) beside it with a `model_index.json`,
so `StableDiffusionPipeline.from_pretrained(out)` loads the fine-tuned pipeline.

The checkpoint and its config are read as the sampler reads them (`sample.pipeline.load_model`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.hf_weights import to_torch_state_dict
from models.lora import LORA_PARAMS, export_lora
from models.unet import UNet2DConditionModel

UNET_DIR = "unet"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
MODEL_INDEX = "model_index.json"
# The diffusers release whose UNet2DConditionModel this layout was checked against.
DIFFUSERS_VERSION = "0.42.1"
# Our UNet options diffusers' UNet2DConditionModel cannot represent, with their "off" value.
NOT_IN_DIFFUSERS = {"patch_size": 1, "coordinate_channels": False}
# Options that change how we train or which kernel computes, not the function the network
# computes.
_TRAINING_ONLY = ("remat", "attention")
_NOT_CONFIG = ("self", "dtype", "param_dtype", "rngs")


class ExportError(ValueError):
    """A checkpoint that cannot be written in the diffusers layout (the message names why)."""


def _json_value(value):
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    return value


def diffusers_unet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `unet/config.json` dict for our `config.model.unet` fields: the inverse of
    `models.unet.unet_kwargs_from_diffusers_config`.

    Every architecture argument is written, defaults included (ours differ from diffusers').
    Raises ExportError naming a field with no diffusers equivalent (patch_size > 1,
    coordinate_channels) or unknown to the UNet.
    """
    parameters = inspect.signature(UNet2DConditionModel.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items()
                if name not in _NOT_CONFIG and name not in NOT_IN_DIFFUSERS
                and name not in _TRAINING_ONLY}
    unknown = sorted(set(unet_config) - set(defaults) - set(NOT_IN_DIFFUSERS)
                     - set(_TRAINING_ONLY))
    if unknown:
        raise ExportError(f"config.model.unet has fields the UNet does not take: {unknown}")
    for field, off in NOT_IN_DIFFUSERS.items():
        value = unet_config.get(field, off)
        if value != off:
            raise ExportError(
                f"config.model.unet.{field}={value!r} has no equivalent in diffusers' "
                f"UNet2DConditionModel (export needs {field}={off!r}); this checkpoint cannot "
                "be written in the diffusers layout")
    config = {"_class_name": UNet2DConditionModel.__name__,
              "_diffusers_version": DIFFUSERS_VERSION}
    for name, default in defaults.items():
        config[name] = _json_value(unet_config.get(name, default))
    return config


def _link_or_copy(source: str, destination: str) -> str:
    # A hard link costs no space (VAE and text encoder are GBs for real pipelines); across
    # filesystems, or where links are not allowed, a copy.
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
    return destination


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_unet(directory: str | Path, unet: nnx.Module, unet_config: Mapping[str, Any]) -> Path:
    """Writes `directory/config.json` and the safetensors of `unet` (float32, torch layout)."""
    from safetensors.numpy import save_file

    config = diffusers_unet_config(unet_config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: np.ascontiguousarray(value, dtype=np.float32)
             for name, value in to_torch_state_dict(unet).items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; an export is meant to be shared.
    (directory / WEIGHTS_FILE).chmod(0o644)
    _write_json(directory / CONFIG_FILE, config)
    return directory


def _pretrained_parts(pretrained: Path) -> tuple[dict, list[str]]:
    """(model_index.json, the parts to take over unchanged: every directory it names but unet)."""
    index_path = pretrained / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(
            f"config.model.pretrained={str(pretrained)!r}: {index_path} not found (the run's "
            "pipeline directory must still be there to export the parts it did not train)")
    index = json.loads(index_path.read_text())
    parts = []
    for name, entry in index.items():
        if name.startswith("_") or name == UNET_DIR:
            continue
        if isinstance(entry, list) and entry and entry[0] is not None:
            if not (pretrained / name).is_dir():
                raise FileNotFoundError(
                    f"{index_path} names part {name!r} but {pretrained / name} is missing")
            parts.append(name)
    return index, parts


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out: Path
    step: int
    ema: bool
    pipeline: bool  # a whole pipeline (model_index.json) rather than unet/ alone
    parts: tuple[str, ...]  # what was written or linked under `out`


def _raw_params(workdir: str, step: int, abstract_params, shardings):
    """The train state's own parameters (not the EMA) at `step`."""
    import orbax.checkpoint as ocp

    from train import checkpoint

    target = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_params, shardings)
    with checkpoint.make_manager(workdir, read_only=True) as manager:
        # A partial restore: the optimizer state beside the parameters is never read.
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {"params": target},
                restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
                partial_restore=True)))
    return restored.state["params"]


def export_checkpoint(workdir: str, out: str | Path, *, step: int | None = None,
                      ema: bool = True) -> ExportSummary:
    """Writes the UNet of `workdir`'s checkpoint `step` (default: latest) under `out` in the
    diffusers layout, plus the pretrained pipeline's other parts when the run had one.

    Refuses (ExportError) a model diffusers cannot represent and a non-empty `out`, before
    reading any parameter.
    """
    from sample.pipeline import load_model
    from train import checkpoint

    step = checkpoint.resolve_step(workdir, step)
    config = checkpoint.load_config(workdir, step)
    diffusers_unet_config(config.model.unet)  # fail before reading any parameter
    lora = config.model.get("lora") or {}
    if lora.get("rank", 0) and not ema:
        raise ExportError(
            f"config.model.lora.rank={lora['rank']}: --no_ema is not supported for a LoRA run "
            "(the EMA adapters are merged into the pretrained UNet)")
    pretrained = config.model.get("pretrained") or None
    index, parts = _pretrained_parts(Path(pretrained)) if pretrained else (None, [])
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty; export writes into a new directory")

    model = load_model(workdir, step, devices=jax.local_devices()[:1])
    params = model.params
    if not ema:
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
        params = _raw_params(workdir, step, params, shardings)
    # (a LoRA run's adapters come folded into the pretrained kernels: a plain UNet)
    unet = nnx.merge(model.unet_graphdef, params)

    unet_config = dict(config.model.unet)
    if pretrained:
        # Training sets sample_size to its own latent size; the pipeline's default image size
        # (sample_size x VAE factor) stays the pretrained one.
        original = json.loads((Path(pretrained) / UNET_DIR / CONFIG_FILE).read_text())
        unet_config["sample_size"] = original.get("sample_size", unet_config["sample_size"])
    # Written beside `out` and renamed at the end: an interrupted export leaves no directory
    # that looks complete.
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_unet(partial / UNET_DIR, unet, unet_config)
    if pretrained:
        for name in parts:
            shutil.copytree(Path(pretrained) / name, partial / name, copy_function=_link_or_copy)
        index = dict(index)
        index[UNET_DIR] = ["diffusers", UNet2DConditionModel.__name__]
        _write_json(partial / MODEL_INDEX, index)
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return ExportSummary(out=out, step=step, ema=ema, pipeline=bool(pretrained),
                         parts=(UNET_DIR, *parts, *((MODEL_INDEX,) if pretrained else ())))


def export_lora_checkpoint(workdir: str, out: str | Path, *, step: int | None = None) -> Path:
    """Writes the EMA LoRA adapters of a LoRA run (`model.lora.rank` > 0) as
    `out/pytorch_lora_weights.safetensors`, which `StableDiffusionPipeline.load_lora_weights(out)`
    applies to the pretrained pipeline the run started from."""
    from sample.pipeline import load_model
    from train import checkpoint

    step = checkpoint.resolve_step(workdir, step)
    config = checkpoint.load_config(workdir, step)
    lora = config.model.get("lora") or {}
    if not lora.get("rank", 0):
        raise ExportError("--lora: this run trained the whole UNet (config.model.lora.rank=0); "
                          "export it without --lora")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty; export writes into a new directory")
    model = load_model(workdir, step, devices=jax.local_devices()[:1], merge_lora=False)
    adapters = nnx.state(nnx.merge(model.unet_graphdef, model.params), LORA_PARAMS)
    return export_lora(out, adapters, alpha=float(lora["alpha"]))
