"""Preemption and atomicity with real `python -m train` processes and real signals.

One chain of runs on one workdir, compared with an uninterrupted run of the same config (run
alongside the chain, saving only its last step):
SIGTERM (saves the current step, exits 0) -> SIGKILL while an async save is in flight -> SIGKILL
a moment later in another save -> a last start that takes over the dead run's lock, resumes from
the newest complete checkpoint and finishes. Its parameters at the last step must equal the
uninterrupted run's bit for bit (data order included: the iterator position is checkpointed).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from models.factory import build_unet
from tests.xla_env import xla_flags
from train import checkpoint, lock
from train.sharding import make_mesh, tree_shardings
from train.state import init_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The end-to-end test's resumed run and the multi-host test's resume train 16 steps of the same
# config too, so a session compiles this program once.
NUM_STEPS = 16
OVERRIDES = [
    f"--config.train.num_train_steps={NUM_STEPS}",
    "--config.train.checkpoint_every_steps=1",
    "--config.train.keep_checkpoints=3",
    "--config.train.log_every_steps=1",
    "--config.train.sample_every_steps=0",
]


@pytest.fixture(scope="module")
def env():
    return {
        **os.environ,
        "XLA_FLAGS": xla_flags(8),
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": ROOT,
        # JAX_COMPILATION_CACHE_DIR comes from conftest: every run of the chain (and the other
        # tests' runs of the tiny config) compiles the same step once.
    }


# Runs that are not interrupted save only their last step: each save in between makes the next
# one wait for it (Orbax keeps one async save in flight), which is most of a step's time here.
SAVE_AT_END = f"--config.train.checkpoint_every_steps={NUM_STEPS}"


def _command(workdir, *extra):
    return [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir",
            str(workdir), *OVERRIDES, *extra]


def _run(workdir, env, *extra):
    result = subprocess.run(_command(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _start(workdir, env, log, *extra):
    return subprocess.Popen(_command(workdir, *extra), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def _entries(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return os.listdir(directory) if os.path.isdir(directory) else []


def _committed(workdir) -> list[int]:
    return sorted(int(name) for name in _entries(workdir) if name.isdigit())


def _wait_for(predicate, process, what, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _save_in_flight(workdir, after_step):
    # Orbax writes step S into "S.orbax-checkpoint-tmp-*" and renames it when complete.
    return [name for name in _entries(workdir)
            if "tmp" in name and int(name.split(".")[0]) > after_step]


def _abstract_state(config):
    def build():
        optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
        _, params = nnx.split(build_unet(config.model, nnx.Rngs(0)))
        return init_train_state(params, optimizer, jax.random.PRNGKey(0))

    return jax.eval_shape(build)


def _restore(workdir, step):
    abstract = _abstract_state(checkpoint.load_config(workdir, step))
    shardings = tree_shardings(make_mesh([("data", -1)]), abstract)
    with checkpoint.make_manager(workdir, read_only=True) as manager:
        state, meta = checkpoint.restore_state(manager, step, abstract, shardings)
    assert meta["step"] == step
    return state


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_sigterm_sigkill_and_exact_resume(tmp_path, env):
    workdir = str(tmp_path / "interrupted")
    log_path = tmp_path / "log.txt"

    # 1. SIGTERM once training runs: save the current step, exit 0.
    with open(log_path, "w") as log:
        process = _start(workdir, env, log)
        _wait_for(lambda: _committed(workdir), process, "the first checkpoint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    output = log_path.read_text()
    assert "preemption notice: saved step" in output
    preempted_at = _committed(workdir)[-1]
    assert preempted_at < NUM_STEPS
    assert f"saved step {preempted_at} " in output
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))  # released on exit

    # The uninterrupted run goes alongside the rest of the chain, now that the step is in the
    # compilation cache: it shares nothing else with the chain, whose waits (start-up, saves)
    # leave a core free for it.
    reference = tmp_path / "reference"
    with open(tmp_path / "reference_log.txt", "w") as reference_log:
        reference_run = _start(reference, env, reference_log, SAVE_AT_END)
        try:
            _kill_during_saves_and_finish(workdir, env, log_path, preempted_at)
            assert reference_run.wait(timeout=900) == 0, (
                (tmp_path / "reference_log.txt").read_text()[-4000:])
        finally:
            if reference_run.poll() is None:
                reference_run.kill()
    assert _committed(reference) == [NUM_STEPS]
    assert _committed(workdir)[-1] == NUM_STEPS
    resumed, uninterrupted = _restore(workdir, NUM_STEPS), _restore(reference, NUM_STEPS)
    for got, expected in zip(_leaves(resumed), _leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, expected)


def _kill_during_saves_and_finish(workdir, env, log_path, last_good):
    # 2. and 3. SIGKILL while an async save is being written: right away, then a bit later.
    for delay in (0.0, 0.15):
        with open(log_path, "w") as log:
            process = _start(workdir, env, log)
            _wait_for(lambda last=last_good: _save_in_flight(workdir, last), process,
                      "a save in flight")
            time.sleep(delay)
            process.kill()
            process.wait(timeout=60)
        committed = _committed(workdir)
        assert committed[-1] < NUM_STEPS
        assert committed[-1] >= last_good  # the previous checkpoints survive
        last_good = committed[-1]
        # The newest complete checkpoint restores.
        _restore(workdir, last_good)
    # The killed run left its lock behind, naming a pid that is gone.
    assert os.path.exists(os.path.join(workdir, lock.LOCK_FILE))

    # 4. The next start takes the stale lock over, resumes and finishes.
    final = _run(workdir, env, SAVE_AT_END)
    assert f"at step {last_good}" in final.stderr
