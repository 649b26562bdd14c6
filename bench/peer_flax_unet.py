"""The peer side of `bench/train_throughput.py --peer`: one training step of diffusers' Flax
`FlaxUNet2DConditionModel` (diffusers 0.35.2, the last release with Flax), timed as ours is.

Runs in its own environment (diffusers 0.35.2 conflicts with the project's diffusers), started
by train_throughput.py with one JSON argument. The step mirrors ours: uint8 images -> [-1, 1],
noise and timesteps drawn in the step, the UNet on a fixed context, MSE loss, clip + AdamW with
our optimizer's settings, EMA, the batch split over all devices and the state replicated.

Protocol (so that the parent can interleave its own timing rounds with the peer's and a shared
machine's load falls on both sides alike): after compiling and two warm-up steps it prints one
JSON line describing the step; then for every line "N" on stdin it runs N steps and prints
{"step_s": ..., "core_s": ..., "faults": ...} (wall and process CPU seconds and minor page
faults per step); it exits at the end of stdin.
"""

import json
import resource
import sys
import time


def main():
    spec = json.loads(sys.argv[1])
    # XLA_FLAGS (the CPU device split) and GLIBC_TUNABLES (huge pages) come from the parent's
    # environment.
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from diffusers import FlaxUNet2DConditionModel
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    # The compute dtype as ours (parameters stay float32: init_weights keeps param_dtype).
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[spec.get("dtype", "float32")]
    model = FlaxUNet2DConditionModel(
        **spec["unet"], dtype=dtype,
        use_memory_efficient_attention=spec.get("memory_efficient_attention", False))
    params = model.init_weights(jax.random.PRNGKey(0))
    batch, size, channels = spec["batch_size"], spec["image_size"], spec["unet"]["in_channels"]
    optim = spec["optim"]
    tx = optax.chain(
        optax.clip_by_global_norm(optim["grad_clip_norm"]),
        optax.adamw(optim["learning_rate"], b1=optim["b1"], b2=optim["b2"],
                    weight_decay=optim["weight_decay"]))
    ema_rate = 1.0 - optim["ema_decay"]
    # The EMA gets its own buffers: the state is donated to the step.
    state = {"params": params, "opt": tx.init(params),
             "ema": jax.tree_util.tree_map(jnp.copy, params), "step": jnp.zeros((), jnp.int32)}

    def train_step(state, images, context):
        rng = jax.random.fold_in(jax.random.PRNGKey(0), state["step"])
        rng_t, rng_noise = jax.random.split(rng)
        x = images.astype(jnp.float32) / 127.5 - 1.0
        noise = jax.random.normal(rng_noise, x.shape, jnp.float32)
        t = jax.random.randint(rng_t, (x.shape[0],), 0, 1000)
        alpha = jnp.cos(t.astype(jnp.float32) / 1000 * jnp.pi / 2)[:, None, None, None]
        noisy = alpha * x + jnp.sqrt(1 - alpha**2) * noise

        def loss_fn(params):
            # diffusers' Flax UNet takes NCHW.
            out = model.apply({"params": params}, noisy.transpose(0, 3, 1, 2), t, context).sample
            return jnp.mean((out.transpose(0, 2, 3, 1) - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: e + ema_rate * (p - e), state["ema"], params)
        return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, loss

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(state, rep)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch, size, size, channels), np.uint8), data)
    context = jax.device_put(
        rng.standard_normal((batch, spec["context_tokens"], spec["unet"]["cross_attention_dim"]),
                            np.float32), data)
    step = jax.jit(train_step, in_shardings=(rep, data, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))
    compiled = step.lower(state, images, context).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0
    for _ in range(2):
        state, loss = compiled(state, images, context)
    if not np.isfinite(float(loss)):
        raise SystemExit(f"the peer's loss is not finite: {float(loss)}")
    print(json.dumps({
        "diffusers": diffusers.__version__,
        "devices": jax.device_count(),
        "unet_params_m": round(sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6, 3),
        "gflops_per_step": flops / 1e9,
    }), flush=True)
    for line in sys.stdin:
        steps = int(line)
        start, start_cpu = time.perf_counter(), time.process_time()
        start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            state, loss = compiled(state, images, context)
        jax.block_until_ready(loss)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults
        print(json.dumps({"step_s": (time.perf_counter() - start) / steps,
                          "core_s": (time.process_time() - start_cpu) / steps,
                          "faults": faults / steps}), flush=True)


if __name__ == "__main__":
    main()
