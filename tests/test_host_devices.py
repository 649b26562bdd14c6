"""--cpu_devices: splitting a CPU host into XLA devices before jax is imported."""

import os
import subprocess
import sys

import pytest

from train.host_devices import apply_cpu_devices_flag, auto_device_count, split_host_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_count_is_one_per_core_dividing_the_batch():
    assert auto_device_count(64, cpu_count=2) == 2
    assert auto_device_count(64, cpu_count=6) == 4  # 6 and 5 do not divide 64
    assert auto_device_count(48, cpu_count=64) == 8  # capped
    assert auto_device_count(7, cpu_count=4) == 1
    assert auto_device_count(None, cpu_count=3) == 3


def _devices_after(code: str, xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    script = (
        "import os\nfrom train.host_devices import apply_cpu_devices_flag\n"
        f"{code}\nimport jax\nprint(jax.device_count(), os.environ.get('XLA_FLAGS', ''))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_flag_sets_the_device_count_before_jax_starts():
    out = _devices_after("apply_cpu_devices_flag(3)", None)
    assert out.startswith("3 ") and "--xla_cpu_multi_thread_eigen=false" in out
    assert _devices_after("apply_cpu_devices_flag(0)", None).split()[0] == "1"


def test_an_existing_device_count_wins():
    out = _devices_after("apply_cpu_devices_flag(3)", "--xla_force_host_platform_device_count=5")
    assert out.split()[0] == "5" and "eigen" not in out


def test_importing_jax_first_is_fine_until_a_backend_starts():
    # A config may import jax (XLA reads XLA_FLAGS when the first backend starts).
    out = _devices_after("import jax\napply_cpu_devices_flag(3)", None)
    assert out.startswith("3 ")


def test_misuse_is_an_error():
    # This test process has a backend running: the flags could no longer take effect.
    import jax

    jax.devices()
    saved = os.environ.pop("XLA_FLAGS", None)
    try:
        with pytest.raises(RuntimeError, match="before jax starts a backend"):
            split_host_cpu(2)
    finally:
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved
    with pytest.raises(ValueError, match="--cpu_devices=-3"):
        apply_cpu_devices_flag(-3)


@pytest.mark.parametrize("module", ["train", "sample", "demo", "demo.upscale"])
def test_help_lists_the_launch_flags(module):
    # absl's --help shows the main module's flags only; the launch flags live in train.distributed
    # and train.host_devices, and a user reading --help must still find them.
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines()
              if line.startswith("  --")}
    assert {"--cpu_devices", "--coordinator_address", "--num_processes",
            "--process_id"} <= listed, result.stdout[-2000:]
