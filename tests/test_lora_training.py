"""LoRA fine-tuning through the train builder: adapters alone in the state, the pretrained UNet
a frozen step input, a few steps lower the loss, grids sample the adapted model. Slow: the
checkpoint through the sampler and the exporter into diffusers, shared LoRA files on any run,
and the train / sample CLIs (LoRA run, resume, a kohya-named file, one-line errors)."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune_sd
from models.lora import LORA_PARAMS, count_params
from tests.tiny_sd import IMAGE_SIZE, build_tiny_sd_pipeline
from train.config_check import ConfigError, validate_config
from train.setup import build_run
from train.sharding import make_mesh

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
RANK = 4


def _config(directory):
    config = finetune_sd.get_config()
    config.model.pretrained = str(directory)
    config.data.image_size = IMAGE_SIZE
    config.model.dtype = "float32"
    config.model.unet.remat = False
    config.train.global_batch_size = BATCH
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 1
    config.model.lora.rank = RANK
    config.model.lora.alpha = float(RANK)
    return config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd1", version="1.x")


@pytest.fixture(scope="module")
def run(pipeline):
    config = _config(pipeline)
    return build_run(config, make_mesh(config.mesh.shape), workdir=None)


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def test_lora_run_trains_adapters_on_the_frozen_pretrained_unet(run, pipeline):
    from safetensors.numpy import load_file

    weights = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    base = run.unet_base
    np.testing.assert_array_equal(np.asarray(base["conv_in"]["kernel"].get_value()),
                                  weights["conv_in.weight"].transpose(2, 3, 1, 0))
    # The state holds adapters only: an A and a B per attention projection.
    graph = nnx.merge(run.unet_graphdef, run.full_unet_params(run.state.params))
    adapters = nnx.to_flat_state(nnx.state(graph, LORA_PARAMS))
    assert len(jax.tree_util.tree_leaves(run.state.params)) == len(adapters) > 0
    assert count_params(run.state.params) == count_params(nnx.state(graph, LORA_PARAMS))
    assert count_params(run.state.params) < count_params(base) / 10
    moments = [x for x in jax.tree_util.tree_leaves(run.state.opt_state) if np.ndim(x)]
    assert len(moments) == 2 * len(adapters)

    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {"images": rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
         "input_ids": np.asarray(run.tokenizer(["a red cat", "blue"] * (BATCH // 2)))},
        run.data_sharding)
    base_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(base)]
    start = _copy(run.state)
    _, first = run.compiled_step(_copy(start), run.text_params, batch, *run.extra_inputs)
    state = _copy(start)
    for _ in range(12):
        state, metrics = run.compiled_step(state, run.text_params, batch, *run.extra_inputs)
        assert np.isfinite(float(metrics["loss"]))
    trained = state.replace(step=start.step, ema_params=_copy(state.params))
    _, again = run.compiled_step(trained, run.text_params, batch, *run.extra_inputs)
    assert float(again["loss"]) < 0.9 * float(first["loss"])
    assert all(np.array_equal(a, np.asarray(b)) for a, b in
               zip(base_before, jax.tree_util.tree_leaves(base), strict=True))


def test_sample_grid_uses_the_adapters(run, pipeline):
    from models.pretrained import resolve_pretrained_config
    from train.loop import _make_sample_grid_fn

    config, _ = resolve_pretrained_config(_config(pipeline))
    config.sample.steps = 2
    grid_fn = _make_sample_grid_fn(config, run.sample_unet_graphdef, run.schedule, run.tokenizer,
                                   run.encode_text, run.text_params, vae_params=run.vae_params,
                                   decode_latents=run.decode_latents,
                                   unet_params=run.full_unet_params)
    fresh = grid_fn(run.state.ema_params)  # B = 0: the pretrained model's images
    rng = np.random.default_rng(3)
    adapted = grid_fn(jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), run.state.params))
    assert fresh.shape == (IMAGE_SIZE + 2, 2 * IMAGE_SIZE + 3, 3) and fresh.dtype == np.uint8
    assert np.abs(adapted.astype(int) - fresh).max() > 8


def test_lora_needs_a_pretrained_unet_and_valid_fields():
    config = finetune_sd.get_config()
    config.data.paths = "/data/shards"
    config.model.pretrained = ""
    config.model.lora.rank = 4
    with pytest.raises(ConfigError, match=r"model\.lora\.rank=4 .*model\.pretrained"):
        validate_config(config)
    config.model.pretrained = "/models/sd"
    config.model.lora.alpha = -1.0
    with pytest.raises(ConfigError, match=r"model\.lora\.alpha: a positive number"):
        validate_config(config)
    config.model.lora.alpha = 4.0
    config.model.lora.text_encoder = True
    with pytest.raises(ConfigError, match=r"model\.lora\.text_encoder=True: .*not supported"):
        validate_config(config)


def test_constant_learning_rate_without_warmup_starts_at_the_peak():
    """LoRA fine-tunes often run a constant rate with no warmup (optax's warmup schedule with
    0 warmup steps would stay at 0 and train nothing)."""
    from train.state import learning_rate_schedule

    optim = finetune_sd.get_config().optim
    optim.learning_rate, optim.decay = 1e-4, "constant"
    optim.warmup_steps = 0
    assert [float(learning_rate_schedule(optim, 10)(s)) for s in (0, 1, 50)] == [1e-4] * 3
    optim.warmup_steps = 4
    schedule = learning_rate_schedule(optim, 10)
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(5e-5)
    assert float(schedule(4)) == pytest.approx(1e-4)


def _torch_unet_out(unet, sample, timesteps, context):
    import torch

    with torch.no_grad():
        out = unet(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                   torch.from_numpy(context)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow  # checkpoint -> sampler / exporter -> PyTorch round trip
def test_checkpoint_samples_and_exports_both_ways(run, pipeline, tmp_path):
    """A LoRA checkpoint holds the adapters; the sampler puts them on the pretrained UNet;
    export writes them for load_lora_weights, or merged as a whole pipeline: same UNet."""
    import diffusers

    from export.diffusers_export import export_checkpoint, export_lora_checkpoint
    from models.pretrained import resolve_pretrained_config
    from sample.pipeline import load_model
    from train import checkpoint

    config, _ = resolve_pretrained_config(_config(pipeline))
    rng = np.random.default_rng(1)
    # Non-zero adapters without training: B = 0 would hide a wrong B layout.
    state = run.state.replace(ema_params=jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), run.state.params))
    workdir = str(tmp_path / "run")
    with checkpoint.make_manager(workdir, async_save=False) as manager:
        checkpoint.save(manager, state, config=config, force=True)
    # Adapters only on disk: far fewer parameters than the UNet.
    size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
    assert size(state.ema_params) < size(run.unet_base) / 10

    model = load_model(workdir, merge_lora=False)
    unet = nnx.merge(model.unet_graphdef, model.params)
    adapters = nnx.state(unet, LORA_PARAMS)
    for ours, saved in zip(jax.tree_util.tree_leaves(adapters),
                           jax.tree_util.tree_leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))
    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    timesteps = np.array([20, 600])
    context = rng.standard_normal((2, 7, 32), dtype=np.float32)
    inputs = (jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context))
    expected = np.asarray(unet(*inputs))
    # The sampler's default folds the adapters into the kernels: a plain UNet, same output.
    merged_model = load_model(workdir)
    merged_unet = nnx.merge(merged_model.unet_graphdef, merged_model.params)
    assert not nnx.to_flat_state(nnx.state(merged_unet, LORA_PARAMS))
    np.testing.assert_allclose(np.asarray(merged_unet(*inputs)), expected, atol=1e-5, rtol=1e-5)

    export_lora_checkpoint(workdir, tmp_path / "lora")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    np.testing.assert_allclose(_torch_unet_out(pipe.unet, sample, timesteps, context), expected,
                               atol=1e-4, rtol=1e-4)

    export_checkpoint(workdir, tmp_path / "merged")
    merged = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "merged",
                                                               safety_checker=None)
    np.testing.assert_allclose(_torch_unet_out(merged.unet, sample, timesteps, context),
                               expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # checkpoint -> sampler / exporter -> PyTorch round trip
def test_sampler_applies_lora_files_with_a_scale_merged_or_not(run, pipeline, tmp_path):
    """`python -m sample --lora FILE --lora_scale S [--nolora_merge]`: a pretrained pipeline
    (a full run's checkpoint) plus a shared LoRA file gives diffusers' output at that scale."""
    import diffusers
    import torch

    from models.lora import export_lora
    from models.pretrained import resolve_pretrained_config
    from sample.pipeline import load_model, with_lora_files
    from train import checkpoint
    from train.state import init_train_state, make_optimizer

    config, _ = resolve_pretrained_config(_config(pipeline))
    config.model.lora.rank = 0
    optimizer, _ = make_optimizer(config.optim, 10)
    state = init_train_state(run.unet_base, optimizer, jax.random.key(0))
    workdir = str(tmp_path / "full")
    with checkpoint.make_manager(workdir, async_save=False) as manager:
        checkpoint.save(manager, state, config=config, force=True)
    rng = np.random.default_rng(2)
    adapters = jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), run.state.params)
    export_lora(tmp_path / "shared", adapters, alpha=2.0)

    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    timesteps = np.array([20, 600])
    context = rng.standard_normal((2, 7, 32), dtype=np.float32)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "shared")
    with torch.no_grad():
        expected = pipe.unet(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
            torch.from_numpy(context), cross_attention_kwargs={"scale": 0.5},
        ).sample.permute(0, 2, 3, 1).numpy()
    base = load_model(workdir)
    for merge in (True, False):
        model = with_lora_files(base, [str(tmp_path / "shared")], scale=0.5, merge=merge)
        unet = nnx.merge(model.unet_graphdef, model.params)
        assert bool(nnx.to_flat_state(nnx.state(unet, LORA_PARAMS))) == (not merge)
        out = unet(jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context))
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def _cli(module, *args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=timeout)


def _last_line(result):
    return result.stderr.strip().splitlines()[-1]


def _kohya_file(path, adapters, alpha):
    """`adapters` under kohya-ss names (lora_unet_<path_with_underscores>.lora_down / lora_up
    / alpha), as people share them."""
    from safetensors.numpy import save_file

    from models.lora import lora_state_dict_peft

    tensors = {}
    for key, value in lora_state_dict_peft(adapters, "unet").items():
        module, which = key.split(".", 1)[1].rsplit(".", 2)[0], key.split(".")[-2]
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = value
        tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.mark.slow  # the train and sample CLIs as users run them
def test_lora_through_the_clis(run, pipeline, tmp_path):
    """`python -m train` with model.lora.rank: the checkpoint holds the adapters alone and the
    same command resumes; `python -m sample` samples the run, and `--lora` applies a
    kohya-named file; bad input ends with one line and exit status 2."""
    import orbax.checkpoint as ocp
    from PIL import Image

    from data_pipeline.prepare import prepare
    from train import checkpoint

    folder = tmp_path / "images"
    folder.mkdir()
    for index, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 70, 235))] * 4):
        Image.new("RGB", (20 + index, 18), rgb).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a {name} picture")
    shards = tmp_path / "shards"
    prepare(str(folder), str(shards), samples_per_shard=4, progress=False, log=io.StringIO())
    workdir, out = tmp_path / "run", tmp_path / "samples"
    train_args = (
        "train", "--config", "configs/finetune_sd.py", "--workdir", str(workdir),
        f"--config.model.pretrained={pipeline}", f"--config.data.paths={shards}",
        f"--config.data.image_size={IMAGE_SIZE}", f"--config.train.global_batch_size={BATCH}",
        "--config.model.dtype=float32", "--config.model.unet.remat=False",
        "--config.optim.learning_rate=1e-2", "--config.optim.warmup_steps=0",
        f"--config.model.lora.rank={RANK}", f"--config.model.lora.alpha={float(RANK)}",
        "--config.train.checkpoint_every_steps=2", "--config.train.sample_every_steps=0",
        "--config.data.num_workers=1")
    result = _cli(*train_args, "--config.train.num_train_steps=2")
    assert result.returncode == 0, result.stderr[-4000:]
    # On disk: the adapters (and their Adam moments), not the 100x larger UNet.
    step_dir = checkpoint.checkpoint_dir(workdir) / "2"
    saved = ocp.StandardCheckpointer().metadata(step_dir / "ema_params").item_metadata
    names = checkpoint._param_shapes(saved)
    assert names and all("/lora/lora_" in name for name in names)
    assert sum(int(np.prod(shape)) for shape in names.values()) == count_params(run.state.params)
    assert json.loads((workdir / "config.json").read_text())["model"]["lora"]["rank"] == RANK

    result = _cli(*train_args, "--config.train.num_train_steps=3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and (checkpoint.checkpoint_dir(workdir) / "3").is_dir()

    rng = np.random.default_rng(4)
    kohya = _kohya_file(tmp_path / "style.safetensors", jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), run.state.params), 4.0)
    sample_args = ("sample", "--workdir", str(workdir), "--prompt", "a red picture",
                   "--steps", "2", "--batch_size", "1")
    images = {}
    for name, extra in (("run", ()), ("kohya", ("--lora", str(kohya), "--lora_scale", "2"))):
        result = _cli(*sample_args, "--out", str(out / name), *extra)
        assert result.returncode == 0, result.stderr[-4000:]
        manifest = json.loads((out / name / "manifest.jsonl").read_text().splitlines()[0])
        images[name] = np.asarray(Image.open(out / name / manifest["file"]), np.int32)
    assert images["run"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(images["kohya"] - images["run"]).max() > 8

    result = _cli(*sample_args, "--out", str(out / "x"), "--lora", str(tmp_path / "none.st"))
    assert result.returncode == 2
    assert "none.st: no such file or directory" in _last_line(result)
    from safetensors.numpy import save_file

    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight":
               np.zeros((2, 32), np.float32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight":
               np.zeros((32, 2), np.float32)}, str(stray))
    result = _cli(*sample_args, "--out", str(out / "y"), "--lora", str(stray))
    assert result.returncode == 2
    assert "name no Linear or Conv layer" in _last_line(result)
    assert "down_blocks_7_attentions_0_proj_in" in _last_line(result)

    result = _cli("train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "z"),
                  f"--config.model.lora.rank={RANK}")
    assert result.returncode == 2
    assert "model.lora.rank=4 trains adapters on a frozen pretrained UNet" in _last_line(result)
