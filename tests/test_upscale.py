"""The super-resolution stage: low-res conditioning (diffusion/low_res.py), its config checks,
training through `python -m train` and sampling through `python -m sample` (--low_res, the
--upscaler_workdir cascade, bad input), and device-count independence of its images."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny, tiny_upscale
from diffusion.low_res import (
    downsample,
    low_res_from_config,
    low_res_input,
    training_low_res,
    with_low_res_inputs,
)
from tests.cli_helpers import ROOT, cli_env, error_line, run_cli, write_random_checkpoint
from train.config_check import ConfigError, validate_config


def _conditioning(size=16, factor=4):
    config = tiny_upscale.get_config()
    config.model.unet.sample_size = size
    config.model.low_res.factor = factor
    return low_res_from_config(config.model)


def test_downsample_is_the_block_mean():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
    got = np.asarray(downsample(jnp.asarray(images), 4))
    assert got.shape == (2, 2, 3, 3)
    for i in range(2):
        for j in range(3):
            block = images[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            np.testing.assert_allclose(got[:, i, j], block.mean(axis=(1, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        downsample(jnp.zeros((1, 10, 10, 3)), 4)


def test_training_inputs_are_noised_at_their_level_and_resized():
    conditioning = _conditioning(size=128)
    value = 0.6
    images = jnp.full((64, 128, 128, 3), value, jnp.float32)
    low, levels = training_low_res(conditioning, images, jax.random.PRNGKey(0))
    levels = np.asarray(levels)
    assert low.shape == (64, 128, 128, 3)
    assert levels.min() >= 0 and levels.max() <= conditioning.max_noise_level
    assert len(set(levels.tolist())) > 20  # drawn per example
    # A constant image noised at level t has mean sqrt(alpha_bar_t) * value (the bicubic resize
    # keeps constants): each example's mean tells its level was applied. (The mean of 32x32x3
    # noise values of std <= 0.6 has std <= 0.011.)
    signal = np.sqrt(np.asarray(conditioning.schedule.alphas_cumprod)[levels]) * value
    np.testing.assert_allclose(np.asarray(low).mean(axis=(1, 2, 3)), signal, atol=0.05)
    assert np.abs(signal - value).max() > 0.1  # the levels make a difference the check sees


def test_latent_sized_input_is_not_resized():
    # The x4 upscaler's low-res image already has the latents' size.
    conditioning = _conditioning(size=8)
    low = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(2), low.shape)
    levels = jnp.array([0, 300])
    got = low_res_input(conditioning, low, noise, levels)
    a = conditioning.schedule.alphas_cumprod[levels][:, None, None, None]
    np.testing.assert_allclose(got, jnp.sqrt(a) * low + jnp.sqrt(1 - a) * noise, atol=1e-6)


def test_sampling_puts_the_same_low_res_input_in_both_cfg_halves():
    conditioning = _conditioning(size=16)
    seen = {}

    def denoise(params, cond, uncond, seeds, indices, scales):
        seen.update(cond=cond, uncond=uncond)
        return cond["low_res"]

    wrapped = with_low_res_inputs(denoise, conditioning)
    low = jnp.zeros((2, 4, 4, 3))
    cond = {"hidden": jnp.ones((2, 3, 8)), "pooled": jnp.ones((2, 8))}
    out = wrapped(None, cond, cond, jnp.array([0, 0]), jnp.array([0, 1]), jnp.ones(2), low,
                  jnp.array([20, 20]))
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(seen["cond"]["low_res"], seen["uncond"]["low_res"])
    np.testing.assert_array_equal(seen["cond"]["noise_level"], [20, 20])
    # Same seed, different image index: different augmentation noise.
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model.unet, "in_channels", 3), "in_channels=3 must be 6"),
    (lambda c: setattr(c.model.unet, "class_embed_type", "projection"),
     "class_embed_type='projection'"),
    (lambda c: setattr(c.model.unet, "num_class_embeds", 100), "num_class_embeds=100 must be"),
    (lambda c: setattr(c.sample, "noise_level", 400), "sample.noise_level=400"),
    (lambda c: setattr(c.model.low_res, "factor", 3), "divisible by config.model.low_res.factor"),
    (lambda c: setattr(c.model.low_res, "resize", "area"), "model.low_res.resize"),
    (lambda c: setattr(c.model.low_res, "max_noise_level", 1000), "max_noise_level=1000"),
])
def test_config_errors_name_the_field(change, message):
    config = tiny_upscale.get_config()
    validate_config(config)
    change(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


# Through the CLIs (slow) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A tiny upscaler (4x4 -> 16x16) trained 2 steps by `python -m train`, a random-weight tiny
    base model making 4x4 images, and a 16x16 base (whose images do not fit the upscaler)."""
    root = tmp_path_factory.mktemp("upscale")
    upscaler = str(root / "upscaler")
    train = subprocess.Popen(
        [sys.executable, "-m", "train", "--config", "configs/tiny_upscale.py", "--workdir",
         upscaler, "--config.train.num_train_steps=2", "--config.train.log_every_steps=1",
         "--config.train.checkpoint_every_steps=2", "--config.train.sample_every_steps=2"],
        cwd=ROOT, env=cli_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = str(root / "base4")
    config = tiny.get_config()
    config.data.image_size = config.model.unet.sample_size = 4
    write_random_checkpoint(base, config)
    base16 = str(root / "base16")
    write_random_checkpoint(base16, tiny.get_config())
    output, _ = train.communicate(timeout=600)
    assert train.returncode == 0, output[-3000:]
    return {"upscaler": upscaler, "base": base, "base16": base16, "root": root}


def _png(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return str(path)


def _manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def _sample(workdir, out, *extra):
    return [sys.executable, "-m", "sample", "--workdir", workdir, "--out", str(out), *extra]


@pytest.mark.slow
def test_cli_upscales_every_image_with_every_prompt_and_resumes(workdirs, tmp_path):
    inputs = tmp_path / "low"
    inputs.mkdir()
    _png(inputs / "one.png", 4, seed=1)
    _png(inputs / "two.png", 4, seed=2)
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = _sample(workdirs["upscaler"], out, "--low_res", str(inputs), "--prompt",
                   "a red circle", "--prompt", "a blue square", "--noise_level", "50")
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = _manifest(out)
    assert sorted(e["file"] for e in entries) == [
        "000000_000_one.png", "000000_000_two.png", "000001_000_one.png", "000001_000_two.png"]
    for entry in entries:
        assert entry["noise_level"] == 50
        assert entry["low_res"].endswith(entry["file"].split("_")[-1])
        with Image.open(out / entry["file"]) as image:
            assert image.size == (16, 16) and image.mode == "RGB"
    first = np.asarray(Image.open(out / "000000_000_one.png"))
    os.remove(out / "000000_000_one.png")
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampled 1 of 4 images (3 already" in result.stdout
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000000_000_one.png")), first)


@pytest.mark.slow
def test_cli_cascade_upscales_the_base_samples(workdirs, tmp_path):
    out = tmp_path / "cascade"
    result = run_cli(_sample(workdirs["base"], out, "--upscaler_workdir", workdirs["upscaler"],
                             "--prompt", "a red circle", "--prompt", "a green square",
                             "--num_images_per_prompt", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    base_entries, entries = _manifest(out / "base"), _manifest(out)
    names = ["000000_000.png", "000000_001.png", "000001_000.png", "000001_001.png"]
    assert sorted(e["file"] for e in base_entries) == names
    assert sorted(e["file"] for e in entries) == names
    for entry in entries:
        assert entry["low_res"] == os.path.join("base", entry["file"])
        assert Image.open(out / entry["file"]).size == (16, 16)
        assert Image.open(out / "base" / entry["file"]).size == (4, 4)


@pytest.mark.slow
def test_cli_bad_input_gives_one_clear_line(workdirs, tmp_path):
    up, base, base16 = workdirs["upscaler"], workdirs["base"], workdirs["base16"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    cases = [
        (_sample(up, out, "--low_res", _png(tmp_path / "big.png", 8), "--prompt", "a"),
         "big.png: 8x8 pixels; this upscaler takes 4x4 images"),
        (_sample(up, out, "--low_res", _png(tmp_path / "grey.png", 4, "L"), "--prompt", "a"),
         "grey.png: image mode 'L' (1 channel(s))"),
        (_sample(up, out, "--low_res", str(empty), "--prompt", "a"), "no images"),
        (_sample(up, out, "--low_res", str(tmp_path / "missing"), "--prompt", "a"),
         "missing: no such file or directory"),
        (_sample(base, out, "--low_res", str(tmp_path / "big.png"), "--prompt", "a"),
         "not a super-resolution model"),
        (_sample(base, out, "--upscaler_workdir", base16, "--prompt", "a"),
         "not a super-resolution model"),
        (_sample(base, out, "--noise_level", "5", "--prompt", "a"),
         "--noise_level applies to super-resolution sampling only"),
    ]
    # Independent processes, run two at a time.
    for start in range(0, len(cases), 2):
        procs = [(subprocess.Popen(args, cwd=ROOT, env=cli_env(2), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True), message)
                 for args, message in cases[start:start + 2]]
        for proc, message in procs:
            stdout, stderr = proc.communicate(timeout=300)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            assert result.returncode == 2, (message, stderr[-2000:])
            assert message in error_line(result), (message, stderr[-2000:])
    assert not os.path.exists(out / "manifest.jsonl")


@pytest.fixture(scope="module")
def upscaler(workdirs):
    from sample.pipeline import load_model

    return load_model(workdirs["upscaler"])


@pytest.mark.slow
def test_pipeline_refuses_bad_low_res_input(workdirs, upscaler, tmp_path):
    """The same checks the CLI runs, in-process (the CLI turns these ValueErrors into its
    one-line errors, as the test above shows for some of them)."""
    from sample.pipeline import (
        generate,
        load_model,
        low_res_images,
        options_from_config,
        sample_cascade,
    )

    options = options_from_config(upscaler.config)
    with pytest.raises(ValueError, match="rgba.png: image mode 'RGBA' \\(4 channel"):
        low_res_images(upscaler, _png(tmp_path / "rgba.png", 4, "RGBA"))
    twins = tmp_path / "twins"
    twins.mkdir()
    _png(twins / "a.png", 4)
    Image.open(twins / "a.png").save(twins / "a.jpg")
    with pytest.raises(ValueError, match="a.jpg and a.png would give their outputs the same"):
        low_res_images(upscaler, str(twins))
    low = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="is a super-resolution model"):
        generate(upscaler, ["a"], options)
    with pytest.raises(ValueError, match=r"--noise_level=351 must be in \[0, 350\]"):
        generate(upscaler, ["a"], options_from_config(upscaler.config, noise_level=351),
                 low_res=low)
    with pytest.raises(ValueError, match="low_res\\[0\\]: 5x4 pixels"):
        generate(upscaler, ["a"], options, low_res=np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        generate(upscaler, ["a"], options, low_res=np.stack([low, low]))
    base16 = load_model(workdirs["base16"])
    out = tmp_path / "cascade"
    with pytest.raises(ValueError, match="the base model makes 16x16 images; the upscaler "
                                         "takes 4x4"):
        sample_cascade(base16, upscaler, ["a"], None, options_from_config(base16.config),
                       options, str(out))
    with pytest.raises(ValueError, match="base workdir holds a super-resolution model"):
        sample_cascade(upscaler, upscaler, ["a"], None, options, options, str(out))
    assert not os.path.exists(out)


@pytest.mark.slow
def test_upscaled_images_do_not_depend_on_the_device_count(workdirs, upscaler):
    from sample.pipeline import generate, load_model, options_from_config

    rng = np.random.default_rng(3)
    low = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    results = {}
    for devices, model in ((1, load_model(workdirs["upscaler"], devices=jax.devices()[:1])),
                           (8, upscaler)):
        assert model.mesh.size == devices
        options = options_from_config(model.config)
        results[devices], records = generate(model, prompts, options, low_res=low, batch_size=8,
                                             progress=False)
    assert results[1].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(results[1], results[8])
    assert records[0]["noise_level"] == options.noise_level
    # The low-res input and its noise level both reach the UNet.
    swapped, _ = generate(model, prompts, options, low_res=low[::-1], batch_size=8,
                          progress=False)
    assert np.abs(swapped[0].astype(int) - results[8][0]).max() > 0
    np.testing.assert_array_equal(swapped[1], results[8][1])  # the middle image is the same
    noisier, _ = generate(model, prompts, options_from_config(model.config, noise_level=300),
                          low_res=low, batch_size=8, progress=False)
    assert np.abs(noisier.astype(int) - results[8]).max() > 0
