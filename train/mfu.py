"""Peak FLOP/s of the device a step runs on, for model-FLOPs-utilisation (MFU) figures.

Accelerators: the vendor's dense bf16 peak per device (chip), no sparsity. CPUs have no fixed
figure: `measured_matmul_peak()` times a jitted float32 matmul on this machine instead.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (substring of jax's device_kind, lower-case) -> dense bf16 FLOP/s per device. More specific
# names first: "h100 pcie" before "h100".
PEAK_BF16_FLOPS = (
    ("h200", 989e12),  # H200 SXM: the H100 SXM's tensor cores, more memory
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # H100 SXM5
    ("a100", 312e12),
    ("tpu v6", 918e12),  # v6e (Trillium)
    ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p ("TPU v5p", or "TPU v5")
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Dense bf16 peak of a known accelerator, else None (CPU, unknown kinds)."""
    device = jax.devices()[0] if device is None else device
    kind = getattr(device, "device_kind", "").lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def measured_matmul_peak(size: int = 2048, repeats: int = 10, devices=None) -> float:
    """FLOP/s per device of a jitted float32 [size x size] matmul, run on all `devices` at once
    (default: all local devices; with one single-threaded CPU device per core each core runs
    its own). The practical peak of a CPU, or of anything missing from the table, measured now
    so that a shared machine's load shows in numerator and denominator alike."""
    devices = jax.local_devices() if devices is None else list(devices)
    mesh = Mesh(np.asarray(devices), ("devices",))
    matrices = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32),
                              NamedSharding(mesh, PartitionSpec("devices")))
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    matmul(matrices).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(matrices).block_until_ready()
        times.append(time.perf_counter() - start)
    # The median: robust to another process taking the cores for one repeat.
    return 2 * size**3 / sorted(times)[len(times) // 2]


def device_peak_flops(device=None, *, size: int = 2048, repeats: int = 10) -> tuple[float, str]:
    """(peak FLOP/s per device, where it comes from: "table" or "measured matmul")."""
    peak = peak_flops_per_device(device)
    if peak is not None:
        return peak, "table"
    devices = None if device is None else [device]
    return measured_matmul_peak(size, repeats, devices), "measured matmul"


def mfu(flops_per_step_per_device: float, step_seconds: float, peak_flops: float) -> float:
    """Achieved over peak FLOP/s of one device."""
    return flops_per_step_per_device / step_seconds / peak_flops
