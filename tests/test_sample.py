"""The sampler on the tiny config: per-image seeding, guidance paths, solvers, output files."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import tiny
from data_pipeline.input_pipeline import synthetic_tokenizer_workdir
from models.factory import build_frozen_text_encoder, build_unet
from sample.pipeline import (
    EmptyPromptListError,
    LoadedModel,
    SampleOptions,
    generate,
    read_prompts,
    write_outputs,
)
from sample.prompts import PromptDefaults, PromptFileError, iter_prompt_specs
from train.sharding import make_mesh, replicated

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a green triangle"]




def _model(devices) -> LoadedModel:
    config = tiny.get_config()
    mesh = make_mesh([("data", -1)], devices=devices)
    # Random weights with a large output scale stand in for a trained UNet: the prompt and
    # the noise both visibly change the image, which is all these tests need.
    unet_graphdef, params = nnx.split(build_unet(config.model, nnx.Rngs(3)))
    params = jax.tree_util.tree_map(lambda p: p * 1.5, params)
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(
        config.model, synthetic_tokenizer_workdir(config))
    rep = replicated(mesh)
    return LoadedModel(config, 7, unet_graphdef, jax.device_put(params, rep), tokenizer,
                       text_graphdef, jax.device_put(text_params, rep), mesh)


@pytest.fixture(scope="module")
def model8():
    assert len(jax.devices()) == 8
    return _model(jax.devices())


@pytest.fixture(scope="module")
def model1():
    return _model(jax.devices()[:1])


def _options(**overrides):
    values = dict(sampler="ddim", steps=3, cfg_scale=3.0, eta=0.0, seed=11,
                  num_images_per_prompt=2)
    values.update(overrides)
    return SampleOptions(**values)


def test_same_seed_same_image_whatever_batch_or_device_count(model8, model1):
    images, records = generate(model8, PROMPTS, _options(), batch_size=16, progress=False)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert [(r["prompt_index"], r["image_index"]) for r in records] == [
        (p, i) for p in range(3) for i in range(2)]
    # Same per-device batch (2), 8 devices or 1: the same per-device program, bitwise equal.
    one_device, _ = generate(model1, PROMPTS, _options(), batch_size=2, progress=False)
    np.testing.assert_array_equal(images, one_device)
    # Image i of a prompt does not depend on the prompts after it or on its batch companions.
    longer, _ = generate(model8, PROMPTS + ["a yellow circle"], _options(), batch_size=16,
                         progress=False)
    np.testing.assert_array_equal(images, longer[:6])
    # Another per-device batch size compiles another program whose float reductions may
    # round differently: the same image up to one uint8 level in a few pixels.
    other_batch, _ = generate(model8, PROMPTS, _options(), batch_size=8, progress=False)
    difference = np.abs(images.astype(int) - other_batch.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.05


def test_other_seed_or_prompt_gives_other_images(model8):
    images, _ = generate(model8, PROMPTS, _options(), progress=False)
    other_seed, _ = generate(model8, PROMPTS, _options(seed=12), progress=False)
    assert np.abs(images.astype(int) - other_seed.astype(int)).mean() > 2
    # The two images of one prompt come from different noise.
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 2
    other_prompt, _ = generate(model8, ["a yellow square in the bottom right"] * 3, _options(),
                               progress=False)
    assert np.abs(images.astype(int) - other_prompt.astype(int)).mean() > 0.5


def test_guidance_scale_zero_is_the_negative_prompt_and_one_is_the_prompt(model8):
    options = _options(num_images_per_prompt=1)
    # Scale 0 uses only the unconditional (negative-prompt) branch ...
    scale0, _ = generate(model8, PROMPTS, _options(num_images_per_prompt=1, cfg_scale=0.0,
                                                   negative_prompt="a grey background"),
                         progress=False)
    negative_as_prompt, _ = generate(model8, ["a grey background"] * 3,
                                     _options(num_images_per_prompt=1, cfg_scale=1.0),
                                     progress=False)
    assert np.abs(scale0.astype(int) - negative_as_prompt.astype(int)).max() <= 1
    # ... scale 1 only the conditional one; a larger scale differs from both.
    scale1, _ = generate(model8, PROMPTS, _options(num_images_per_prompt=1, cfg_scale=1.0),
                         progress=False)
    scale3, _ = generate(model8, PROMPTS, options, progress=False)
    assert np.abs(scale1.astype(int) - scale0.astype(int)).mean() > 0.5
    assert np.abs(scale3.astype(int) - scale1.astype(int)).mean() > 0.5


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "euler", "euler_ancestral", "heun"])
def test_every_solver_samples_deterministically(model8, sampler):
    ddim, _ = generate(model8, PROMPTS, _options(), progress=False)
    first, records = generate(model8, PROMPTS, _options(sampler=sampler), progress=False)
    again, _ = generate(model8, PROMPTS, _options(sampler=sampler), progress=False)
    np.testing.assert_array_equal(first, again)
    assert records[0]["sampler"] == sampler
    # Euler / DPM-Solver / Heun follow the same ODE as DDIM: close to it, but not equal;
    # the ancestral samplers add fresh noise every step.
    stochastic = sampler in ("ddpm", "euler_ancestral")
    assert np.abs(ddim.astype(int) - first.astype(int)).mean() > (2.0 if stochastic else 0.1)


def test_stochastic_ddim_and_unknown_solver(model8):
    ddim, _ = generate(model8, PROMPTS, _options(), progress=False)
    eta1, _ = generate(model8, PROMPTS, _options(eta=1.0), progress=False)
    assert np.abs(ddim.astype(int) - eta1.astype(int)).mean() > 0.5
    with pytest.raises(ValueError, match="unknown solver 'lms'"):
        generate(model8, PROMPTS, _options(sampler="lms"), progress=False)


def test_guidance_rescale_changes_guided_images_only(model8):
    plain, _ = generate(model8, PROMPTS, _options(), progress=False)
    rescaled, _ = generate(model8, PROMPTS, _options(guidance_rescale=0.7), progress=False)
    assert np.abs(plain.astype(int) - rescaled.astype(int)).mean() > 0.5
    # At scale 1 the guided output is the conditional one, whose std it already has.
    one, _ = generate(model8, PROMPTS, _options(cfg_scale=1.0), progress=False)
    one_rescaled, _ = generate(model8, PROMPTS, _options(cfg_scale=1.0, guidance_rescale=0.7),
                               progress=False)
    assert np.abs(one.astype(int) - one_rescaled.astype(int)).max() <= 1


def test_jsonl_prompt_specs_and_errors(tmp_path):
    defaults = PromptDefaults(seed=5, cfg_scale=3.0, num_images=2, steps=4)
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "a red circle"}\n\n'
        '{"prompt": "a blue square", "negative_prompt": "green", "seed": 9, "cfg_scale": 1.5,'
        ' "num_images": 3, "steps": 7}\n')
    first, second = list(iter_prompt_specs(["from the flag"], str(path), defaults))[1:]
    assert (first.index, first.prompt, first.seed, first.cfg_scale, first.num_images,
            first.steps) == (1, "a red circle", 6, 3.0, 2, 4)
    assert (second.negative_prompt, second.seed, second.cfg_scale, second.num_images,
            second.steps) == ("green", 9, 1.5, 3, 7)
    for text, message in [
        ('{"prompt": "a"}\n{"prompt": "b", "cfg_scale": -1}\n', "line 2: cfg_scale must be >= 0"),
        ('{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: not valid JSON"),
        ('{"prompt": "a", "num_images": 0}\n', "line 1: num_images must be >= 1"),
        ('{"prompt": "a", "steps": 0}\n', "line 1: steps must be >= 1"),
        ('{"prompt": "a", "colour": 1}\n', "unknown field"),
        ('{"negative_prompt": "a"}\n', "missing 'prompt'"),
        ('{"prompt": "a", "seed": "x"}\n', "'seed' must be an integer"),
    ]:
        path.write_text(text)
        with pytest.raises(PromptFileError, match=message):
            list(iter_prompt_specs([], str(path), defaults))


def test_empty_prompt_lists_are_errors(model8, tmp_path):
    with pytest.raises(EmptyPromptListError, match="no prompts"):
        generate(model8, [], _options(), progress=False)
    with pytest.raises(EmptyPromptListError, match="--prompt or --prompts_file"):
        read_prompts([], None)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(EmptyPromptListError, match="blank.txt has no non-empty lines"):
        read_prompts([], str(blank))
    listed = tmp_path / "prompts.txt"
    listed.write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(["first"], str(listed)) == ["first", "a red circle", "a blue square"]
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts([], str(tmp_path / "missing.txt"))


def test_write_outputs_metadata_grid_and_manifest(model8, tmp_path):
    images, records = generate(model8, PROMPTS[:2], _options(), progress=False)
    written = write_outputs(str(tmp_path), images, records, columns=2)
    assert written["count"] == 4
    manifest = [json.loads(line) for line in open(tmp_path / "manifest.jsonl")]
    assert [m["prompt"] for m in manifest] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    for entry, image in zip(manifest, images, strict=True):
        png = Image.open(tmp_path / entry["file"])
        np.testing.assert_array_equal(np.asarray(png), image)
        assert png.text["prompt"] == entry["prompt"]
        assert png.text["seed"] == str(entry["seed"]) and png.text["steps"] == "3"
        assert png.text["cfg_scale"] == "3.0" and png.text["sampler"] == "ddim"
        assert png.text["checkpoint_step"] == "7"
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3)
    np.testing.assert_array_equal(grid[1:17, 18:34], images[1])



def test_prompts_longer_than_the_encoder_are_reported(model8):
    from absl import logging as absl_logging

    long_prompt = "a red circle " * 20  # 60 words for a 32-token tokenizer
    assert model8.tokenizer.truncated([PROMPTS[0], long_prompt]) == [long_prompt]
    messages = []
    original = absl_logging.warning
    absl_logging.warning = lambda fmt, *args: messages.append(fmt % args)
    try:
        generate(model8, [PROMPTS[0], long_prompt], _options(num_images_per_prompt=1),
                 progress=False)
    finally:
        absl_logging.warning = original
    assert len(messages) == 1 and "1 prompt(s) exceed" in messages[0]
    assert f"{model8.tokenizer.max_length} tokens" in messages[0]
