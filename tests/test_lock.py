"""One run per workdir: the lock names its holder; a second `python -m train` refuses; a lock
whose process is gone is taken over. (A lock left by a SIGKILLed training run is taken over in
tests/test_preemption.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.xla_env import xla_flags
from train import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(workdir, host, pid):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, lock.LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "started": 0}, f)
    return path


def test_lock_names_holder_and_is_released(tmp_path):
    with lock.workdir_lock(tmp_path) as path:
        holder = json.loads(open(path).read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # This process again (as a second run would be): refused, naming host and pid.
        with pytest.raises(lock.WorkdirLockedError,
                           match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
            lock.acquire(tmp_path)
    assert not os.path.exists(path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())
    path = lock.acquire(tmp_path)
    assert json.loads(open(path).read())["pid"] == os.getpid()
    lock.release(path)


def test_lock_from_another_host_is_respected(tmp_path):
    path = _write_lock(tmp_path, "other-host.example", 4242)
    with pytest.raises(lock.WorkdirLockedError,
                       match=r"host other-host.example, pid 4242.*delete .*train.lock"):
        lock.acquire(tmp_path)
    assert json.loads(open(path).read())["host"] == "other-host.example"


@pytest.mark.slow
def test_second_train_process_refuses_a_workdir_in_use(tmp_path):
    # The holder is this test process: alive, on this host, like a training run in progress.
    path = _write_lock(tmp_path, socket.gethostname(), os.getpid())
    before = open(path).read()
    env = {**os.environ, "XLA_FLAGS": xla_flags(8),
           "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert error_lines == [
        f"train: error: workdir {tmp_path} is in use by another training run "
        f"(host {socket.gethostname()}, pid {os.getpid()}); lock file {path}"
    ]
    assert open(path).read() == before
    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "config.json")
