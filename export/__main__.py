"""Write a training checkpoint's UNet as a diffusers directory.

    python -m export --workdir W --out DIR [--step N] [--no_ema] [--lora]

With `config.model.pretrained` (a fine-tuned diffusers pipeline) DIR is a whole pipeline that
`StableDiffusionPipeline.from_pretrained(DIR)` loads; without it, DIR holds `unet/` only.
User errors (a model diffusers cannot represent, no checkpoint, a non-empty --out, ...) end in
one line and exit 2.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "New (or empty) output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NO_EMA = flags.DEFINE_boolean("no_ema", False, "Export the raw parameters, not the EMA.")
_LORA = flags.DEFINE_boolean(
    "lora", False, "A LoRA run: write only the adapters (pytorch_lora_weights.safetensors, "
    "for load_lora_weights) instead of the merged pipeline.")
flags.mark_flags_as_required(["workdir", "out"])

EXIT_USER_ERROR = 2


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from export.diffusers_export import export_checkpoint, export_lora_checkpoint
    from train.log_setup import setup_logging

    setup_logging()
    if _LORA.value:
        path = export_lora_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value)
        print(f"exported the EMA LoRA adapters to {path}")
        return
    summary = export_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value, ema=not _NO_EMA.value)
    weights = "EMA" if summary.ema else "raw (--no_ema)"
    print(f"exported the {weights} UNet of checkpoint step {summary.step} to {summary.out}: "
          f"{', '.join(summary.parts)}")
    if not summary.pipeline:
        print("the run has no config.model.pretrained pipeline: only unet/ was written (load it "
              f"with UNet2DConditionModel.from_pretrained({str(summary.out)!r}, "
              "subfolder='unet'))")


def _user_error_types() -> tuple:
    from export.diffusers_export import ExportError
    from train.checkpoint import IncompatibleCheckpointError, NoCheckpointError

    return (ExportError, IncompatibleCheckpointError, NoCheckpointError, FileNotFoundError,
            NotImplementedError)


def run(argv=None):
    try:
        app.run(main, argv=argv)
    except SystemExit:
        raise
    except _user_error_types() as error:
        one_line = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"export: error: {one_line}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    run()
