"""Fine-tuning a pretrained Stable Diffusion pipeline: latent diffusion with the frozen VAE.

In process (one tiny SD 1.x pipeline, one compiled step): the state starts from the pipeline's
UNet, a few steps on one batch lower the loss at fixed random draws, the text encoder and the
VAE stay as they were. End to end (slow): `prepare` -> `python -m train --config
configs/finetune_sd.py --config.model.pretrained=DIR` -> `python -m sample`, images decoded by
the VAE at the data's resolution.
"""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import finetune_sd
from diffusion.loss import offset_noise
from tests.cli_helpers import checkpoint_of_pretrained
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd_pipeline
from train.setup import build_run
from train.sharding import make_mesh

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


# Tiny sizes over configs/finetune_sd.py (bf16 compute, as users run it). The CLI test passes
# the same values as flags, so its train step is the in-process one, from the shared cache.
TINY = {
    "data.image_size": IMAGE_SIZE,
    "train.global_batch_size": BATCH,
    "model.unet.remat": False,
    "optim.learning_rate": 2e-3,
    # (warmup 0 with decay "constant" gives learning rate 0 in optax's warmup schedule)
    "optim.warmup_steps": 1,
}


def _tiny_overrides(config, directory):
    config.model.pretrained = str(directory)
    for field, value in TINY.items():
        section, *middle, name = field.split(".")
        node = config[section]
        for part in middle:
            node = node[part]
        node[name] = value
    return config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd1", version="1.x")


@pytest.fixture(scope="module")
def run(pipeline):
    config = _tiny_overrides(finetune_sd.get_config(), pipeline)
    return build_run(config, make_mesh(config.mesh.shape), workdir=None)


def _batch(run):
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
             "input_ids": np.asarray(run.tokenizer(["a red cat", "blue"] * (BATCH // 2)))}
    return jax.device_put(batch, run.data_sharding)


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def test_state_starts_from_the_pretrained_unet(run, pipeline):
    from safetensors.numpy import load_file

    weights = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    kernel = run.state.params["conv_in"]["kernel"].get_value()
    np.testing.assert_array_equal(
        np.asarray(kernel), weights["conv_in.weight"].transpose(2, 3, 1, 0))
    ema = run.state.ema_params["down_blocks"][0]["attentions"][0]["proj_in"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(ema.get_value()),
        weights["down_blocks.0.attentions.0.proj_in.weight"].transpose(2, 3, 1, 0))
    # Latents: the UNet sees the VAE's 8x8x4, not the 16x16x3 images.
    assert run.vae_params is not None and run.abstract_batch["images"].shape[1] == IMAGE_SIZE
    assert run.state.params["conv_in"]["kernel"].get_value().shape[2] == 4


def test_latent_steps_lower_the_loss_and_keep_frozen_inputs(run):
    batch = _batch(run)
    start = _copy(run.state)
    text_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(run.text_params)]
    vae_before = [np.asarray(x) for x in jax.tree_util.tree_leaves(run.vae_params)]
    # The loss at step 0's random draws (timesteps, noise, posterior sample), before and after.
    _, first = run.compiled_step(_copy(start), run.text_params, batch, *run.extra_inputs)
    state = _copy(start)
    for _ in range(12):
        state, metrics = run.compiled_step(state, run.text_params, batch, *run.extra_inputs)
        assert np.isfinite(float(metrics["loss"]))
    trained = state.replace(step=start.step, ema_params=_copy(state.params))
    _, again = run.compiled_step(trained, run.text_params, batch, *run.extra_inputs)
    assert float(again["loss"]) < 0.9 * float(first["loss"])
    assert int(metrics["skipped_nonfinite"]) == 0
    for before, after in ((text_before, run.text_params), (vae_before, run.vae_params)):
        after = jax.tree_util.tree_leaves(after)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, after, strict=True))
    # Adam moments for the UNet only: the VAE's and the text encoder's weights never train.
    num_unet = len(jax.tree_util.tree_leaves(state.params))
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x)]
    assert len(moments) == 2 * num_unet


def test_sample_grid_decodes_latents(run, pipeline):
    from models.pretrained import resolve_pretrained_config
    from train.loop import _make_sample_grid_fn

    config, _ = resolve_pretrained_config(_tiny_overrides(finetune_sd.get_config(), pipeline))
    config.sample.steps = 2
    grid = _make_sample_grid_fn(config, run.unet_graphdef, run.schedule, run.tokenizer,
                                run.encode_text, run.text_params, vae_params=run.vae_params,
                                decode_latents=run.decode_latents)(run.state.ema_params)
    # Two prompts side by side at the image resolution (1-pixel gaps), not the latent's.
    assert grid.shape == (IMAGE_SIZE + 2, 2 * IMAGE_SIZE + 3, 3) and grid.dtype == np.uint8
    assert grid[1:-1, 1:IMAGE_SIZE + 1].std() > 0


@pytest.mark.parametrize("version", ["1.x", "2.x"])
def test_sampler_gives_the_diffusers_pipeline_images(version, tmp_path):
    """Our sampler (restore, CLIP, DDIM over latents with CFG on 8 devices, VAE decode) against
    diffusers' StableDiffusionPipeline from the same directory, started from the same latent
    noise: epsilon (1.x) and v-prediction (2.x), "leading" spacing with steps_offset 1."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusion.sampling import image_keys
    from models.pretrained import resolve_pretrained_config
    from sample.pipeline import generate, load_model, options_from_config

    directory = build_tiny_sd_pipeline(tmp_path / "sd", version=version)
    config = finetune_sd.get_config()  # remat on, as users train: the sampler must drop it
    config.model.pretrained = str(directory)
    config.data.image_size = IMAGE_SIZE
    config.model.dtype = "float32"
    config, _ = resolve_pretrained_config(config)
    checkpoint_of_pretrained(config, tmp_path / "run")

    model = load_model(str(tmp_path / "run"))
    prompts, steps, scale = ["a red cat", "blue"], 4, 5.0
    options = options_from_config(model.config, sampler="ddim", steps=steps, cfg_scale=scale,
                                  seed=7)
    images, records = generate(model, prompts, options, batch_size=8, progress=False)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)

    keys = image_keys([r["seed"] for r in records], [r["image_index"] for r in records])
    noise = np.asarray(jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, 0), (LATENT_SIZE, LATENT_SIZE, 4)))(keys))
    pipeline = StableDiffusionPipeline.from_pretrained(directory)
    # Our DDIM ends at alpha_cumprod 1 and never clips x0 (the SD 1.x PNDM config has no
    # clip_sample, which DDIM would default to True).
    pipeline.scheduler = DDIMScheduler.from_config(
        pipeline.scheduler.config, set_alpha_to_one=True, clip_sample=False)
    reference = pipeline(
        prompts, num_inference_steps=steps, guidance_scale=scale, height=IMAGE_SIZE,
        width=IMAGE_SIZE, latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
        output_type="np").images
    reference = np.clip(np.round(reference * 255), 0, 255)
    assert reference.std() > 10  # not a flat image: the comparison means something
    assert np.abs(images.astype(np.float64) - reference).max() <= 1


def test_noise_offset_shifts_each_example_and_channel():
    noise = jnp.zeros((512, 4, 4, 3))
    shifted = np.asarray(offset_noise(jax.random.PRNGKey(0), noise, 0.1))
    # One shift per (example, channel), constant over the pixels, of standard deviation 0.1.
    assert np.allclose(shifted, shifted[:, :1, :1, :])
    assert abs(shifted[:, 0, 0, :].std() - 0.1) < 0.01
    assert np.array_equal(offset_noise(jax.random.PRNGKey(0), noise, 0.0), noise)


def _cli(module, *args, timeout=900):
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=timeout)
    return result


def _prepared_shards(tmp_path):
    from data_pipeline.prepare import prepare

    folder = tmp_path / "my_images"
    folder.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 70, 235)}
    for index in range(12):
        name, rgb = list(colours.items())[index % 3]
        Image.new("RGB", (24 + index, 20), rgb).save(folder / f"img{index:02d}.png")
        (folder / f"img{index:02d}.txt").write_text(f"a {name} picture")
    shards = tmp_path / "shards"
    prepare(str(folder), str(shards), samples_per_shard=6, progress=False, log=io.StringIO())
    return shards


@pytest.mark.slow
def test_finetune_then_sample_through_the_clis(pipeline, tmp_path):
    shards, workdir, out = _prepared_shards(tmp_path), tmp_path / "run", tmp_path / "samples"
    train_args = (
        "train", "--config", "configs/finetune_sd.py", "--workdir", str(workdir),
        f"--config.model.pretrained={pipeline}", f"--config.data.paths={shards}",
        *(f"--config.{field}={value}" for field, value in TINY.items()),
        "--config.train.log_every_steps=1",
        "--config.train.checkpoint_every_steps=2", "--config.train.sample_every_steps=0",
        "--config.data.num_workers=1", "--config.train.num_train_steps=2")
    result = _cli(*train_args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pretrained: diffusion from scheduler/scheduler_config.json" in result.stderr
    assert (workdir / "checkpoints" / "2").is_dir()
    # The checkpoint's config is complete: the sampler needs no other flag.
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["pretrained"] == str(pipeline)
    assert saved["model"]["unet"]["sample_size"] == LATENT_SIZE
    assert saved["model"]["text_encoder"]["kind"] == "clip"
    assert saved["sample"]["steps_offset"] == 1

    result = _cli("sample", "--workdir", str(workdir), "--prompt", "a red picture",
                  "--prompt", "a blue picture", "--out", str(out), "--steps", "3",
                  "--batch_size", "1", "--cfg_scale", "3")
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [entry["prompt"] for entry in manifest] == ["a red picture", "a blue picture"]
    images = [np.asarray(Image.open(out / entry["file"])) for entry in manifest]
    # Decoded by the VAE: RGB at the data's resolution (the UNet ran on 8x8x4 latents).
    assert all(image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for image in images)
    assert not np.array_equal(images[0], images[1])

    # The same command resumes: the directory resolves to the model the checkpoint stored.
    result = _cli(*train_args[:-1], "--config.train.num_train_steps=3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and (workdir / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_finetune_config_needs_a_pretrained_directory(tmp_path):
    result = _cli("train", "--config", "configs/finetune_sd.py", "--workdir", str(tmp_path),
                  "--config.data.paths=/nonexistent")
    assert result.returncode == 2
    assert "config.model.pretrained is not set" in result.stderr.strip().splitlines()[-1]
