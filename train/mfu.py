"""Model FLOPs of a step and the peak FLOP/s of the device it runs on, for model-FLOPs-
utilisation (MFU) figures.

Model FLOPs (`jaxpr_matmul_flops`) are counted from the step's jaxpr, the same on every
backend: XLA's own cost analysis depends on how a backend lowers the program (a cuDNN fused
attention is a custom call it cannot see into). Accelerators: the vendor's dense bf16 peak per
device (chip), no sparsity. CPUs have no fixed figure: `measured_matmul_peak()` times a jitted
float32 matmul on this machine instead.
"""

import math
import time

import jax
import jax.extend.core
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


def attention_flops(primitive: str, query_shape, key_shape, layout: int = 0) -> float:
    """FLOPs of a fused attention primitive (jax's cuDNN `dot_product_attention_fwd` /
    `_bwd`, wrapped or not): the forward pass is two [T, S] x head_dim products per head, the
    backward pass four. `layout` 0 is [batch, tokens, heads, head_dim], 1 heads before tokens."""
    if layout == 1:
        batch, heads, queries, head_dim = query_shape
        keys = key_shape[2]
    else:
        batch, queries, heads, head_dim = query_shape
        keys = key_shape[1]
    products = 4 if "_bwd" in primitive else 2
    return 2.0 * products * batch * heads * queries * keys * head_dim


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
            lhs[d] for d in contracting)
    if name == "conv_general_dilated":
        # Each output element sums over the kernel window of its input features: the kernel's
        # size over its output features (grouped and transposed convolutions included).
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
    if name.startswith(("dot_product_attention_fwd", "dot_product_attention_bwd")):
        query, key = (v.aval.shape for v in eqn.invars[:2])
        layout = eqn.params.get("layout", 0)
        return attention_flops(name, query, key, getattr(layout, "value", layout))
    return 0.0


def jaxpr_matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix work in a (closed) jaxpr: dot_general, conv_general_dilated and
    fused attention, from their shapes, through nested jaxprs (a scan's body times its length,
    a cond's costliest branch). Elementwise work is left out, as MFU conventions do; work
    recomputed by remat is counted as it runs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        if eqn.primitive.name == "cond":
            total += max(jaxpr_matmul_flops(branch) for branch in eqn.params["branches"])
            continue
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeats * jaxpr_matmul_flops(sub)
    return total
