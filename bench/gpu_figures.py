"""Every GPU figure the project still lacks, in one command sized for a short device lease.

    python bench/gpu_figures.py --out DIR [--budget_s 540] [--stages a,b,...] [--smoke]

Stages, in order of priority (each a subprocess with its own time limit; one that fails is
recorded with the end of its log and the next one runs):

  env           python, jax, flax, optax, orbax and the devices; imports the pipeline
  sd15          bench/train_throughput.py --config bench/sd15_size.py: the SD 1.5-size UNet
                (859.5M parameters, 64x64, bf16, FSDP over every device, batch 32): step time,
                images/s, MFU, peak memory
  sd15_peer     the same with --peer: diffusers 0.35.2's Flax UNet at the same architecture,
                batch and dtype on the same GPU (memory-efficient attention, as its users run
                it at 4096 tokens), and peer_ratio
  sd_pipeline   a random SD 1.5 pipeline directory (512 px; tests/tiny_sd.py at size "sd15",
                diffusers' PyTorch classes) for the fine-tuning stages
  ft_full       configs/finetune_sd.py on it at 512 px, batch 8, remat on (the config's default)
  ft_lora       the same with LoRA rank 16
  ft_full_noremat, ft_lora_noremat   both again without remat

A stage starts only when the budget left covers its estimate; `--stages` picks some (a second
lease can run the rest). Results: DIR/gpu_figures.jsonl (one line per stage: rc, seconds, the
bench's JSON) and DIR/gpu_figures.log (every stage's output).

On the lent GPU machine nothing can be downloaded, and its image has jax but not all of our
dependencies. Prepare the wheels here with `bash bench/gpu_wheels.sh` (writes .whl/, which git
ignores), then on the device (carry `.whl`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/peer .whl/peer/*.whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/parity .whl/parity/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_figures.py --out $OUT \\
        --peer_site /tmp/peer --parity_site /tmp/parity

`--smoke` shrinks every model so that the whole sequence runs on a CPU in a few minutes: the
check that the stages work before a lease is spent on them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "train_throughput.py")

# Shrunk sizes for --smoke (CPU): the same stages, models small enough to compile in seconds.
_SMOKE_SD15 = [
    "model.unet.block_out_channels=(32,32,64,64)", "model.unet.cross_attention_dim=64",
    "model.text_encoder.hidden_size=64", "model.text_encoder.intermediate_size=128",
    "model.text_encoder.num_hidden_layers=2", "model.text_encoder.num_attention_heads=4",
    "data.image_size=32", "model.unet.sample_size=32",
]


def _sets(overrides):
    return [arg for value in overrides for arg in ("--set", value)]


def stage_commands(args, pipeline_dir: str, peer_python: str | None) -> dict:
    """stage -> (estimated seconds on an H200, command)."""
    python = sys.executable
    timing = ["--rounds", "3", "--steps", "10"] if not args.smoke else ["--rounds", "1",
                                                                        "--steps", "2"]
    sd15 = [python, BENCH, "--config", os.path.join(ROOT, "bench", "sd15_size.py"), *timing]
    if args.smoke:
        sd15 += [*_sets(_SMOKE_SD15), "--batch_size", "8"]
    peer = ["--peer", "--peer_memory_efficient_attention"]
    if peer_python:
        peer += ["--peer_python", peer_python]
    finetune = [python, BENCH, "--config", os.path.join(ROOT, "configs", "finetune_sd.py"),
                *timing, "--set", f"model.pretrained={pipeline_dir}",
                "--set", "data.source=synthetic",
                "--set", f"data.image_size={16 if args.smoke else 512}",
                "--batch_size", str(args.finetune_batch)]
    lora = ["--set", "model.lora.rank=16", "--set", "model.lora.alpha=16.0"]
    no_remat = ["--set", "model.unet.remat=False"]
    build = [python, "-c",
             "import sys; from tests.tiny_sd import build_tiny_sd_pipeline; "
             "build_tiny_sd_pipeline(sys.argv[1], size=sys.argv[2])",
             pipeline_dir, "tiny" if args.smoke else "sd15"]
    return {
        "env": (30, [python, "-c", _ENV_SCRIPT]),
        "sd15": (150, sd15),
        "sd15_peer": (240, sd15 + peer),
        "sd_pipeline": (90, build),
        "ft_full": (150, finetune),
        "ft_lora": (150, finetune + lora),
        "ft_full_noremat": (150, finetune + no_remat),
        "ft_lora_noremat": (150, finetune + lora + no_remat),
    }


_ENV_SCRIPT = """
import importlib, json, platform
versions = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
             "transformers", "numpy"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:
        versions[name] = f"missing: {error}"
import jax
versions["devices"] = [d.device_kind for d in jax.devices()]
versions["backend"] = jax.default_backend()
import train.setup, sample.pipeline  # the pipeline imports with these versions
print(json.dumps(versions))
"""


def _last_json(text: str):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def peer_wrapper(peer_site: str, directory: str) -> str:
    """An interpreter for the peer: this Python with diffusers 0.35.2's directory first."""
    path = os.path.join(directory, "peer_python")
    with open(path, "w") as script:
        script.write(f'#!/bin/sh\nPYTHONPATH="{peer_site}${{PYTHONPATH:+:$PYTHONPATH}}" '
                     f'exec "{sys.executable}" "$@"\n')
    os.chmod(path, 0o755)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_figures.jsonl and .log")
    parser.add_argument("--budget_s", type=float, default=540,
                        help="wall-clock seconds for all stages together")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages to run (default: all, in order)")
    parser.add_argument("--peer_site", default=None,
                        help="a folder holding diffusers 0.35.2 (default: the bench's own "
                             "peer venv, created with network access)")
    parser.add_argument("--parity_site", default=None,
                        help="a folder holding diffusers' PyTorch classes for sd_pipeline "
                             "(default: this environment's)")
    parser.add_argument("--pipeline_dir", default=None,
                        help="where sd_pipeline writes (default: a temporary folder)")
    parser.add_argument("--finetune_batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true",
                        help="shrunk models: check the stages on a CPU")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu_figures_")
    pipeline_dir = args.pipeline_dir or os.path.join(scratch, "sd15_pipeline")
    peer_python = peer_wrapper(args.peer_site, scratch) if args.peer_site else None
    stages = stage_commands(args, pipeline_dir, peer_python)
    chosen = args.stages.split(",") if args.stages else list(stages)
    unknown = [name for name in chosen if name not in stages]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {list(stages)}")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # Ours and the peer share one GPU in sd15_peer: each takes what it needs, not 75% upfront.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # sd15_peer compiles our step again: from the persistent cache sd15 filled, in seconds.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(scratch, "jax_cache"))
    deadline = time.monotonic() + args.budget_s
    results_path = os.path.join(args.out, "gpu_figures.jsonl")
    log_path = os.path.join(args.out, "gpu_figures.log")
    with open(results_path, "a") as results, open(log_path, "a") as log:
        for name in chosen:
            estimate, command = stages[name]
            left = deadline - time.monotonic()
            record = {"stage": name}
            if left < (10 if args.smoke else estimate):
                record.update(skipped=f"{left:.0f} s left, about {estimate} s needed")
            else:
                stage_env = dict(env)
                if name == "sd_pipeline" and args.parity_site:
                    stage_env["PYTHONPATH"] = os.pathsep.join((args.parity_site,
                                                               env["PYTHONPATH"]))
                log.write(f"\n===== {name}: {' '.join(command)}\n")
                log.flush()
                start = time.monotonic()
                try:
                    done = subprocess.run(command, cwd=ROOT, env=stage_env, text=True,
                                          capture_output=True, timeout=left)
                    rc, output = done.returncode, done.stdout + done.stderr
                except subprocess.TimeoutExpired as expired:
                    rc = "timeout"
                    output = "".join(part.decode() if isinstance(part, bytes) else part or ""
                                     for part in (expired.stdout, expired.stderr))
                log.write(output)
                log.flush()
                record.update(rc=rc, seconds=round(time.monotonic() - start, 1),
                              result=_last_json(done.stdout) if rc == 0 else None)
                if rc != 0:
                    record["error_tail"] = output.splitlines()[-15:]
            results.write(json.dumps(record) + "\n")
            results.flush()
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
