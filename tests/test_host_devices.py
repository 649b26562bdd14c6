"""--cpu_devices: splitting a CPU host into XLA devices before jax is imported."""

import os
import subprocess
import sys

import pytest

from train.host_devices import (
    accelerator_present,
    apply_cpu_devices_flag,
    auto_device_count,
    reuse_host_memory,
    split_host_cpu,
)

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
    if sys.platform.startswith("linux") and not accelerator_present():
        with pytest.raises(RuntimeError, match="before jax starts a backend"):
            reuse_host_memory()


def test_accelerator_detection(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not accelerator_present()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert accelerator_present()
    # With an accelerator the allocator is left alone (even with this process's backend up).
    assert reuse_host_memory() is False


# Each call allocates a 64 MB output (through the same allocator as XLA's temporaries) and
# frees it when the array is dropped; the page faults of the later calls are counted.
_FAULTS = """
import resource, sys
from train.host_devices import reuse_host_memory
print(reuse_host_memory() if sys.argv[1] == "reuse" else "off")
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: x * 2.0)
for _ in range(10):  # (the first few calls grow the heap to its working size)
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_call(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    applied, faults = result.stdout.split()[-2:]
    return applied, float(faults)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(os, "confstr")
                         and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")),
                    reason="the setting is glibc's")
def test_reused_host_memory_takes_no_page_faults():
    pages = 4096 * 4096 * 4 / os.sysconf("SC_PAGE_SIZE")
    applied, faults = _faults_per_call("reuse")
    assert applied == "True"
    assert faults < 0.01 * pages, (faults, pages)
    # glibc's default maps and unmaps every 64 MB buffer: each call faults in all its pages
    # (unless transparent huge pages are always on, which makes the faults 512x fewer).
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as thp:
        huge_always = "[always]" in thp.read()
    if not huge_always:
        assert _faults_per_call("off")[1] > 0.5 * pages


@pytest.mark.parametrize("module", ["train", "sample", "demo", "demo.upscale"])
def test_help_lists_the_launch_flags(module):
    # absl's --help shows the main module's flags only; the launch flags live in train.distributed
    # and train.host_devices, and a user reading --help must still find them.
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    listed = {line.split(":")[0].strip().replace("[no]", "") for line in result.stdout.splitlines()
              if line.startswith("  --")}
    assert {"--cpu_devices", "--reuse_host_memory", "--coordinator_address", "--num_processes",
            "--process_id"} <= listed, result.stdout[-2000:]
