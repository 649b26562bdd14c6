"""CPU-only hosts: one XLA device per core, and freed host memory kept for reuse.

Both must be set before jax starts its first backend, which is why this module imports
nothing from jax.

Devices. One multi-threaded XLA CPU device runs the demo UNet's small convolutions poorly in
parallel; one single-threaded device per core, with the batch split over a `data` mesh, is
about 1.3x faster on a 2-core machine (`bench/train_throughput.py --host_devices 2` vs without). The
flags only touch XLA's CPU backend, so a GPU or TPU run is unaffected.

Memory. XLA's CPU runtime allocates each execution's temporary buffers (843 MB per device
for the peer-size UNet's train step) with malloc and frees them when the step ends. glibc
serves such large requests with fresh mmap()s and unmaps them on free, so every step
faults in and zeroes every page again: 412,000 page faults and a quarter of the CPU time of
that step. `reuse_host_memory` makes glibc keep freed memory in the process (one arena,
no mmap, no trimming), after which a step faults in nothing (`bench/train_throughput.py
--no-reuse_host_memory` shows the difference).
"""

import ctypes
import glob
import os
import sys
from typing import NamedTuple

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


def define_reuse_host_memory_flag():
    """The CLIs' shared --reuse_host_memory absl flag."""
    from absl import flags

    return flags.DEFINE_bool(
        "reuse_host_memory", True,
        "CPU-only Linux hosts: keep the memory XLA frees after each step in the process, so "
        "that the next step's temporary buffers reuse it instead of faulting in fresh pages "
        "(about 1.3x faster CPU training steps; the process keeps its peak memory). No effect "
        "when an accelerator is present or the C library is not glibc.")


class CpuHostFlags(NamedTuple):
    cpu_devices: object  # absl FlagHolder[int]
    reuse_host_memory: object  # absl FlagHolder[bool]


def define_cpu_host_flags() -> CpuHostFlags:
    """--cpu_devices and --reuse_host_memory, for a CLI to apply with apply_cpu_host_flags."""
    return CpuHostFlags(define_cpu_devices_flag(), define_reuse_host_memory_flag())


def apply_cpu_host_flags(host_flags: CpuHostFlags, global_batch_size: int | None = None):
    """Both CPU-host settings; call before anything starts a JAX backend."""
    apply_cpu_devices_flag(host_flags.cpu_devices.value, global_batch_size)
    if host_flags.reuse_host_memory.value:
        reuse_host_memory()


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


# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Device nodes of the accelerators JAX runs on: NVIDIA, AMD (ROCm), TPU (v4: accel, v5+: vfio).
_ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*",
                      "/dev/vfio/[0-9]*")


def accelerator_present() -> bool:
    """Whether JAX will run on something other than the CPU here: JAX_PLATFORMS when it is set,
    else the presence of a GPU's or TPU's device node."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def reuse_host_memory() -> bool:
    """Make glibc malloc keep freed memory in the process; True if it was set.

    One arena (glibc serves large requests of threads other than the main one from mmap()
    whatever the other settings), no mmap for large requests, no trimming: the freed
    temporary buffers of one XLA execution are reused by the next one without page faults.
    The process keeps its peak memory until it exits. Does nothing (False) off Linux, with
    another C library, or when an accelerator is present (XLA's big buffers then live on the
    device, and the host's many input threads are better served by glibc's default arenas).
    Raises if a backend has started: XLA's threads have their arenas by then.
    """
    if not sys.platform.startswith("linux") or accelerator_present():
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    if _backend_started():
        raise RuntimeError("reuse_host_memory must run before jax starts a backend")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 as the trim threshold disables trimming (mallopt(3)).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
