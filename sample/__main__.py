"""python -m sample --workdir DIR --prompt "a red circle in the top left" --out OUTDIR"""

import sys

from absl import app, flags

from train.host_devices import apply_cpu_devices_flag, define_cpu_devices_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory for PNGs, grid.png, manifest.jsonl.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for several.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Prompt steered away from under CFG.")
_NUM = flags.DEFINE_integer("num_images_per_prompt", 1, "Images per prompt.")
_CFG = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the config's).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Solver (default: config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_SEED = flags.DEFINE_integer("seed", None, "Seed (default: the config's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per device batch (all devices).")
flags.mark_flags_as_required(["workdir", "out"])
_CPU_DEVICES = define_cpu_devices_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    apply_cpu_devices_flag(_CPU_DEVICES.value)
    from sample.pipeline import (
        generate,
        load_model,
        options_from_config,
        read_prompts,
        write_outputs,
    )
    from train.log_setup import setup_logging

    setup_logging()
    prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
    if _NUM.value < 1:
        raise app.UsageError("--num_images_per_prompt must be >= 1")
    model = load_model(_WORKDIR.value, _STEP.value)
    options = options_from_config(
        model.config, sampler=_SAMPLER.value, steps=_STEPS.value, cfg_scale=_CFG.value,
        eta=_ETA.value, seed=_SEED.value, num_images_per_prompt=_NUM.value,
        negative_prompt=_NEGATIVE.value,
    )
    images, records = generate(model, prompts, options, batch_size=_BATCH.value)
    written = write_outputs(_OUT.value, images, records, columns=_NUM.value)
    print(f"wrote {written['count']} images from checkpoint step {model.step} to {_OUT.value} "
          f"(grid: {written['grid']})")


def run():
    try:
        app.run(main)
    except SystemExit:
        raise
    except (FileNotFoundError, ValueError) as error:
        # Known user errors (no checkpoint, empty prompt list) end with one clear line.
        print(f"sample: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
