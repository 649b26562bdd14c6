"""One builder of a training run: networks, sharded state, compiled step.

`build_run(config, mesh, workdir=...)` is what the training loop, the throughput bench and the
tests call, so they run the same program:

    frozen text encoder (tokenizer, graphdef, params placed by the sharding rules)
    [latent diffusion, `model.pretrained`: the frozen VAE, placed the same way]
    UNet graphdef -> abstract TrainState (eval_shape) -> its shardings (train.sharding rules)
    -> init: jit(init_state, out_shardings=...) - parameters are created in their shards, never
       whole on one device; with `model.pretrained` each device reads its shards of the
       pretrained UNet from the safetensors file instead (models.pretrained.load_unet_params)
    -> train step: jit(in/out shardings, state donated) -> .lower(...).compile() before any data
       is read, with per-device memory and FLOPs.
"""

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from diffusion.low_res import low_res_from_config
from diffusion.schedules import schedule_from_config
from models.factory import (
    abstract_trainable_unet,
    build_frozen_text_encoder,
    build_frozen_vae,
    build_unet,
    latent_decoder_fn,
    latent_encoder_fn,
    lora_options,
    text_conditioning_fn,
)
from models.lora import init_lora_params, merge_params
from models.pretrained import load_unet_params, resolve_pretrained_config
from train.mfu import jaxpr_matmul_flops
from train.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    check_batch_divides,
    replicated,
    sharded_bytes_per_device,
    tree_shardings,
)
from train.state import TrainState, init_train_state, make_optimizer
from train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run needs, built and compiled; `state` is the freshly initialised
    state when `build_run(init=True)`, else None (the caller restores a checkpoint into
    `abstract_state` / `state_shardings`)."""

    mesh: Mesh
    rules: tuple
    batch_axes: tuple[str, ...]
    global_batch_size: int
    tokenizer: Any
    text_graphdef: Any
    text_params: Any  # placed on the mesh
    text_shardings: Any
    encode_text: Callable  # encode(text_params, input_ids) -> {"hidden", "pooled"}
    unet_graphdef: Any
    schedule: Any
    optimizer: Any
    learning_rate_fn: Callable
    abstract_state: TrainState
    state_shardings: TrainState
    data_sharding: Any
    abstract_batch: dict
    init_state: Callable  # rng -> TrainState in its shardings (random, or the pretrained UNet)
    # jitted (state, text_params, batch, *extra_inputs) -> (state, metrics); donates state
    train_step: Callable
    compiled_step: Any  # train_step compiled for abstract_state / abstract_batch
    figures: dict  # per-device memory, FLOPs, parameter and state sizes
    rng: jax.Array
    state: TrainState | None = None
    # Latent diffusion (`model.pretrained`): the frozen VAE's parameters (placed on the mesh),
    # passed to the step after the batch, and its decoder for sample grids. None in pixel space.
    vae_params: Any = None
    decode_latents: Callable | None = None  # decode(vae_params, latents) -> images
    # LoRA (`model.lora.rank` > 0): the frozen UNet weights (placed on the mesh); the state's
    # params are the adapters alone. None otherwise.
    unet_base: Any = None
    # The UNet's graphdef without remat, for sampling (nnx.remat fails to trace inside the
    # solver loop; recomputation only matters for a backward pass). Same parameters.
    sample_unet_graphdef: Any = None

    @property
    def extra_inputs(self) -> tuple:
        """The step's frozen inputs after the batch: (vae_params,) for a latent model,
        (vae_params, unet_base) for LoRA."""
        frozen = () if self.vae_params is None else (self.vae_params,)
        return frozen if self.unet_base is None else (*frozen, self.unet_base)

    def full_unet_params(self, params):
        """One state for `nnx.merge(unet_graphdef, ...)`: LoRA adapters with the frozen base."""
        return params if self.unet_base is None else merge_params(self.unet_base, params)


def mesh_rules(config: ml_collections.ConfigDict) -> tuple:
    rules = config.mesh.get("rules", None)
    return tuple(tuple(rule) for rule in rules) if rules is not None else DEFAULT_RULES


def compiled_figures(compiled) -> dict:
    """Per-device memory (arguments + outputs + temporaries - aliased) and FLOPs of a compiled
    program, where the backend reports them."""
    figures = {}
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            figures["argument_bytes_per_device"] = int(memory.argument_size_in_bytes)
            figures["temp_bytes_per_device"] = int(memory.temp_size_in_bytes)
            figures["memory_bytes_per_device"] = int(
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes
            )
    except Exception:  # not every backend reports memory
        pass
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        if cost and "flops" in cost:
            # XLA reports the cost of one device's partition of the SPMD program.
            figures["flops_per_step_per_device"] = float(cost["flops"])
    except Exception:
        pass
    return figures


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_run(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    workdir: str | None,
    rng: jax.Array | None = None,
    init: bool = True,
    global_batch_size: int | None = None,
    process_count: int | None = None,
    compile: bool = True,
) -> Run:
    """Build and compile the run `config` describes on `mesh`.

    `workdir` holds what the data preparation left for the model (the demo's BPE tokenizer).
    `init=True` also creates the initial state (compiled in a second thread while the step
    compiles: XLA compiles each program on one core). `global_batch_size` overrides
    config.train.global_batch_size (the bench). `compile=False` skips the ahead-of-time
    compilation (`compiled_step` is None; `jax.eval_shape(run.train_step, ...)` still works).
    Raises ValueError before compiling when the batch does not divide over the mesh.
    """
    train_cfg = config.train
    batch_axes = tuple(config.mesh.batch_axes)
    rules = mesh_rules(config)
    global_batch = int(global_batch_size or train_cfg.global_batch_size)
    grad_accum_steps = int(train_cfg.get("grad_accum_steps", 1))
    check_batch_divides(
        global_batch, mesh, batch_axes, grad_accum_steps=grad_accum_steps,
        process_count=jax.process_count() if process_count is None else process_count)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    # The entry points resolve `model.pretrained` already (and log it); resolving is idempotent,
    # so direct callers (bench, tests) get the same model.
    config, _ = resolve_pretrained_config(config)

    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(config.model, workdir)
    text_shardings = tree_shardings(mesh, text_params, rules)
    text_params = jax.device_put(text_params, text_shardings)
    encode_text = text_conditioning_fn(config.model, tokenizer, text_graphdef)
    # With model.lora the state trains adapters and the pretrained UNet is a frozen input.
    unet_graphdef, _, abstract_base = abstract_trainable_unet(config.model)
    sample_unet_graphdef = abstract_trainable_unet(config.model, remat=False)[0]
    lora_kw = lora_options(config.model)
    build = lambda: build_unet(config.model, nnx.Rngs(0))
    optimizer, learning_rate_fn = make_optimizer(config.optim, train_cfg.num_train_steps)
    schedule = schedule_from_config(config.diffusion)

    def init_state(rng):
        if lora_kw:  # the adapters alone: XLA drops the unused base initialisation
            params = init_lora_params(build, jax.random.fold_in(rng, 1), **lora_kw)
        else:
            unet = build_unet(config.model, nnx.Rngs(params=jax.random.fold_in(rng, 1)))
            _, params = nnx.split(unet)
        return init_train_state(params, optimizer, jax.random.fold_in(rng, 2))

    abstract_state = jax.eval_shape(init_state, rng)
    state_shardings = tree_shardings(mesh, abstract_state, rules)
    jitted_init = jax.jit(init_state, out_shardings=state_shardings)
    pretrained = config.model.get("pretrained", "")
    unet_base = base_shardings = None
    if lora_kw:
        if not pretrained:
            raise ValueError("config.model.lora.rank > 0 needs config.model.pretrained (the "
                             "frozen UNet the adapters train on)")
        # The base keeps the plain UNet's tree: the pretrained loader fills it as it is.
        base_shardings = tree_shardings(mesh, abstract_base, rules)
        unet_base = load_unet_params(f"{pretrained}/unet", abstract_base, base_shardings)
    # With LoRA the state (fresh adapters) is initialised; the pretrained UNet is its base.
    state_from_pretrained = bool(pretrained) and not lora_kw
    if state_from_pretrained:
        from_params = jax.jit(
            lambda params, rng: init_train_state(params, optimizer, jax.random.fold_in(rng, 2)),
            out_shardings=state_shardings, donate_argnums=(0,))

        def load_state(rng):
            params = load_unet_params(f"{pretrained}/unet", abstract_state.params,
                                      state_shardings.params)
            return from_params(params, rng)

    vae = build_frozen_vae(config.model)
    vae_params = vae_shardings = None
    if vae is not None:
        vae_shardings = tree_shardings(mesh, vae.params, rules)
        vae_params = jax.device_put(vae.params, vae_shardings)
    data_sharding = batch_sharding(mesh, batch_axes)
    image_size = config.data.image_size
    abstract_batch = {
        "images": jax.ShapeDtypeStruct(
            (global_batch, image_size, image_size, 3), jnp.uint8, sharding=data_sharding),
        "input_ids": jax.ShapeDtypeStruct(
            (global_batch, tokenizer.max_length), jnp.int32, sharding=data_sharding),
    }
    step_kwargs = dict(
        encode_text=encode_text,
        schedule=schedule,
        optimizer=optimizer,
        learning_rate_fn=learning_rate_fn,
        diffusion=config.diffusion,
        caption_dropout_prob=train_cfg.caption_dropout_prob,
        ema_decay=config.optim.ema_decay,
        empty_input_ids=jnp.asarray(tokenizer([""])[0]),
        grad_accum_steps=grad_accum_steps,
        encode_images=None if vae is None else latent_encoder_fn(vae),
        noise_offset=float(config.diffusion.get("noise_offset", 0.0)),
        low_res=low_res_from_config(config.model),
    )
    step_fn = make_train_step(unet_graphdef=unet_graphdef, **step_kwargs)
    extra_shardings = () if vae is None else (vae_shardings,)
    if lora_kw:
        extra_shardings = (*extra_shardings, base_shardings)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, text_shardings, data_sharding, *extra_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

    # Compile before touching data: shape and memory errors surface in seconds. A fresh run
    # compiles the parameter initialisation at the same time, in a second thread: the random
    # initialisers take about as long to compile as the step.
    start = time.time()
    state = compiled_step = None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
        init_future = None
        if init and state_from_pretrained:  # reading the weights overlaps the step's compilation
            init_future = pool.submit(load_state, rng)
        elif init:
            init_future = pool.submit(jitted_init.lower(rng).compile)
        abstract_args = (
            _abstract(abstract_state, state_shardings),
            _abstract(text_params, text_shardings),
            abstract_batch,
            *(() if vae is None else (_abstract(vae_params, vae_shardings),)),
            *(() if unet_base is None else (_abstract(unet_base, base_shardings),)),
        )
        # Model FLOPs count the step's matrix work without what remat recomputes: with remat
        # on (or nothing traced for compiling) the step is traced with the UNet's plain graph.
        count_jaxpr = None
        if compile:
            traced = train_step.trace(*abstract_args)
            compiled_step = traced.lower().compile()
            if not config.model.unet.get("remat", False):
                count_jaxpr = traced.jaxpr
        if count_jaxpr is None:
            plain_step = make_train_step(unet_graphdef=sample_unet_graphdef, **step_kwargs)
            count_jaxpr = jax.make_jaxpr(plain_step)(*abstract_args)
        if init_future is not None:
            state = (init_future.result() if state_from_pretrained
                     else init_future.result()(rng))
    figures = compiled_figures(compiled_step) if compile else {}
    # The whole batch's matrix work (the global program), shared by the devices.
    figures["model_flops_per_step_per_device"] = jaxpr_matmul_flops(count_jaxpr) / mesh.size
    figures["compile_seconds"] = time.time() - start
    figures["unet_params"] = int(
        sum(x.size for x in jax.tree_util.tree_leaves(abstract_state.params)))
    figures["state_bytes_per_device"] = sharded_bytes_per_device(
        _abstract(abstract_state, state_shardings))
    logging.info(
        "compiled train step on %d devices %s (per device): %s", mesh.size, dict(mesh.shape),
        ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return Run(
        mesh=mesh, rules=rules, batch_axes=batch_axes, global_batch_size=global_batch,
        tokenizer=tokenizer, text_graphdef=text_graphdef, text_params=text_params,
        text_shardings=text_shardings,
        encode_text=encode_text, unet_graphdef=unet_graphdef, schedule=schedule,
        optimizer=optimizer, learning_rate_fn=learning_rate_fn, abstract_state=abstract_state,
        state_shardings=state_shardings, data_sharding=data_sharding,
        abstract_batch=abstract_batch,
        init_state=load_state if state_from_pretrained else jitted_init,
        train_step=train_step, compiled_step=compiled_step, figures=figures, rng=rng,
        state=state, vae_params=vae_params,
        decode_latents=None if vae is None else latent_decoder_fn(vae),
        unet_base=unet_base, sample_unet_graphdef=sample_unet_graphdef,
    )
