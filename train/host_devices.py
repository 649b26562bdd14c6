"""CPU-only hosts: one XLA device per core, and huge pages for XLA's large host buffers.

Both must be set before jax starts its first backend (the second before the process starts),
which is why this module imports nothing from jax.

Devices. One multi-threaded XLA CPU device runs the demo UNet's small convolutions poorly in
parallel; one single-threaded device per core, with the batch split over a `data` mesh, is
about 1.3x faster on a 2-core machine (`bench/train_throughput.py --host_devices 2` vs without). The
flags only touch XLA's CPU backend, so a GPU or TPU run is unaffected.

Memory. XLA's CPU runtime allocates each execution's temporary buffers (843 MB per device
for the peer-size UNet's train step) with malloc and frees them when the step ends. glibc
serves such large requests with fresh mmap()s and unmaps them on free, so every step the
kernel maps and zeroes every page again, 4 KiB at a time: 412,000 page faults and a quarter
of that step's CPU time. With glibc's `glibc.malloc.hugetlb=1` tunable those mappings use
transparent huge pages (2 MiB), 265x fewer faults, and the step runs 1.3x faster. Tunables
are read when a process starts, so `restart_with_huge_pages` re-executes the CLI once with
the tunable set (docs/performance.md).
"""

import glob
import os
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"
_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"
MAX_AUTO_DEVICES = 8


def auto_device_count(global_batch_size: int | None = None, cpu_count: int | None = None) -> int:
    """The most devices, at most one per core (and MAX_AUTO_DEVICES), that divide the batch."""
    cores = max(1, min(cpu_count or os.cpu_count() or 1, MAX_AUTO_DEVICES))
    if global_batch_size is None:
        return cores
    return max(d for d in range(1, cores + 1) if global_batch_size % d == 0)


def define_cpu_devices_flag():
    """The CLIs' shared --cpu_devices absl flag (import-time; absl imports no jax)."""
    from absl import flags

    return flags.DEFINE_integer(
        "cpu_devices", -1,
        "CPU-only hosts: split the CPU into this many single-threaded XLA devices for data "
        "parallelism (-1: one per core; 0: leave XLA's defaults). Ignored when XLA_FLAGS "
        "already sets a device count; no effect on GPU/TPU.")


def apply_cpu_devices_flag(value: int, global_batch_size: int | None = None) -> str | None:
    """The CLIs' --cpu_devices: -1 = one per core (auto), 0 or 1 = leave XLA alone, N = N."""
    if value < -1:
        raise ValueError(f"--cpu_devices={value}: use -1 (one per core), 0 (off) or a count")
    count = auto_device_count(global_batch_size) if value == -1 else value
    return split_host_cpu(count)


def _backend_started() -> bool:
    """XLA reads XLA_FLAGS when jax starts its first backend, not when jax is imported."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax without this module: be conservative
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def split_host_cpu(num_devices: int) -> str | None:
    """Set XLA_FLAGS for `num_devices` single-threaded CPU devices; returns what was set.

    Leaves everything alone (returns None) when num_devices <= 1 or XLA_FLAGS already names a
    device count (the user's choice wins). Raises if jax is already imported: the flags would
    silently do nothing.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if num_devices <= 1 or _COUNT_FLAG in flags:
        return None
    if _backend_started():
        raise RuntimeError("split_host_cpu must run before jax starts a backend")
    added = f"{_COUNT_FLAG}={num_devices}"
    if _EIGEN_FLAG not in flags:
        added += f" {_EIGEN_FLAG}=false"
    os.environ["XLA_FLAGS"] = f"{flags} {added}".strip()
    return added


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Device nodes of the accelerators JAX runs on: NVIDIA, AMD (ROCm), TPU (v4: accel, v5+: vfio).
_ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*",
                      "/dev/vfio/[0-9]*")


def accelerator_present(environ=None) -> bool:
    """Whether JAX will run on something other than the CPU here: JAX_PLATFORMS when it is set,
    else the presence of a GPU's or TPU's device node."""
    environ = os.environ if environ is None else environ
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError, TypeError):
        return None


def _thp_mode() -> str | None:
    """The selected transparent huge page mode ("always", "madvise", "never"), if known."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_environment(environ=None, *, glibc_version="auto", thp_mode="auto",
                           accelerator="auto") -> dict | None:
    """The environment to restart a CPU-host process with (GLIBC_TUNABLES plus
    glibc.malloc.hugetlb=1), or None where that would change nothing or is not wanted:

    - an accelerator is present (XLA's large buffers then live on the device);
    - not glibc >= 2.35 (the first with the tunable), e.g. macOS or musl;
    - transparent huge pages are "never" (nothing to ask for) or "always" (the kernel already
      backs large mappings with them);
    - GLIBC_TUNABLES already sets glibc.malloc.hugetlb: the user's choice, and the way to opt
      out (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`); also the mark of a restarted process.
    """
    environ = dict(os.environ if environ is None else environ)
    glibc_version = _glibc_version() if glibc_version == "auto" else glibc_version
    thp_mode = _thp_mode() if thp_mode == "auto" else thp_mode
    accelerator = accelerator_present(environ) if accelerator == "auto" else accelerator
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (accelerator or glibc_version is None or glibc_version < (2, 35)
            or thp_mode != "madvise" or f"{HUGE_PAGES_TUNABLE}=" in tunables):
        return None
    environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{HUGE_PAGES_TUNABLE}=1") if t)
    return environ


def restart_with_huge_pages() -> None:
    """Re-execute this CLI process (same pid, arguments and environment, plus the glibc tunable)
    when huge_pages_environment says so; otherwise return. Call it first in a CLI's entry
    point, before anything starts threads or a JAX backend."""
    environ = huge_pages_environment()
    if environ is None or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
