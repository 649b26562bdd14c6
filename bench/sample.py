"""Sampling speed (and, for a demo model, prompt adherence) per solver and step count.

    python bench/sample.py --workdir /tmp/t2i_demo
    python bench/sample.py --workdir DIR --runs dpmpp_2m:10,ddim:50 --karras_sigmas

Prints one JSON line per (solver, steps): `solver`, `steps`, `images_per_s`, `s_per_image`
(after one untimed warm-up batch that compiles the program), `model_evals_per_image`, and,
when the workdir holds a model trained on the synthetic demo data, `held_in` / `held_out`:
the demo's adherence metric (`evaluation/adherence.py`, the classifier trained as
`python -m demo` trains it) over every held-in / held-out (colour, shape, position) prompt.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_RUNS = "dpmpp_2m:10,dpmpp_2m:20,ddim:15,ddim:50,euler:20,heun:20,ddpm:250"


def parse_runs(text: str) -> list[tuple[str, int]]:
    from diffusion.sampling import SOLVER_NAMES

    runs = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SOLVER_NAMES:
            raise SystemExit(f"bench/sample.py: unknown solver {name!r}; choose from "
                             f"{SOLVER_NAMES}")
        if not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"bench/sample.py: {item!r} needs a step count >= 1 (solver:steps)")
        runs.append((name, int(steps)))
    return runs


def main():
    from train.host_devices import restart_with_huge_pages

    restart_with_huge_pages()  # as the CLIs do, before anything starts threads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="Training workdir with checkpoints.")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="solver:steps,... to measure.")
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step.")
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Global batch (default: the config's sample.batch_size).")
    parser.add_argument("--karras_sigmas", action="store_true",
                        help="Karras sigmas for the solvers that take them.")
    parser.add_argument("--cfg_scale", type=float, default=None)
    parser.add_argument("--max_prompts", type=int, default=None,
                        help="Use only the first N demo prompts (quick checks).")
    parser.add_argument("--adherence", choices=("auto", "yes", "no"), default="auto",
                        help="Score demo adherence (auto: when the model is a demo model).")
    parser.add_argument("--host_devices", type=int, default=-1,
                        help="CPU: one XLA device per core (-1), XLA's default (0) or N.")
    args = parser.parse_args()

    from train.host_devices import apply_cpu_devices_flag

    apply_cpu_devices_flag(args.host_devices)  # before anything imports jax
    runs = parse_runs(args.runs)

    from data_pipeline.input_pipeline import held_out_combinations
    from data_pipeline.synthetic import all_combinations, prompt_for
    from diffusion.sampling import KARRAS_SOLVERS, make_solver
    from diffusion.schedules import schedule_from_config
    from sample.pipeline import generate, load_model, options_from_config

    model = load_model(args.workdir, args.step)
    config = model.config
    held_in, held_out = all_combinations(held_out_combinations(config.data))
    combos = list(held_in) + list(held_out)
    if args.max_prompts:
        combos = combos[: args.max_prompts]
    prompts = [prompt_for(*c) for c in combos]
    score = args.adherence == "yes" or (
        args.adherence == "auto" and config.data.get("source", "synthetic") == "synthetic")
    classifier = None
    if score:
        from evaluation.adherence import adherence_scores, train_attribute_classifier

        classifier, _ = train_attribute_classifier(config.data.image_size, seed=config.seed)
    expected = [c for c in combos for _ in range(args.num_images_per_prompt)]
    split = min(len(held_in), len(combos)) * args.num_images_per_prompt
    schedule = schedule_from_config(config.diffusion)

    for solver_name, steps in runs:
        options = options_from_config(
            config, sampler=solver_name, steps=steps, cfg_scale=args.cfg_scale,
            num_images_per_prompt=args.num_images_per_prompt,
            karras_sigmas=args.karras_sigmas and solver_name in KARRAS_SOLVERS)
        evals = make_solver(solver_name, schedule, config.diffusion.prediction_type, steps,
                            timestep_spacing=options.timestep_spacing,
                            karras_sigmas=options.karras_sigmas).model_evals
        batch = args.batch_size or config.sample.batch_size
        # Warm-up: one batch of the same per-device shape compiles the program.
        generate(model, prompts[:1], options, batch_size=batch, progress=False)
        started = time.perf_counter()
        images, _ = generate(model, prompts, options, batch_size=batch, progress=False)
        seconds = time.perf_counter() - started
        line = {"solver": solver_name, "steps": steps, "karras_sigmas": options.karras_sigmas,
                "images": len(images), "images_per_s": round(len(images) / seconds, 3),
                "s_per_image": round(seconds / len(images), 5),
                "model_evals_per_image": evals, "cfg_scale": options.cfg_scale,
                "checkpoint_step": model.step, "devices": model.mesh.size}
        if classifier is not None:
            line["held_in"] = round(float(adherence_scores(
                classifier, images[:split], expected[:split])["all"]), 4)
            if len(images) > split:
                line["held_out"] = round(float(adherence_scores(
                    classifier, images[split:], expected[split:])["all"]), 4)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
