r"""Sample PNGs from a training workdir.

    python -m sample --workdir DIR --prompt "a red circle in the top left" --out OUTDIR
    python -m sample --workdir DIR --prompts_file prompts.jsonl --out OUTDIR \
        --sampler dpmpp_2m --steps 20 --karras_sigmas

Super-resolution (a workdir trained with model.low_res, e.g. configs/demo_upscale.py):
    python -m sample --workdir UPSCALER --low_res IMAGE_OR_DIR --prompt "..." --out OUTDIR
    python -m sample --workdir BASE --upscaler_workdir UPSCALER --prompt "..." --out OUTDIR
(the second runs the cascade: base samples in OUTDIR/base, each upscaled into OUTDIR).

Several hosts: the same command on each, plus --coordinator_address HOST:PORT
--num_processes N --process_id I; every host writes its own share into the shared --out.
"""

import os
import sys

from absl import app, flags

from diffusion.names import SOLVER_NAMES, TIMESTEP_SPACINGS
from train import distributed, host_devices
from train.distributed import define_distributed_flags, initialize
from train.host_devices import (
    apply_cpu_devices_flag,
    define_cpu_devices_flag,
    restart_with_huge_pages,
)

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory for PNGs, grid.png, manifest.jsonl.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None,
    "One prompt per line, or JSONL with per-line prompt, negative_prompt, seed, cfg_scale, "
    "num_images, steps.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Prompt steered away from under CFG.")
_NUM = flags.DEFINE_integer("num_images_per_prompt", 1, "Images per prompt.")
_CFG = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the config's).")
_RESCALE = flags.DEFINE_float("guidance_rescale", None, "Guidance rescale in [0, 1].")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the config's).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SOLVER_NAMES), "Solver (default: config's).")
_KARRAS = flags.DEFINE_boolean("karras_sigmas", None, "Karras sigma spacing (sigma solvers).")
_SPACING = flags.DEFINE_enum("timestep_spacing", None, list(TIMESTEP_SPACINGS),
                             "Timestep spacing (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_SEED = flags.DEFINE_integer("seed", None, "Base seed; prompt i uses seed + i unless its JSONL "
                             "line sets one (default: the config's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per device per batch.")
_GRID = flags.DEFINE_boolean("grid", True, "Also write grid.png of the first 64 images.")
_LORA = flags.DEFINE_multi_string(
    "lora", [], "A LoRA file or directory (ours, diffusers/PEFT or kohya-ss safetensors) to "
    "apply; repeat for several.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "Multiplies each --lora file's alpha / rank.")
_LORA_MERGE = flags.DEFINE_boolean(
    "lora_merge", True, "Fold LoRA adapters (--lora files, a LoRA run's own) into the weights "
    "(faster); --nolora_merge keeps them as adapter layers.")
_LOW_RES = flags.DEFINE_string(
    "low_res", None, "Super-resolution models: an image, or a directory of images, to upscale "
    "with every prompt (the size the model takes, e.g. 8x8 for configs/demo_upscale.py).")
_NOISE_LEVEL = flags.DEFINE_integer(
    "noise_level", None, "Noise level of the low-res input, 0..model.low_res.max_noise_level "
    "(default: the config's sample.noise_level).")
_UPSCALER = flags.DEFINE_string(
    "upscaler_workdir", None, "Cascade: upscale each of --workdir's samples with this "
    "super-resolution workdir (base images go to OUT/base).")
_UPSCALER_STEP = flags.DEFINE_integer("upscaler_step", None,
                                      "Upscaler checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "out"])
_CPU_DEVICES = define_cpu_devices_flag()
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = define_distributed_flags()
# Listed by --help with this module's own flags (absl shows only the main module's by default).
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(host_devices)


def _check_flags() -> None:
    """Errors in the flags and the prompts that need no checkpoint and no device."""
    from sample.prompts import PromptDefaults, check_settings, scan_prompts

    if _BATCH.value is not None and _BATCH.value < 1:
        raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
    if _STEPS.value is not None and _STEPS.value < 1:
        raise ValueError(f"--steps must be >= 1, got {_STEPS.value}")
    if _RESCALE.value is not None and not 0 <= _RESCALE.value <= 1:
        raise ValueError(f"--guidance_rescale must be in [0, 1], got {_RESCALE.value}")
    check_settings("flags", seed=_SEED.value or 0, cfg_scale=_CFG.value or 0.0,
                   num_images=_NUM.value, steps=_STEPS.value or 1)
    # The prompts are checked before the checkpoint is read: a bad line fails in a second.
    scan_prompts(_PROMPT.value, _PROMPTS_FILE.value, PromptDefaults(
        seed=_SEED.value or 0, cfg_scale=_CFG.value or 0.0, num_images=_NUM.value,
        steps=_STEPS.value or 1))
    for path in _LORA.value:  # fail in a second, not after reading the checkpoint
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path}: no such file or directory")
    if _LOW_RES.value is not None and _UPSCALER.value is not None:
        raise ValueError("--low_res and --upscaler_workdir exclude each other: --low_res "
                         "upscales given images, --upscaler_workdir the base model's samples")
    if _LOW_RES.value is not None and not os.path.exists(_LOW_RES.value):
        raise FileNotFoundError(f"--low_res {_LOW_RES.value}: no such file or directory")
    if _NOISE_LEVEL.value is not None and _LOW_RES.value is None and _UPSCALER.value is None:
        raise ValueError("--noise_level applies to super-resolution sampling only (with "
                         "--low_res or --upscaler_workdir)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # The flags and the prompts first, before the devices and the cluster start: on several
    # hosts a bad value fails at once, not after every host has joined.
    _check_flags()
    apply_cpu_devices_flag(_CPU_DEVICES.value)
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from sample.pipeline import (
        load_model,
        low_res_images,
        options_from_config,
        sample_cascade,
        sample_to_dir,
        with_lora_files,
    )
    from train.log_setup import setup_logging

    setup_logging()
    model = with_lora_files(
        load_model(_WORKDIR.value, _STEP.value, merge_lora=_LORA_MERGE.value), _LORA.value,
        scale=_LORA_SCALE.value, merge=_LORA_MERGE.value)
    def options_for(loaded):
        return options_from_config(
            loaded.config, sampler=_SAMPLER.value, steps=_STEPS.value, cfg_scale=_CFG.value,
            eta=_ETA.value, seed=_SEED.value, num_images_per_prompt=_NUM.value,
            negative_prompt=_NEGATIVE.value, karras_sigmas=_KARRAS.value,
            guidance_rescale=_RESCALE.value, timestep_spacing=_SPACING.value,
            noise_level=_NOISE_LEVEL.value)

    options = options_for(model)
    if _UPSCALER.value is not None:
        upscaler = load_model(_UPSCALER.value, _UPSCALER_STEP.value)
        summary = sample_cascade(model, upscaler, _PROMPT.value, _PROMPTS_FILE.value, options,
                                 options_for(upscaler), _OUT.value, batch_size=_BATCH.value,
                                 grid=_GRID.value)
    elif _LOW_RES.value is not None:
        images = low_res_images(model, _LOW_RES.value)
        summary = sample_to_dir(model, _PROMPT.value, _PROMPTS_FILE.value, options, _OUT.value,
                                batch_size=_BATCH.value, grid=_GRID.value,
                                low_res_for=lambda spec, image_index: images,
                                low_res_per_image=len(images))
    else:
        summary = sample_to_dir(model, _PROMPT.value, _PROMPTS_FILE.value, options, _OUT.value,
                                batch_size=_BATCH.value, grid=_GRID.value)
    print(f"sampled {summary['sampled']} of {summary['images']} images "
          f"({summary['skipped']} already in {_OUT.value}) from checkpoint step {model.step}; "
          f"manifest: {summary['manifest']}")


def run():
    restart_with_huge_pages()
    try:
        app.run(main)
    except SystemExit:
        raise
    except (FileNotFoundError, ValueError) as error:
        # Known user errors (no checkpoint, bad prompts file, bad setting) end with one line.
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"sample: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
