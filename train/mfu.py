"""Peak FLOP/s of the device a step runs on, for model-FLOPs-utilisation (MFU) figures.

Accelerators: the vendor's dense bf16 peak per device (chip), no sparsity. CPUs have no fixed
figure: `measured_matmul_peak()` times a jitted float32 matmul on this machine instead.
"""

import time

import jax
import jax.numpy as jnp

# (substring of jax's device_kind, lower-case) -> dense bf16 FLOP/s per device. More specific
# names first: "h100 pcie" before "h100".
PEAK_BF16_FLOPS = (
    ("h200", 989e12),  # H200 SXM: the H100 SXM's tensor cores, more memory
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # H100 SXM5
    ("a100", 312e12),
    ("tpu v6", 918e12),  # v6e (Trillium)
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12),
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


def measured_matmul_peak(size: int = 2048, repeats: int = 10, device=None) -> float:
    """FLOP/s of a jitted float32 [size x size] matmul on one device: the practical peak of a
    CPU (or anything missing from the table), measured now so a shared machine's load shows in
    numerator and denominator alike."""
    device = jax.devices()[0] if device is None else device
    matrix = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(matrix).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(matrix).block_until_ready()
        times.append(time.perf_counter() - start)
    # The median: robust to another process taking the cores for one repeat.
    return 2 * size**3 / sorted(times)[len(times) // 2]


def device_peak_flops(device=None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it comes from: "table" or "measured matmul")."""
    peak = peak_flops_per_device(device)
    if peak is not None:
        return peak, "table"
    return measured_matmul_peak(device=device), "measured matmul"


def mfu(flops_per_step_per_device: float, step_seconds: float, peak_flops: float) -> float:
    """Achieved over peak FLOP/s of one device."""
    return flops_per_step_per_device / step_seconds / peak_flops
