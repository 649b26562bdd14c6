"""Multi-host training with real processes on localhost (gloo collectives over 127.0.0.1).

2 processes x 2 CPU devices train the tiny config; their parameters match a 1-process 8-device
run of the same config and seed (the data pipeline gives the same global batches whatever the
process and device count), and the 2-process checkpoint samples and resumes training in a single
process. Also: the explicit multi-host flag form of docs/cluster.md parses and dry-runs in one
process.

The single-process runs use 8 devices and the end-to-end test's step counts (4, then 16), so
they run programs the end-to-end and preemption tests compile too: a session compiles each once.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from models.factory import build_unet
from tests.cli_helpers import free_port
from tests.xla_env import xla_flags
from train import checkpoint
from train.sharding import make_mesh, tree_shardings
from train.state import init_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
RESUMED_STEPS = 16
TRAIN = [sys.executable, "-m", "train", "--config", "configs/tiny.py",
         f"--config.train.num_train_steps={NUM_STEPS}", "--config.train.checkpoint_every_steps=4",
         "--config.train.sample_every_steps=0", "--config.train.log_every_steps=2"]


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    # Runs of the same program compile it once: conftest's JAX_COMPILATION_CACHE_DIR is inherited.
    return env


def _distributed_flags(port: int, count: int, index: int) -> list[str]:
    return [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
            f"--process_id={index}"]


def _check(result_or_process, output=""):
    code = getattr(result_or_process, "returncode", None)
    assert code == 0, output[-4000:]


def _ema(workdir, step):
    config = checkpoint.load_config(workdir, step)

    def build():
        optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
        _, params = nnx.split(build_unet(config.model, nnx.Rngs(0)))
        return init_train_state(params, optimizer, jax.random.PRNGKey(0))

    abstract = jax.eval_shape(build)
    shardings = tree_shardings(make_mesh([("data", -1)]), abstract)
    with checkpoint.make_manager(workdir, read_only=True) as manager:
        state, _ = checkpoint.restore_state(manager, step, abstract, shardings)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.ema_params))]


@pytest.mark.slow
def test_two_processes_match_one_process_and_sample_in_one(tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    # The 1-process reference runs alongside the two processes (its own workdir, the shared
    # compilation cache): on a small machine much of their time is start-up and waiting.
    runs = [([*TRAIN, "--workdir", str(multi), *_distributed_flags(port, 2, i)], 2, f"process_{i}")
            for i in range(2)]
    runs.append(([*TRAIN, "--workdir", str(single)], 8, "one_process"))
    logs = [open(tmp_path / f"{name}.log", "w") for _, _, name in runs]
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=_env(devices), stdout=log,
                         stderr=subprocess.STDOUT)
        for (command, devices, _), log in zip(runs, logs, strict=True)
    ]
    try:
        for process in processes:
            process.wait(timeout=1500)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()
    for (_, _, name), process in zip(runs, processes, strict=True):
        _check(process, (tmp_path / f"{name}.log").read_text())
    lead = (tmp_path / "process_0.log").read_text()
    assert "JAX devices: 4 (cpu), processes: 2" in lead

    # Only process 0 writes the shared files; each process saves its own data position.
    assert (multi / "config.json").exists()
    assert len(list(multi.glob("events.out.tfevents.*"))) == 1
    positions = sorted(p.name for p in (multi / "checkpoints" / str(NUM_STEPS) / "data_iter")
                       .glob("process_*.json"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]

    for got, expected in zip(_ema(multi, NUM_STEPS), _ema(single, NUM_STEPS), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # The same prompts, image count and steps as the end-to-end test's sampling: one program,
    # compiled once per session.
    out = tmp_path / "samples"
    sampled = subprocess.run(
        [sys.executable, "-m", "sample", "--workdir", str(multi),
         "--prompt", "a red circle in the top left", "--prompt", "a blue square",
         "--num_images_per_prompt", "2", "--steps", "3", "--out", str(out)],
        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
    _check(sampled, sampled.stderr)
    assert f"checkpoint step {NUM_STEPS}" in sampled.stdout
    assert len(list(out.glob("*.png"))) >= 4

    # Training resumes in one process from the two processes' checkpoint: the random-access
    # data position is a global batch index, whatever the process count.
    resumed = subprocess.run(
        [*TRAIN, "--workdir", str(multi), f"--config.train.num_train_steps={RESUMED_STEPS}"],
        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=1500)
    _check(resumed, resumed.stderr)
    assert f"at step {NUM_STEPS}" in resumed.stderr
    assert checkpoint.latest_step(str(multi)) == RESUMED_STEPS
    positions = (multi / "checkpoints" / str(RESUMED_STEPS) / "data_iter").glob("process_*")
    assert [p.name for p in positions] == ["process_0-of-1.json"]


@pytest.mark.slow
def test_explicit_multihost_flags_parse_and_dry_run(tmp_path):
    """The explicit-flag launch of docs/cluster.md, on one process; flags that do not go
    together (checked alongside, in a second process)."""
    workdir = tmp_path / "run"
    bad = subprocess.Popen(
        [*TRAIN, "--workdir", str(tmp_path / "bad"), "--dry_run", "--num_processes=2"],
        cwd=ROOT, env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        result = subprocess.run(
            [*TRAIN, "--workdir", str(workdir), "--dry_run",
             *_distributed_flags(free_port(), 1, 0)],
            cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
        _, bad_stderr = bad.communicate(timeout=300)
    finally:
        if bad.poll() is None:
            bad.kill()
    _check(result, result.stderr)
    assert "dry run: config, mesh, data and the compiled step are fine" in result.stdout
    assert "batch: global 16, per process 16, per device 2" in result.stdout
    assert "mesh: {'data': 8, 'fsdp': 1} (8 devices, 1 processes, cpu)" in result.stdout
    assert not (workdir / "checkpoints").exists()
    assert not (workdir / "train.lock").exists()

    assert bad.returncode == 2
    assert bad_stderr.strip().splitlines()[-1].startswith(
        "train: error: --coordinator_address, --num_processes and --process_id go together")
