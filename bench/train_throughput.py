"""Train-step throughput of a config on this machine, as one JSON line.

    python bench/train_throughput.py [--config configs/demo.py] [--steps 20] [--host_devices 2]

Reports step time, images/s, XLA's FLOP count per step, and the achieved FLOP/s as a ratio of
a jitted float32 2048x2048 matmul measured in the same process (the machine's practical peak),
so figures from a noisy shared machine stay comparable. The step runs as training runs it:
jitted with the batch sharded over a `data` mesh of all devices; `--host_devices N` splits the
CPU into N single-threaded XLA devices first (data parallelism across cores), as the CLIs'
`--cpu_devices` does.
"""

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--host_devices" in sys.argv:  # must be set before jax is imported
    from train.host_devices import split_host_cpu

    # As the CLIs' --cpu_devices: N single-threaded CPU devices.
    split_host_cpu(int(sys.argv[sys.argv.index("--host_devices") + 1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from models.factory import (  # noqa: E402
    build_frozen_text_encoder,
    build_unet,
    text_conditioning_fn,
)
from train.config_check import validate_config  # noqa: E402
from train.loop import schedule_from_config, synthetic_tokenizer_workdir  # noqa: E402
from train.sharding import batch_sharding, make_mesh, replicated  # noqa: E402
from train.state import TrainState, make_optimizer  # noqa: E402
from train.step import make_train_step  # noqa: E402


def load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_override(config, override: str) -> None:
    field, sep, raw = override.partition("=")
    if not sep:
        raise SystemExit(f"--set {override!r}: expected FIELD=VALUE")
    *parents, name = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    if name not in node:
        raise SystemExit(f"--set {override!r}: config has no field {field!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node[name] = value


def matmul_peak(size=2048, repeats=10):
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--host_devices", type=int, default=None,
                        help="CPU only: split the host into this many XLA devices")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.unet.patch_size=1 "
                             "(a Python literal, else a string); repeatable")
    args = parser.parse_args()
    config = load_config(args.config)
    for override in args.set:
        apply_override(config, override)
    validate_config(config)
    batch_size = args.batch_size or config.train.global_batch_size

    # The demo's BPE tokenizer is trained on captions when training starts; here on captions
    # of the synthetic generator, in a scratch workdir.
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(
        config.model, synthetic_tokenizer_workdir(config))
    unet_graphdef, params = nnx.split(build_unet(config.model, nnx.Rngs(0)))
    optimizer, lr_fn = make_optimizer(config.optim, config.train.num_train_steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params),
                       ema_params=jax.tree_util.tree_map(jnp.copy, params),
                       rng=jax.random.PRNGKey(0))
    mesh = make_mesh([("data", -1)])
    rep, data = replicated(mesh), batch_sharding(mesh, ("data",))
    state = jax.device_put(state, rep)
    text_params = jax.device_put(text_params, rep)
    step_fn = jax.jit(make_train_step(
        unet_graphdef=unet_graphdef,
        encode_text=text_conditioning_fn(config.model, tokenizer, text_graphdef),
        schedule=schedule_from_config(config), optimizer=optimizer, learning_rate_fn=lr_fn,
        config=config, empty_input_ids=jnp.asarray(tokenizer([""])[0])),
        in_shardings=(rep, rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
        "input_ids": np.asarray(tokenizer(["a red circle in the top left"] * batch_size)),
    }, data)
    compiled = step_fn.lower(state, text_params, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    # XLA reports the cost of one device's partition of the SPMD program.
    flops = (float(cost.get("flops", 0.0)) if cost else 0.0) * jax.device_count()
    for _ in range(2):
        state, metrics = compiled(state, text_params, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, text_params, batch)
    jax.block_until_ready(metrics)
    step_seconds = (time.perf_counter() - start) / args.steps
    peak = matmul_peak()
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(json.dumps({
        "bench": "train_throughput",
        "config": args.config,
        "overrides": args.set,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "unet_params_m": round(num_params / 1e6, 3),
        "batch_size": batch_size,
        "step_seconds": round(step_seconds, 4),
        "images_per_sec": round(batch_size / step_seconds, 1),
        "flops_per_step_g": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / step_seconds / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / step_seconds / peak, 3),
    }))


if __name__ == "__main__":
    main()
