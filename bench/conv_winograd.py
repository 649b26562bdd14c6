"""Winograd F(2x2, 3x3) against XLA's own 3x3 convolution, on one single-threaded CPU device.

    python bench/conv_winograd.py            # the peer-size UNet's 3x3 convolutions, batch 16
    python bench/conv_winograd.py --config configs/demo.py --batch 32

An experiment, not a code path of the pipeline: it asks whether trading multiplies for
transforms could take the train step past what XLA's convolutions give on CPU. Winograd
F(2x2, 3x3) needs 16 products per 2x2 output tile instead of 36, so its matrix work is 2.25x
smaller; in exchange, every convolution transforms its input (to 4x its size), its output and,
in the backward pass, their gradients, all memory-bound elementwise passes.

The stride-1 3x3 convolutions are read off the UNet's forward pass at the bench's batch per
device (the peer-size UNet's unless --config names another), and each distinct shape is timed
forward and forward + backward (input and weight gradients), XLA's `conv_general_dilated`
against a Winograd version written in jax.numpy, CPU seconds, median of --runs. One JSON line
per shape, then one with the totals over every convolution of the forward pass (each shape
weighted by how often it occurs), the same for the Winograd products alone (the ceiling if
the transforms cost nothing), and the largest relative error of the Winograd outputs and
gradients against XLA's.
"""

import argparse
import collections
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Transform matrices of F(2x2, 3x3) (Lavin & Gray 2015): Y = A^T [(G g G^T) * (B^T d B)] A.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_conv3x3(x, w):
    """SAME-padded, stride-1 3x3 convolution of NHWC `x` with HWIO `w`, by Winograd F(2x2,3x3)."""
    import jax.numpy as jnp
    from jax import lax

    n, h, wd, c = x.shape
    out = w.shape[-1]
    th, tw = (h + 1) // 2, (wd + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))

    def input_transform(d, axis, tiles):  # B^T along one axis: 4 values per tile start 2t
        def rows(k):
            return lax.slice_in_dim(d, k, k + 2 * tiles - 1, stride=2, axis=axis)
        d0, d1, d2, d3 = rows(0), rows(1), rows(2), rows(3)
        return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3], axis=0)

    v = input_transform(input_transform(xp, 1, th), 3, tw)  # [4 (w), 4 (h), n, th, tw, c]
    v = v.reshape(16, n * th * tw, c)
    g = jnp.asarray(_G, w.dtype)
    u = jnp.einsum("ai,ijco,bj->baco", g, w, g).reshape(16, c, out)  # same (w, h) order
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, out)
    # A^T along w (leading axis), then along h.
    mw = jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]], axis=0)
    y = jnp.stack([mw[:, 0] + mw[:, 1] + mw[:, 2], mw[:, 1] - mw[:, 2] - mw[:, 3]], axis=1)
    y = jnp.transpose(y, (2, 3, 1, 4, 0, 5)).reshape(n, 2 * th, 2 * tw, out)
    return y[:, :h, :wd]


def xla_conv3x3(x, w):
    from jax import lax

    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def unet_conv_shapes(config, batch: int) -> collections.Counter:
    """(batch, height, width, in, out) of each stride-1 3x3 convolution of the UNet's forward
    pass, counted, read off its jaxpr (nothing is run)."""
    import jax
    import jax.extend.core
    import jax.numpy as jnp
    from flax import nnx

    from models.factory import build_unet

    unet = config.model.unet
    size = config.data.image_size
    text = config.model.text_encoder
    model = nnx.eval_shape(lambda: build_unet(config.model, nnx.Rngs(0), remat=False))
    sample = jax.ShapeDtypeStruct((batch, size, size, unet.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((batch, text.max_length, unet.cross_attention_dim),
                                   jnp.float32)
    graph, params = nnx.split(model)

    def forward(params, x, c):
        return nnx.merge(graph, params)(x, jnp.zeros((batch,), jnp.int32), c)

    shapes = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                if rhs[:2] == (3, 3) and tuple(eqn.params["window_strides"]) == (1, 1):
                    shapes[(*lhs, rhs[3])] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(forward)(params, sample, context).jaxpr)
    return shapes


def main():
    from train.host_devices import restart_with_huge_pages

    restart_with_huge_pages()  # as the CLIs and the train bench do
    # One single-threaded device: one core's share of the CLIs' default split.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="config file (default: the peer-size UNet of "
                             "bench/train_throughput.py --peer)")
    parser.add_argument("--batch", type=int, default=16,
                        help="batch per device (the peer-size bench: 32 over 2 devices)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_throughput

    if args.config:
        config = train_throughput.load_config(args.config)
    else:
        config = train_throughput.peer_size_config(
            train_throughput.load_config(os.path.join(ROOT, "configs", "demo.py")))
    shapes = unet_conv_shapes(config, args.batch)

    def cpu_seconds(fn, *operands):
        jax.block_until_ready(fn(*operands))
        times = []
        for _ in range(args.runs):
            start = time.process_time()
            jax.block_until_ready(fn(*operands))
            times.append(time.process_time() - start)
        return float(np.median(times))

    rng = np.random.default_rng(0)
    totals = collections.Counter()
    worst_error = 0.0
    for (n, h, wd, c, out), count in sorted(shapes.items()):
        x = jnp.asarray(rng.standard_normal((n, h, wd, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, out)) / np.sqrt(9 * c), jnp.float32)
        cot = jnp.asarray(rng.standard_normal((n, h, wd, out)), jnp.float32)
        figures = {}
        outputs = {}
        for name, conv in (("xla", xla_conv3x3), ("winograd", winograd_conv3x3)):
            forward = jax.jit(conv)
            loss = lambda x, w, conv=conv, cot=cot: jnp.vdot(conv(x, w), cot)  # noqa: E731
            both = jax.jit(jax.grad(loss, (0, 1)))
            figures[f"{name}_forward_ms"] = 1e3 * cpu_seconds(forward, x, w)
            figures[f"{name}_forward_backward_ms"] = 1e3 * cpu_seconds(both, x, w)
            outputs[name] = (forward(x, w), *both(x, w))
        # The Winograd products alone, forward + backward (the ceiling with free transforms):
        # 16 matrix products [tiles, in] x [in, out] and their two gradients.
        tiles = n * ((h + 1) // 2) * ((wd + 1) // 2)
        v = jnp.asarray(rng.standard_normal((16, tiles, c)), jnp.float32)
        u = jnp.asarray(rng.standard_normal((16, c, out)), jnp.float32)
        m_cot = jnp.asarray(rng.standard_normal((16, tiles, out)), jnp.float32)
        products = jax.jit(jax.grad(lambda v, u, m_cot=m_cot: jnp.vdot(
            jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))), m_cot), (0, 1)))
        figures["winograd_products_only_forward_backward_ms"] = 1e3 * cpu_seconds(products, v, u)
        error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                    for a, b in zip(outputs["xla"], outputs["winograd"], strict=True))
        worst_error = max(worst_error, error)
        for key, value in figures.items():
            totals[key] += count * value
        print(json.dumps({
            "shape_nhwc_in_out": [n, h, wd, c, out], "count": count,
            **{k: round(v, 2) for k, v in figures.items()},
            "forward_speedup": round(figures["xla_forward_ms"] / figures["winograd_forward_ms"], 3),
            "forward_backward_speedup": round(figures["xla_forward_backward_ms"]
                                              / figures["winograd_forward_backward_ms"], 3),
            "max_relative_error": float(f"{error:.2e}"),
        }))
    print(json.dumps({
        "bench": "conv_winograd", "config": args.config or "peer-size UNet",
        "batch_per_device": args.batch, "convolutions": sum(shapes.values()),
        **{f"total_{k}": round(v, 1) for k, v in totals.items()},
        "total_forward_speedup": round(totals["xla_forward_ms"]
                                       / totals["winograd_forward_ms"], 3),
        "total_forward_backward_speedup": round(totals["xla_forward_backward_ms"]
                                                / totals["winograd_forward_backward_ms"], 3),
        # The speed-up if the transforms cost nothing: the products alone against XLA's.
        "total_products_only_speedup": round(
            totals["xla_forward_backward_ms"]
            / totals["winograd_products_only_forward_backward_ms"], 3),
        "max_relative_error": float(f"{worst_error:.2e}"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }))


if __name__ == "__main__":
    main()
