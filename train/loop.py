"""The training loop: data -> jitted step -> metrics, sample grids and Orbax checkpoints."""

import contextlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from data_pipeline import input_pipeline
from diffusion.low_res import (
    DEFAULT_SAMPLE_NOISE_LEVEL,
    downsample,
    low_res_from_config,
    with_low_res_inputs,
)
from diffusion.sampling import (
    image_grid,
    make_denoise_fn,
    make_solver,
    nearest_upsample,
    to_uint8,
)
from models.factory import abstract_trainable_unet, denoiser_apply_fn
from train import checkpoint, lock, mfu
from train.config_check import ConfigError, resolve_and_validate
from train.metrics import MetricWriter
from train.preemption import PreemptionWatch
from train.setup import build_run
from train.sharding import check_batch_divides, data_parallel_size, make_mesh


class NonFiniteLossError(FloatingPointError):
    """Training diverged (too many non-finite steps in a row); the last good checkpoint is kept."""


def _global_batch(local_batch: dict, sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(sharding, local_batch[key])
        for key in ("images", "input_ids")
    }


@contextlib.contextmanager
def _workdir_lock(workdir):
    """Process 0 holds the workdir lock; every process learns whether it got it, so a refused
    multi-host launch stops everywhere instead of hanging at the next barrier."""
    error, path = None, None
    if jax.process_index() == 0:
        try:
            path = lock.acquire(workdir)
        except lock.WorkdirLockedError as refused:
            error = refused
    if jax.process_count() > 1:
        taken = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken and error is None:
            error = lock.WorkdirLockedError(
                f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if error is not None:
        raise error
    try:
        yield path
    finally:
        if path is not None:
            lock.release(path)


def _sharding_summary(abstract_state, state_shardings) -> dict:
    """Leaves and per-device bytes of the state, split into sharded and replicated."""
    sharded = replicated_leaves = 0
    per_device = total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract_state),
                              jax.tree_util.tree_leaves(state_shardings), strict=True):
        size = leaf.size * leaf.dtype.itemsize
        shard_shape = sharding.shard_shape(leaf.shape)
        shard = int(np.prod(shard_shape)) * leaf.dtype.itemsize
        total += size
        per_device += shard
        if shard < size:
            sharded += 1
        else:
            replicated_leaves += 1
    return {"state_leaves_sharded": sharded, "state_leaves_replicated": replicated_leaves,
            "state_bytes_total": total, "state_bytes_per_device": per_device}


def format_plan(plan: dict) -> str:
    """The --dry_run plan as lines for the console."""
    mib = 1 << 20
    lines = [
        f"mesh: {plan['mesh']} ({plan['num_devices']} devices, {plan['num_processes']} "
        f"processes, {plan['backend']})",
        f"batch: global {plan['global_batch_size']}, per process {plan['batch_per_process']}, "
        f"per device {plan['batch_per_device']}",
        f"UNet parameters: {plan['num_params'] / 1e6:.2f}M",
        f"state: {plan['state_bytes_total'] / mib:.1f} MiB total, "
        f"{plan['state_bytes_per_device'] / mib:.1f} MiB per device "
        f"({plan['state_leaves_sharded']} arrays sharded, "
        f"{plan['state_leaves_replicated']} replicated)",
    ]
    if "memory_bytes_per_device" in plan:
        lines.append(f"compiled step memory per device: "
                     f"{plan['memory_bytes_per_device'] / mib:.1f} MiB")
    if "model_flops_per_step_per_device" in plan:
        lines.append(f"model FLOPs per step per device (matmuls, convolutions, attention): "
                     f"{plan['model_flops_per_step_per_device']:.4g}")
    if "flops_per_step_per_device" in plan:
        lines.append(f"XLA's FLOPs per step per device: {plan['flops_per_step_per_device']:.4g}")
    lines.append(f"first batch: images {plan['first_batch']['images']}, input_ids "
                 f"{plan['first_batch']['input_ids']} (this process)")
    lines.append(f"checkpoints: {plan['checkpoint_dir']} (latest step: {plan['latest_step']})")
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dry_run: bool = False) -> dict:
    """Train until config.train.num_train_steps, resuming from the latest checkpoint in workdir.

    Returns a summary: final step, last loss, images/s, data-pipeline counters; `preempted` when
    a SIGTERM (preemption notice) stopped it after saving. With `dry_run`: validate the config,
    mesh and data, compile, and return the plan without training or writing checkpoints.

    With `model.pretrained` the model and diffusion fields are taken from that directory
    first (logged); the checkpoints store the resolved config.
    """
    config, taken = resolve_and_validate(config)
    for line in taken:
        logging.info("pretrained: %s", line)
    workdir = checkpoint.workdir_path(workdir)
    if dry_run:
        return _run(config, workdir, dry_run=True, preemption=None)
    # SIGTERM is watched from the start: a notice during start-up saves after the first step.
    with _workdir_lock(workdir), PreemptionWatch() as preemption:
        return _run(config, workdir, dry_run=False, preemption=preemption)


def _run(config: ml_collections.ConfigDict, workdir, *, dry_run: bool, preemption) -> dict:
    train_cfg = config.train
    global_batch = train_cfg.global_batch_size
    batch_axes = tuple(config.mesh.batch_axes)
    # Mesh and batch problems are config problems: reported as such, before anything is written.
    try:
        mesh = make_mesh(config.mesh.shape)
        check_batch_divides(global_batch, mesh, batch_axes,
                            process_count=jax.process_count(),
                            grad_accum_steps=train_cfg.get("grad_accum_steps", 1))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    dp_size = data_parallel_size(mesh, batch_axes)
    # A relaunch with another model stops here, before anything in the workdir changes.
    latest = checkpoint.latest_step(workdir)
    if latest is not None:
        checkpoint.check_compatible(workdir, latest, config,
                                    abstract_trainable_unet(config.model)[1])
    input_pipeline.prepare_inputs(config, str(workdir))
    if not dry_run:
        checkpoint.save_config(workdir, config)

    fresh = latest is None and not dry_run
    # Networks, sharded state, compiled step (and, for a fresh run, the initial state).
    run = build_run(config, mesh, workdir=str(workdir), init=fresh)
    tokenizer, text_params, encode_text = run.tokenizer, run.text_params, run.encode_text
    schedule, data_sharding = run.schedule, run.data_sharding
    abstract_state, state_shardings = run.abstract_state, run.state_shardings
    compiled_step, state, cost = run.compiled_step, run.state, run.figures
    extra_inputs = run.extra_inputs
    num_params = cost["unet_params"]

    batch_per_process = global_batch // jax.process_count()
    data_iter = _open_data(config, workdir, tokenizer, batch_per_process)
    if dry_run:
        with data_iter:
            first = next(data_iter)
        return {
            "mesh": dict(mesh.shape), "num_devices": mesh.size,
            "num_processes": jax.process_count(), "backend": jax.default_backend(),
            "global_batch_size": global_batch, "batch_per_process": batch_per_process,
            "batch_per_device": global_batch // dp_size, "num_params": int(num_params),
            **_sharding_summary(abstract_state, state_shardings), **cost,
            "first_batch": {k: tuple(np.shape(first[k])) for k in ("images", "input_ids")},
            "checkpoint_dir": str(checkpoint.checkpoint_dir(workdir)), "latest_step": latest,
        }

    manager = checkpoint.make_manager(
        workdir, keep=train_cfg.keep_checkpoints, keep_period=train_cfg.get("keep_period", 0))
    if latest is not None:
        state, _ = checkpoint.restore_state(manager, latest, abstract_state, state_shardings)
        if not checkpoint.restore_data_iter(manager, latest, data_iter):
            logging.warning("checkpoint %d has no data-iterator position: the data order "
                            "restarts from the beginning", latest)
        logging.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), latest)
    start_step = int(jax.device_get(state.step))
    try:
        return _train_loop(
            config, workdir, state=state, compiled_step=compiled_step, text_params=text_params,
            extra_inputs=extra_inputs,
            data_iter=data_iter, data_sharding=data_sharding, manager=manager,
            start_step=start_step, last_saved=latest, cost=cost, preemption=preemption,
            sample_grid=_make_sample_grid_fn(
                config, run.sample_unet_graphdef, schedule, tokenizer, encode_text,
                text_params, vae_params=run.vae_params, decode_latents=run.decode_latents,
                unet_params=run.full_unet_params)
            if train_cfg.sample_every_steps else None,
        )
    finally:
        manager.wait_until_finished()
        manager.close()


def _train_loop(config, workdir, *, state, compiled_step, text_params, extra_inputs, data_iter,
                data_sharding, manager, start_step, last_saved, cost, preemption,
                sample_grid) -> dict:
    train_cfg = config.train
    is_main = jax.process_index() == 0
    global_batch = train_cfg.global_batch_size
    num_steps = train_cfg.num_train_steps
    max_in_a_row = train_cfg.get("max_consecutive_nonfinite", 0)
    # MFU counts the model's matrix work (the same on every backend), not XLA's estimate.
    flops = cost.get("model_flops_per_step_per_device")
    # On CPU a small matmul keeps the peak measurement to a fraction of a second.
    peak, peak_source = mfu.device_peak_flops(size=1024, repeats=5) if flops else (None, "")
    if peak:
        logging.info("MFU against %.4g FLOP/s per device (%s)", peak, peak_source)

    writer = MetricWriter(str(workdir), enabled=is_main)
    summary = {"start_step": start_step, "step": start_step, "preempted": False, **cost}
    progress = tqdm(
        total=num_steps, initial=start_step, disable=not is_main, desc="train", unit="step",
        dynamic_ncols=True,
    )
    window_start, window_steps = time.time(), 0
    previous_metrics = preview = None

    def stop_if_diverged(metrics, done):
        # nonfinite_in_a_row is read one step late, so the host never waits for the step it
        # just dispatched; the skipped updates left the state as it was.
        in_a_row = int(jax.device_get(metrics["nonfinite_in_a_row"]))
        if max_in_a_row and in_a_row >= max_in_a_row:
            kept = (f"step {last_saved} in {checkpoint.checkpoint_dir(workdir)} is kept"
                    if last_saved is not None else "no checkpoint was written")
            raise NonFiniteLossError(
                f"{in_a_row} non-finite steps in a row (steps {done - in_a_row + 1}-{done}, "
                f"config.train.max_consecutive_nonfinite={max_in_a_row}): stopping at step "
                f"{done}; the last good checkpoint, {kept}. Lower config.optim.learning_rate?")

    def save(done, *, force=False):
        nonlocal last_saved
        try:
            checkpoint.save(manager, state, config=config,
                            data_iter=data_iter, data_counters=data_iter.counters(),
                            force=force)
        except checkpoint.NonFiniteParametersError as error:
            raise NonFiniteLossError(
                f"{error} (step {done}); the last good checkpoint (step {last_saved}) is kept"
            ) from error
        last_saved = done
        writer.flush()

    try:
        with data_iter:
            for step in range(start_step, num_steps):
                local = next(data_iter)
                if preview is None:  # a super-resolution model's grids upscale these
                    preview = _preview_examples(local, len(config.train.sample_prompts))
                batch = _global_batch(local, data_sharding)
                state, metrics = compiled_step(state, text_params, batch, *extra_inputs)
                done = step + 1
                window_steps += 1
                progress.update(1)
                if previous_metrics is not None:
                    stop_if_diverged(previous_metrics, done - 1)
                previous_metrics = metrics
                if done % train_cfg.log_every_steps == 0 or done == num_steps:
                    metrics = jax.device_get(metrics)
                    elapsed = time.time() - window_start
                    step_seconds = elapsed / max(window_steps, 1)
                    images_per_sec = global_batch / max(step_seconds, 1e-9)
                    window_start, window_steps = time.time(), 0
                    scalars = {
                        "train/loss": metrics["loss"],
                        "train/learning_rate": metrics["learning_rate"],
                        "train/grad_norm": metrics["grad_norm"],
                        "train/skipped_nonfinite": metrics["skipped_nonfinite"],
                        "train/step_seconds": step_seconds,
                        "train/images_per_sec": images_per_sec,
                    }
                    if flops:
                        scalars["train/tflops_per_device"] = flops / step_seconds / 1e12
                    if peak:
                        scalars["train/mfu"] = mfu.mfu(flops, step_seconds, peak)
                    scalars.update({f"data/{k}": v for k, v in data_iter.counters().items()})
                    writer.scalars(done, scalars)
                    progress.set_postfix(
                        loss=f"{float(metrics['loss']):.4f}", img_s=f"{images_per_sec:.0f}"
                    )
                    summary.update(
                        step=done, loss=float(metrics["loss"]), images_per_sec=images_per_sec,
                        step_seconds=step_seconds, skipped_nonfinite=int(
                            metrics["skipped_nonfinite"]),
                    )
                    if "train/mfu" in scalars:
                        summary["mfu"] = float(scalars["train/mfu"])
                if train_cfg.sample_every_steps and (
                    done % train_cfg.sample_every_steps == 0 or done == num_steps
                ):
                    writer.image(done, "samples/ema", sample_grid(state.ema_params, preview))
                saved_now = False
                if done % train_cfg.checkpoint_every_steps == 0 or done == num_steps:
                    stop_if_diverged(metrics, done)
                    save(done)
                    saved_now = True
                # Every host asks at every step; all of them see True at the same step.
                if preemption.reached(done):
                    if not saved_now:
                        stop_if_diverged(metrics, done)
                        save(done, force=True)
                    logging.warning("preemption notice: saved step %d in %s; exiting", done,
                                    checkpoint.checkpoint_dir(workdir))
                    summary.update(step=done, preempted=True)
                    break
    finally:
        progress.close()
        writer.close()
    summary["step"] = int(jax.device_get(state.step))
    summary["data"] = data_iter.counters()
    return summary


def _open_data(config, workdir, tokenizer, batch_per_process: int):
    return input_pipeline.make_train_iterator(
        config.data, workdir=str(workdir), tokenizer=tokenizer, batch_size=batch_per_process,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())


def _preview_examples(local_batch: dict, count: int) -> dict:
    """The first `count` examples of the first batch (process 0's, the same on every host)."""
    preview = {key: np.asarray(local_batch[key][:count]) for key in ("images", "input_ids")}
    if jax.process_count() > 1:
        preview = multihost_utils.broadcast_one_to_all(preview)
    return preview


def _make_sample_grid_fn(config, unet_graphdef, schedule, tokenizer, encode_text, text_params,
                         *, vae_params=None, decode_latents=None, unet_params=lambda p: p):
    """grid(ema_params, preview) -> uint8 grid of EMA samples for config.train.sample_prompts
    with the config's solver (latents decoded by the frozen VAE for a latent model).

    A super-resolution model upscales the first examples of the first batch (`preview`, their
    captions as prompts) instead: rows of low-res inputs (nearest-upsampled), upscaled
    samples and the real images."""
    low_res = low_res_from_config(config.model)
    count = len(config.train.sample_prompts)
    if not count:
        return lambda params, preview=None: np.zeros((1, 1, 3), np.uint8)
    encode = jax.jit(encode_text)
    sample = config.sample
    solver = make_solver(sample.sampler, schedule, config.diffusion.prediction_type,
                         sample.steps, timestep_spacing=sample.timestep_spacing,
                         karras_sigmas=sample.get("karras_sigmas", False), eta=sample.eta,
                         steps_offset=sample.get("steps_offset", 0))
    apply = denoiser_apply_fn(unet_graphdef, super_resolution=low_res is not None)
    size, channels = config.model.unet.sample_size, config.model.unet.out_channels
    rescale = sample.get("guidance_rescale", 0.0)
    if decode_latents is None:
        denoise = make_denoise_fn(apply, solver, (size, size, channels), guidance_rescale=rescale)
        frozen = ()
    else:
        from sample.pipeline import make_latent_image_fn

        denoise = make_latent_image_fn(apply, solver, (size, size, channels), decode_latents,
                                       guidance_rescale=rescale)
        frozen = (vae_params,)
    if low_res is not None:
        denoise = with_low_res_inputs(denoise, low_res)
    denoise = jax.jit(denoise)
    seeds = np.full((count,), config.seed, np.uint32)
    indices = np.arange(count, dtype=np.uint32)
    scales = np.full((count,), sample.cfg_scale, np.float32)
    empty = jnp.asarray(tokenizer([""] * count))

    if low_res is None:
        context = encode(text_params, jnp.asarray(tokenizer(list(config.train.sample_prompts))))
        uncond = encode(text_params, empty)

        def grid(ema_params, preview=None):
            # (LoRA: the EMA adapters with the frozen base, one state for the graphdef)
            images = to_uint8(denoise(unet_params(ema_params), *frozen, context, uncond, seeds,
                                      indices, scales))
            return image_grid(images, columns=count)

        return grid

    noise_level = int(sample.get("noise_level", DEFAULT_SAMPLE_NOISE_LEVEL))

    def grid(ema_params, preview):
        real = np.asarray(preview["images"])
        shown = len(real)
        low = downsample(jnp.asarray(real, jnp.float32) / 127.5 - 1.0, low_res.factor)
        images = to_uint8(denoise(
            unet_params(ema_params), *frozen, encode(text_params, preview["input_ids"]),
            encode(text_params, empty[:shown]), seeds[:shown], indices[:shown], scales[:shown],
            low, np.full((shown,), noise_level, np.int32)))
        up = nearest_upsample(to_uint8(low), low_res.factor)
        return image_grid(np.concatenate([up, images, real]), columns=shown)

    return grid
