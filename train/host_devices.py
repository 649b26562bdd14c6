"""Split a CPU host into one XLA device per core, for data parallelism on CPU-only machines.

One multi-threaded XLA CPU device runs the demo UNet's small convolutions poorly in parallel;
one single-threaded device per core, with the batch split over a `data` mesh, is about 1.3x
faster on a 2-core machine (`bench/train_throughput.py --host_devices 2` vs without). The
flags only touch XLA's CPU backend, so a GPU or TPU run is unaffected. They must be set
before jax starts its first backend (XLA reads them then), which is why this module imports
nothing from jax.
"""

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
