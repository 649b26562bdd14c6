"""The demo: synthetic captioned shapes -> train on CPU -> sample every combination -> adherence.

    python -m demo --workdir /tmp/t2i_demo [--config.train.num_train_steps=...]

Writes DIR/eval/adherence.json and DIR/eval/samples/ (PNGs, grid.png, manifest.jsonl).
"""

import json
import os
import sys
import time

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
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
    "Config file.", lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/t2i_demo", "Where data, checkpoints, logs go.")
_IMAGES = flags.DEFINE_integer("num_images_per_prompt", 4, "Samples per evaluated prompt.")
_CPU_DEVICES = define_cpu_devices_flag()
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = define_distributed_flags()
# Listed by --help with this module's own flags (absl shows only the main module's by default).
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(host_devices)


def run_demo(config, workdir: str, *, num_images_per_prompt: int = 4,
             classifier_kwargs: dict | None = None) -> dict:
    from data_pipeline.input_pipeline import held_out_combinations
    from data_pipeline.synthetic import all_combinations, prompt_for
    from evaluation.adherence import adherence_scores, train_attribute_classifier
    from sample.pipeline import generate, load_model, options_from_config, write_outputs
    from train.loop import train_and_evaluate

    started = time.time()
    train_summary = train_and_evaluate(config, workdir)
    train_seconds = time.time() - started

    logging.info("training the attribute classifier on real demo images")
    classifier, classifier_metrics = train_attribute_classifier(
        config.data.image_size, seed=config.seed, **(classifier_kwargs or {})
    )

    held_in, held_out = all_combinations(held_out_combinations(config.data))
    combos = list(held_in) + list(held_out)
    model = load_model(workdir)
    options = options_from_config(model.config, num_images_per_prompt=num_images_per_prompt)
    images, records = generate(model, [prompt_for(*c) for c in combos], options)
    sample_dir = os.path.join(workdir, "eval", "samples")
    write_outputs(sample_dir, images, records, columns=num_images_per_prompt * 5)

    expected = [c for c in combos for _ in range(num_images_per_prompt)]
    split = len(held_in) * num_images_per_prompt
    scores_in = adherence_scores(classifier, images[:split], expected[:split])
    scores_out = adherence_scores(classifier, images[split:], expected[split:])
    result = {
        "held_in": scores_in["all"],
        "held_out": scores_out["all"],
        "held_in_per_attribute": {k: scores_in[k] for k in ("colour", "shape", "position")},
        "held_out_per_attribute": {k: scores_out[k] for k in ("colour", "shape", "position")},
        "classifier_accuracy": classifier_metrics["classifier_accuracy"],
        "classifier": classifier_metrics,
        "num_images": {"held_in": scores_in["n"], "held_out": scores_out["n"]},
        "held_out_combinations": [" ".join(c) for c in held_out_combinations(config.data)],
        "sampling": {"sampler": options.sampler, "steps": options.steps,
                     "cfg_scale": options.cfg_scale, "checkpoint_step": model.step},
        "train": {k: v for k, v in train_summary.items() if k != "data"},
        "data": train_summary.get("data", {}),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
    }
    import jax

    if jax.process_index() == 0:  # one writer of shared files
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "adherence.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    apply_cpu_devices_flag(_CPU_DEVICES.value, _CONFIG.value.train.global_batch_size)
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before JAX runs
    from train.log_setup import setup_logging

    setup_logging()
    result = run_demo(_CONFIG.value, _WORKDIR.value, num_images_per_prompt=_IMAGES.value)
    print("\nprompt adherence (fraction of images with colour, shape and position all right):")
    print(f"  held-in combinations : {result['held_in']:.3f}  {result['held_in_per_attribute']}")
    print(f"  held-out combinations: {result['held_out']:.3f}  {result['held_out_per_attribute']}")
    print(f"  classifier accuracy on real held-out images: {result['classifier_accuracy']:.3f}")
    print(f"  wall time {result['wall_seconds']:.0f}s (training {result['train_seconds']:.0f}s)")
    print(f"  -> {os.path.join(_WORKDIR.value, 'eval', 'adherence.json')}, samples in "
          f"{os.path.join(_WORKDIR.value, 'eval', 'samples')}")


def run():
    restart_with_huge_pages()
    sys.path.insert(0, os.getcwd())
    app.run(main)


if __name__ == "__main__":
    run()
