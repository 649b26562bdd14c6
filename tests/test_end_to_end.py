"""The tiny config end to end through the real CLIs on 8 fake CPU devices: train, checkpoint,
restart and resume, sample; plus the CLI errors users hit first."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import free_port
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ,
    "XLA_FLAGS": xla_flags(8),
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONPATH": ROOT,
}
RESUMED_STEPS = 16


def run_cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def run_clis_at_once(folder, commands):
    """Independent CLI runs started together (most of each is a single-threaded start-up, so
    two cores run two at once); output goes to files, so no pipe fills while we wait."""
    started = []
    for index, args in enumerate(commands):
        out, err = open(folder / f"cli_{index}.out", "w+"), open(folder / f"cli_{index}.err", "w+")
        started.append((args, subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=ENV,
                                               stdout=out, stderr=err, text=True), out, err))
    results = []
    try:
        for args, process, out, err in started:
            process.wait(timeout=600)
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(args, process.returncode, out.read(),
                                                       err.read()))
    finally:
        for _, process, out, err in started:
            if process.poll() is None:
                process.kill()
            out.close()
            err.close()
    return results


def event_scalars(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(workdir, size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_train_resume_and_sample(tmp_path):
    workdir = str(tmp_path / "run")
    first = run_cli("train", "--config", "configs/tiny.py", "--workdir", workdir,
                    "--config.train.num_train_steps=4", "--config.train.checkpoint_every_steps=2")
    assert "compiled train step on 8 devices" in first.stderr
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*"))
    assert steps == [2, 4]  # keep_checkpoints=2
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_train_steps"] == 4

    # A new process with a longer schedule picks up at the saved step, not at zero. (16 steps:
    # the preemption and multi-host tests train the same program, so a session compiles it once.)
    second = run_cli("train", "--config", "configs/tiny.py", "--workdir", workdir,
                     f"--config.train.num_train_steps={RESUMED_STEPS}",
                     "--config.train.checkpoint_every_steps=2")
    assert "at step 4" in second.stderr
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*"))
    assert steps == [RESUMED_STEPS - 2, RESUMED_STEPS]

    events = event_scalars(workdir)
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert loss_steps == list(range(2, RESUMED_STEPS + 1, 2))
    assert all(np.isfinite(event.value) for event in events.Scalars("train/loss"))
    for tag in ("train/learning_rate", "train/grad_norm", "train/images_per_sec"):
        assert len(events.Scalars(tag)) == len(loss_steps)
    assert events.Images("samples/ema")

    out = tmp_path / "samples"
    result = run_cli("sample", "--workdir", workdir, "--prompt", "a red circle in the top left",
                     "--prompt", "a blue square", "--num_images_per_prompt", "2", "--steps", "3",
                     "--out", str(out))
    assert f"checkpoint step {RESUMED_STEPS}" in result.stdout
    manifest = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert [m["prompt"] for m in manifest] == ["a red circle in the top left"] * 2 + [
        "a blue square"] * 2
    image = Image.open(out / manifest[0]["file"])
    assert image.size == (16, 16)
    assert image.text["prompt"] == "a red circle in the top left"
    assert image.text["checkpoint_step"] == str(RESUMED_STEPS) and image.text["steps"] == "3"
    assert (out / "grid.png").exists()


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    # Process 1 of a 2-process run whose coordinator never comes: the config is checked before
    # jax.distributed.initialize, so the error comes at once instead of after its timeout.
    no_cluster = ("--coordinator_address", f"127.0.0.1:{free_port()}", "--num_processes", "2",
                  "--process_id", "1")
    bad_configs = (
        (("--config.optim.learning_rat=1e-3",), 'no such config field: learning_rat'),
        (("--config.nonexistent=1",), "no such config field: nonexistent"),
        (("--config.optim.learning_rate=-1",), "config.optim.learning_rate=-1.0 must be > 0"),
        (("--config.data.source=tar",), "config.data.paths is empty"),
        (("--config.optim.ema_decay=2", *no_cluster),
         "config.optim.ema_decay=2.0 must be in [0, 1]"),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    *bad_runs, missing, no_prompts = run_clis_at_once(logs, [
        *(("train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / f"w{index}"),
           *flags) for index, (flags, _) in enumerate(bad_configs)),
        ("sample", "--workdir", str(empty), "--prompt", "x", "--out", str(tmp_path / "o1")),
        ("sample", "--workdir", str(empty), "--prompts_file", str(prompts), "--out",
         str(tmp_path / "o2")),
    ])

    # User errors from `python -m train`: one line naming the problem, exit 2, nothing written.
    for index, ((flag, expected), bad) in enumerate(zip(bad_configs, bad_runs, strict=True)):
        assert bad.returncode == 2, (flag, bad.stderr[-2000:])
        errors = [line for line in bad.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("train: error: "), (flag, errors)
        assert expected in errors[0], (flag, errors)
        assert "Traceback" not in bad.stderr
        assert not (tmp_path / f"w{index}" / "checkpoints").exists()

    assert missing.returncode == 2
    assert missing.stderr.startswith("sample: error: ") and str(empty) in missing.stderr

    assert no_prompts.returncode != 0
    assert "no prompts to sample" in no_prompts.stderr
