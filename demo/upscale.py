"""The upscaling demo: train the 8x8 -> 32x32 super-resolution stage on the synthetic captioned
shapes (configs/demo_upscale.py), then measure it against bicubic upscaling.

    python -m demo.upscale --workdir /tmp/t2i_upscale [--config.train.num_train_steps=...]
    python -m demo.upscale --workdir /tmp/t2i_upscale --skip_training   # measure a trained one

For every colour x shape x position combination (held-in and held-out, as the base demo) it
renders real 32x32 images, downsamples them 4x (box filter, the training degradation) and
upscales the 8x8 inputs three ways:
  (a) bicubic (jax.image.resize),
  (b) the upscaler with the prompt,
  (c) the upscaler with the empty prompt.
The demo's attribute classifier (trained on real 32x32 images) scores each set: the fraction
with colour, shape and position all right ("adherence"), plus PSNR against the real images. An
8x8 image shows colour and position; the shape is where the caption helps.

Prints one JSON object and writes it to DIR/eval/upscale.json, with a picture
DIR/eval/upscale.png (rows: 8x8 input, bicubic, upscaler, empty prompt, real).
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from train import distributed, host_devices
from train.distributed import define_distributed_flags, initialize
from train.host_devices import (
    apply_cpu_devices_flag,
    define_cpu_devices_flag,
    restart_with_huge_pages,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo_upscale.py"),
    "Config file (a super-resolution config).", lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/t2i_upscale", "Where data, checkpoints go.")
_IMAGES = flags.DEFINE_integer("num_images_per_prompt", 4, "Test images per combination.")
_SKIP_TRAINING = flags.DEFINE_boolean(
    "skip_training", False, "Measure the workdir's latest checkpoint without training.")
_CFG = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: the checkpoint config's).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the checkpoint config's).")
_PICTURE = flags.DEFINE_string("picture", None, "Also write the picture here (e.g. docs/...).")
_CPU_DEVICES = define_cpu_devices_flag()
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = define_distributed_flags()
# Listed by --help with this module's own flags (absl shows only the main module's by default).
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(host_devices)


def real_test_images(combos, num_images: int, image_size: int, seed: int) -> np.ndarray:
    """Real renderings, `num_images` per combination (fixed seed: the same set every run)."""
    from data_pipeline.synthetic import render, single_scene

    rng = np.random.default_rng(seed)
    return np.stack([render(single_scene(*combo, rng), image_size, rng)
                     for combo in combos for _ in range(num_images)])


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (dB, 8-bit peak)."""
    error = (images.astype(np.float64) - reference.astype(np.float64)) ** 2
    mse = np.maximum(error.reshape(len(images), -1).mean(axis=1), 1e-10)
    return float(np.mean(10.0 * np.log10(255.0**2 / mse)))


def downsample_uint8(images: np.ndarray, factor: int) -> np.ndarray:
    from diffusion.low_res import downsample

    low = np.asarray(downsample(images.astype(np.float32), factor))
    return np.clip(np.round(low), 0, 255).astype(np.uint8)


def bicubic_uint8(low: np.ndarray, size: int) -> np.ndarray:
    import jax

    up = jax.image.resize(low.astype(np.float32), (len(low), size, size, 3), "cubic")
    return np.clip(np.round(np.asarray(up)), 0, 255).astype(np.uint8)


def measure(workdir: str, *, num_images_per_prompt: int = 4, seed: int = 1,
            classifier_kwargs: dict | None = None, cfg_scale: float | None = None,
            steps: int | None = None) -> tuple[dict, np.ndarray]:
    """(figures, picture) for the workdir's latest super-resolution checkpoint, sampled with
    its config's settings (or `cfg_scale` / `steps`)."""
    from data_pipeline.input_pipeline import held_out_combinations
    from data_pipeline.synthetic import all_combinations, prompt_for
    from diffusion.sampling import image_grid, nearest_upsample
    from evaluation.adherence import adherence_scores, train_attribute_classifier
    from sample.pipeline import generate, load_model, options_from_config

    model = load_model(workdir)
    if model.low_res is None:
        raise ValueError(f"{workdir}: not a super-resolution model (no model.low_res)")
    config, size = model.config, model.image_size
    classifier, classifier_metrics = train_attribute_classifier(
        size, seed=config.seed, **(classifier_kwargs or {}))
    held_in, held_out = all_combinations(held_out_combinations(config.data))
    combos = list(held_in) + list(held_out)
    expected = [c for c in combos for _ in range(num_images_per_prompt)]
    real = real_test_images(combos, num_images_per_prompt, size, seed)
    low = downsample_uint8(real, model.low_res.factor)
    prompts = [prompt_for(*c) for c in expected]
    options = options_from_config(config, cfg_scale=cfg_scale, steps=steps)
    outputs = {"bicubic": bicubic_uint8(low, size)}
    timings = {}
    for name, texts in (("upscaler", prompts), ("upscaler_empty_prompt", [""] * len(prompts))):
        started = time.time()
        outputs[name], _ = generate(model, texts, options, low_res=low)
        timings[name] = round(time.time() - started, 1)
    outputs["real"] = real
    split = len(held_in) * num_images_per_prompt
    result = {}
    for name, images in outputs.items():
        scores_in = adherence_scores(classifier, images[:split], expected[:split])
        scores_out = adherence_scores(classifier, images[split:], expected[split:])
        result[name] = {
            "held_in": scores_in["all"], "held_out": scores_out["all"],
            "held_in_per_attribute": {k: scores_in[k] for k in ("colour", "shape", "position")},
            "held_out_per_attribute": {k: scores_out[k] for k in ("colour", "shape", "position")},
            "psnr_db": None if name == "real" else round(psnr(images, real), 2),
        }
    figures = {
        **result,
        "classifier_accuracy": classifier_metrics["classifier_accuracy"],
        "num_images": {"held_in": split, "held_out": len(expected) - split},
        "sampling": {"sampler": options.sampler, "steps": options.steps,
                     "cfg_scale": options.cfg_scale, "noise_level": options.noise_level,
                     "checkpoint_step": model.step, "seconds": timings},
        "low_res": f"{low.shape[1]}x{low.shape[2]} -> {size}x{size}",
    }
    # One column per test image of a few combinations, held-out ones included.
    shown = [i for i in range(0, len(expected), num_images_per_prompt)][::8][:12]
    nearest = nearest_upsample(low, model.low_res.factor)
    rows = [nearest, outputs["bicubic"], outputs["upscaler"], outputs["upscaler_empty_prompt"],
            real]
    picture = image_grid(np.concatenate([row[shown] for row in rows]), columns=len(shown))
    return figures, picture


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    apply_cpu_devices_flag(_CPU_DEVICES.value, config.train.global_batch_size)
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax
    from PIL import Image

    from diffusion.sampling import nearest_upsample
    from train.log_setup import setup_logging

    setup_logging()
    started = time.time()
    train_seconds = None
    if not _SKIP_TRAINING.value:
        from train.loop import train_and_evaluate

        train_and_evaluate(config, _WORKDIR.value)
        train_seconds = round(time.time() - started, 1)
    logging.info("measuring the upscaler against bicubic upscaling")
    figures, picture = measure(_WORKDIR.value, num_images_per_prompt=_IMAGES.value,
                               cfg_scale=_CFG.value, steps=_STEPS.value)
    figures["train_seconds"] = train_seconds
    figures["wall_seconds"] = round(time.time() - started, 1)
    if jax.process_index() == 0:
        out = os.path.join(_WORKDIR.value, "eval")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "upscale.json"), "w") as f:
            json.dump(figures, f, indent=2)
        for path in (os.path.join(out, "upscale.png"), _PICTURE.value):
            if path:
                # 4x nearest so 32x32 tiles are visible in a README.
                Image.fromarray(nearest_upsample(picture, 4)).save(path)
        print(json.dumps(figures))


def run():
    restart_with_huge_pages()
    sys.path.insert(0, os.getcwd())
    app.run(main)


if __name__ == "__main__":
    run()
