"""--cpu_devices: splitting a CPU host into XLA devices before jax is imported."""

import os
import subprocess
import sys

import pytest

from train.host_devices import (
    accelerator_present,
    apply_cpu_devices_flag,
    auto_device_count,
    huge_pages_environment,
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


def test_accelerator_detection():
    assert not accelerator_present({"JAX_PLATFORMS": "cpu"})
    assert accelerator_present({"JAX_PLATFORMS": "cuda,cpu"})
    assert accelerator_present({"JAX_PLATFORMS": "tpu"})


def test_huge_pages_environment_is_asked_only_where_it_helps():
    env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"}
    on = dict(glibc_version=(2, 36), thp_mode="madvise", accelerator=False)
    restarted = huge_pages_environment(env, **on)
    assert restarted["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1"
    assert restarted["PATH"] == "/bin" and env["GLIBC_TUNABLES"].count("hugetlb") == 0
    assert huge_pages_environment({}, **on)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # Already restarted, or the user's own setting (=0 is the opt-out): never twice.
    assert huge_pages_environment(restarted, **on) is None
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **on) is None
    assert huge_pages_environment(env, **{**on, "accelerator": True}) is None
    assert huge_pages_environment(env, **{**on, "glibc_version": (2, 34)}) is None
    assert huge_pages_environment(env, **{**on, "glibc_version": None}) is None  # musl, macOS
    assert huge_pages_environment(env, **{**on, "thp_mode": "never"}) is None
    assert huge_pages_environment(env, **{**on, "thp_mode": "always"}) is None


# A CLI-like entry point: restarts itself, then each call allocates a 64 MB output (through
# the allocator XLA uses for its temporaries) and frees it; the later calls' page faults count.
_FAULTS = """
import os, resource, sys
from train.host_devices import restart_with_huge_pages
restart_with_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: x * 2.0)
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), faults)
"""


CLIS = ["train", "sample", "demo", "demo.upscale"]
needs_huge_pages = pytest.mark.skipif(
    huge_pages_environment({}, accelerator=False) is None,
    reason="needs glibc >= 2.35 and transparent huge pages on madvise")


def _cpu_env(tunables: str | None) -> dict:
    """This environment for a CPU-only child, with GLIBC_TUNABLES as given (None: unset)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = "cpu"
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return env


def _run_faults(tunables: str | None) -> tuple[str, float]:
    process = subprocess.Popen([sys.executable, "-c", _FAULTS], cwd=ROOT, env=_cpu_env(tunables),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    pid, seen, faults = out.split()[-3:]
    assert int(pid) == process.pid  # re-executed in place: the launcher's pid is the job's
    return seen, float(faults)


@needs_huge_pages
def test_cli_restart_takes_huge_pages():
    pages = 4096 * 4096 * 4 / os.sysconf("SC_PAGE_SIZE")
    seen, faults = _run_faults(None)
    assert seen == "glibc.malloc.hugetlb=1"
    assert faults < 0.05 * pages, (faults, pages)  # 2 MiB pages: 512x fewer faults
    # The opt-out: glibc's 4 KiB pages, every page of every call faulted in again.
    seen, faults = _run_faults("glibc.malloc.hugetlb=0")
    assert seen == "glibc.malloc.hugetlb=0"
    assert faults > 0.5 * pages, (faults, pages)


@pytest.mark.parametrize("module", CLIS)
def test_help_lists_the_launch_flags(module):
    # absl's --help shows the main module's flags only; the launch flags live in train.distributed
    # and train.host_devices, and a user reading --help must still find them.
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines()
              if line.startswith("  --")}
    assert {"--cpu_devices", "--coordinator_address", "--num_processes",
            "--process_id"} <= listed, result.stdout[-2000:]


@needs_huge_pages
@pytest.mark.parametrize("module", CLIS)
def test_clis_restart_once_with_huge_pages(module):
    # -X importtime logs every import to stderr, in the restarted process too (the interpreter
    # options are part of the command line it re-executes): a restart imports the CLI twice.
    def imports_of_the_cli(tunables):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"],
                                cwd=ROOT, env=_cpu_env(tunables), capture_output=True, text=True,
                                timeout=120)
        assert "--cpu_devices" in result.stdout, result.stderr[-2000:]
        return sum(line.rstrip().endswith("| train.host_devices")
                   for line in result.stderr.splitlines())

    assert imports_of_the_cli(None) == 2
    assert imports_of_the_cli("glibc.malloc.hugetlb=0") == 1  # the opt-out: no restart
