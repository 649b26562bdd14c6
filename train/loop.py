"""The training loop: data -> jitted step -> metrics, sample grids and Orbax checkpoints."""

import concurrent.futures
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from data_pipeline.pipeline import make_train_iterator, read_captions
from data_pipeline.shards import expand_shards
from data_pipeline.synthetic import sample_captions, write_synthetic_shards
from diffusion.schedules import make_schedule
from models.factory import (
    abstract_unet,
    build_frozen_text_encoder,
    build_unet,
    text_conditioning_fn,
)
from models.text_encoder import (
    TOKENIZER_FILE,
    save_bpe_tokenizer,
    train_bpe_tokenizer,
    uses_bpe_tokenizer,
)
from sample.denoise import denoise_fn_from_config, image_grid, image_keys, to_uint8
from train import checkpoint
from train.config_check import validate_config
from train.metrics import MetricWriter
from train.sharding import (
    batch_sharding,
    data_parallel_size,
    make_mesh,
    replicated,
    tree_shardings,
)
from train.state import TrainState, make_optimizer
from train.step import make_train_step

SYNTHETIC_DIR = "data"


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the last good checkpoint is left untouched."""


def schedule_from_config(config: ml_collections.ConfigDict):
    d = config.diffusion
    return make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end)


def held_out_combinations(config: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
    """config.data.synthetic_held_out ("red triangle", ...) as (colour, shape) pairs."""
    return tuple(tuple(item.split()) for item in config.data.synthetic_held_out)


def resolve_shards(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The shard list to stream; for the synthetic source, writes the demo shards once."""
    if config.data.source == "tar":
        return expand_shards(config.data.shards)
    data_dir = os.path.join(workdir, SYNTHETIC_DIR)
    info = os.path.join(data_dir, "dataset_info.json")
    if jax.process_index() == 0 and not os.path.exists(info):
        logging.info("writing the synthetic demo dataset to %s", data_dir)
        write_synthetic_shards(
            data_dir,
            num_samples=config.data.synthetic_num_samples,
            num_shards=config.data.synthetic_num_shards,
            image_size=config.data.image_size,
            seed=config.seed,
            two_shape_prob=config.data.synthetic_two_shape_prob,
            held_out=held_out_combinations(config),
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic_shards_written")
    return expand_shards(data_dir)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str, shards) -> None:
    """For the demo encoder's "bpe" tokenizer: train it on the first captions of the shards and
    save it in the workdir, once. A resumed run (or the sampler) reads the saved one, so token
    ids never change under a checkpoint."""
    text = config.model.text_encoder
    if not uses_bpe_tokenizer(text):
        return
    path = os.path.join(workdir, TOKENIZER_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        start = time.time()
        captions = read_captions(shards, text.bpe_train_captions, seed=config.seed)
        if not captions:
            raise ValueError(f"no captions in the shards to train the BPE tokenizer on: {shards}")
        tokenizer = train_bpe_tokenizer(captions, text.bpe_vocab_size, text.max_length)
        lengths = np.array([len(ids) for ids in tokenizer.tokenizer(captions)["input_ids"]])
        too_long = int((lengths > text.max_length).sum())
        logging.info(
            "trained a byte-level BPE tokenizer on %d captions in %.1fs: %d tokens, captions "
            "%d-%d tokens (mean %.1f) with the end token; max_length %d",
            len(captions), time.time() - start, tokenizer.vocab_size, lengths.min(),
            lengths.max(), lengths.mean(), text.max_length,
        )
        if too_long and config.data.source == "synthetic":
            raise ValueError(
                f"config.model.text_encoder.max_length={text.max_length} would truncate "
                f"{too_long} of {len(captions)} synthetic captions (the longest is "
                f"{lengths.max()} BPE tokens with the end token)"
            )
        if too_long:
            logging.warning("%d of %d captions (%.1f%%) are longer than max_length=%d tokens "
                            "and will be truncated", too_long, len(captions),
                            100 * too_long / len(captions), text.max_length)
        save_bpe_tokenizer(tokenizer, workdir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bpe_tokenizer_written")


def synthetic_tokenizer_workdir(config: ml_collections.ConfigDict, num_captions: int = 5000) -> str:
    """A scratch workdir with the BPE tokenizer a training run on the synthetic data would write
    (trained on `num_captions` generated captions): for benchmarks and tests that build the demo
    encoder without a training run. Nothing is written for other tokenizers."""
    workdir = tempfile.mkdtemp(prefix="t2i_tokenizer_")
    text = config.model.text_encoder
    if uses_bpe_tokenizer(text):
        captions = sample_captions(num_captions, seed=config.seed,
                                   two_shape_prob=config.data.synthetic_two_shape_prob,
                                   held_out=held_out_combinations(config))
        save_bpe_tokenizer(train_bpe_tokenizer(captions, text.bpe_vocab_size, text.max_length),
                           workdir)
    return workdir


def _log_compiled(compiled, num_devices: int) -> dict:
    figures = {}
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
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
            figures["flops_per_step_per_device"] = float(cost["flops"])
    except Exception:
        pass
    logging.info(
        "compiled train step on %d devices (per device): %s",
        num_devices,
        ", ".join(f"{k}={v:.4g}" for k, v in figures.items()) or "no cost figures",
    )
    return figures


def _global_batch(local_batch: dict, sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(sharding, local_batch[key])
        for key in ("images", "input_ids")
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train until config.train.num_train_steps, resuming from the latest checkpoint in workdir.

    Returns a summary: final step, last loss, images/s, data-pipeline counters.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    train_cfg = config.train
    is_main = jax.process_index() == 0

    mesh = make_mesh(config.mesh.shape)
    batch_axes = tuple(config.mesh.batch_axes)
    dp_size = data_parallel_size(mesh, batch_axes)
    global_batch = train_cfg.global_batch_size
    if global_batch % dp_size or global_batch % jax.process_count():
        raise ValueError(
            f"config.train.global_batch_size={global_batch} must be divisible by the data-parallel "
            f"size {dp_size} and the process count {jax.process_count()}"
        )
    checkpoint.save_config(workdir, config)
    shards = resolve_shards(config, workdir)
    prepare_tokenizer(config, workdir, shards)

    schedule = schedule_from_config(config)
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(config.model, workdir)
    replicated_sharding = replicated(mesh)
    text_params = jax.device_put(text_params, replicated_sharding)
    empty_ids = jnp.asarray(tokenizer([""])[0])
    encode_text = text_conditioning_fn(config.model, tokenizer, text_graphdef)
    unet_graphdef, _ = abstract_unet(config.model)
    optimizer, learning_rate_fn = make_optimizer(config.optim, train_cfg.num_train_steps)
    base_rng = jax.random.PRNGKey(config.seed)

    def init_state(rng):
        unet = build_unet(config.model, nnx.Rngs(params=jax.random.fold_in(rng, 1)))
        _, params = nnx.split(unet)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=params,
            rng=jax.random.fold_in(rng, 2),
        )

    abstract_state = jax.eval_shape(init_state, base_rng)
    state_shardings = tree_shardings(mesh, abstract_state)
    manager = checkpoint.make_manager(workdir, keep=train_cfg.keep_checkpoints)
    latest = manager.latest_step()
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(abstract_state.params))
    logging.info("UNet parameters: %.2fM", num_params / 1e6)

    data_sharding = batch_sharding(mesh, batch_axes)
    text_shardings = jax.tree_util.tree_map(lambda _: replicated_sharding, text_params)
    train_step = make_train_step(
        unet_graphdef=unet_graphdef,
        encode_text=encode_text,
        schedule=schedule,
        optimizer=optimizer,
        learning_rate_fn=learning_rate_fn,
        config=config,
        empty_input_ids=empty_ids,
    )
    image_size = config.data.image_size
    abstract_batch = {
        "images": jax.ShapeDtypeStruct(
            (global_batch, image_size, image_size, 3), jnp.uint8, sharding=data_sharding
        ),
        "input_ids": jax.ShapeDtypeStruct(
            (global_batch, tokenizer.max_length), jnp.int32, sharding=data_sharding
        ),
    }
    jitted_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, text_shardings, data_sharding),
        out_shardings=(state_shardings, replicated_sharding),
        donate_argnums=(0,),
    )
    # Compile before touching data: shape and memory errors surface in seconds. A fresh run
    # compiles the parameter initialisation at the same time, in a second thread: XLA compiles
    # each program on one core, and the random initialisers take about as long as the step.
    compile_start = time.time()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
        init_future = None
        if latest is None:
            # Parameters are created directly in their shardings, never whole on one device.
            init_lowered = jax.jit(init_state, out_shardings=state_shardings).lower(base_rng)
            init_future = pool.submit(init_lowered.compile)
        compiled_step = jitted_step.lower(abstract_state, text_params, abstract_batch).compile()
        cost = _log_compiled(compiled_step, mesh.size)
        if init_future is not None:
            state = init_future.result()(base_rng)
    logging.info("compile took %.1fs", time.time() - compile_start)
    if latest is not None:
        state, _ = checkpoint.restore_state(manager, latest, abstract_state, state_shardings)
        logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
    start_step = int(jax.device_get(state.step))

    writer = MetricWriter(workdir, enabled=is_main)
    sample_grid = _make_sample_grid_fn(
        config, unet_graphdef, schedule, tokenizer, encode_text, text_params
    )
    data_iter = make_train_iterator(
        shards,
        batch_size=global_batch // jax.process_count(),
        image_size=image_size,
        tokenizer=tokenizer,
        # A resumed run draws a fresh, still deterministic, data order.
        seed=config.seed * 1_000_003 + start_step,
        shuffle_buffer=config.data.shuffle_buffer,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=config.data.prefetch,
    )

    num_steps = train_cfg.num_train_steps
    summary = {"start_step": start_step, "step": start_step, **cost}
    progress = tqdm(
        total=num_steps, initial=start_step, disable=not is_main, desc="train", unit="step",
        dynamic_ncols=True,
    )
    window_start, window_images = time.time(), 0
    last_saved = start_step if latest is not None else None
    try:
        with data_iter:
            for step in range(start_step, num_steps):
                batch = _global_batch(next(data_iter), data_sharding)
                state, metrics = compiled_step(state, text_params, batch)
                window_images += global_batch
                done = step + 1
                progress.update(1)
                if done % train_cfg.log_every_steps == 0 or done == num_steps:
                    metrics = jax.device_get(metrics)
                    if not math.isfinite(float(metrics["loss"])):
                        raise NonFiniteLossError(
                            f"loss is {metrics['loss']} at step {done}; the last checkpoint "
                            f"(step {last_saved}) is kept. Lower config.optim.learning_rate?"
                        )
                    elapsed = time.time() - window_start
                    images_per_sec = window_images / max(elapsed, 1e-9)
                    window_start, window_images = time.time(), 0
                    scalars = {
                        "train/loss": metrics["loss"],
                        "train/learning_rate": metrics["learning_rate"],
                        "train/grad_norm": metrics["grad_norm"],
                        "train/images_per_sec": images_per_sec,
                    }
                    scalars.update(
                        {f"data/{k}": v for k, v in data_iter.stats.as_dict().items()}
                    )
                    writer.scalars(done, scalars)
                    progress.set_postfix(
                        loss=f"{float(metrics['loss']):.4f}", img_s=f"{images_per_sec:.0f}"
                    )
                    summary.update(
                        step=done, loss=float(metrics["loss"]), images_per_sec=images_per_sec
                    )
                if train_cfg.sample_every_steps and (
                    done % train_cfg.sample_every_steps == 0 or done == num_steps
                ):
                    writer.image(done, "samples/ema", sample_grid(state.ema_params))
                if done % train_cfg.checkpoint_every_steps == 0 or done == num_steps:
                    checkpoint.save(
                        manager, state, config=config, data_state=data_iter.stats.as_dict()
                    )
                    last_saved = done
                    writer.flush()
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    summary["step"] = int(jax.device_get(state.step))
    summary["data"] = data_iter.stats.as_dict()
    return summary


def _make_sample_grid_fn(config, unet_graphdef, schedule, tokenizer, encode_text, text_params):
    """EMA samples for config.train.sample_prompts, tiled into one grid image."""
    prompts = list(config.train.sample_prompts)
    if not prompts:
        return lambda params: np.zeros((1, 1, 3), np.uint8)
    encode = jax.jit(encode_text)
    context = encode(text_params, jnp.asarray(tokenizer(prompts)))
    uncond = encode(text_params, jnp.asarray(tokenizer([""] * len(prompts))))
    keys = image_keys(config.seed, np.arange(len(prompts)))
    denoise = jax.jit(denoise_fn_from_config(unet_graphdef, schedule, config))

    def grid(ema_params):
        images = to_uint8(denoise(ema_params, context, uncond, keys))
        return image_grid(images, columns=len(prompts))

    return grid
