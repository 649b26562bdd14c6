"""Import of diffusers' x4 upscaler pipeline (`StableDiffusionUpscalePipeline`) as a
super-resolution model, checked against diffusers' PyTorch classes on a tiny random pipeline
(tests/tiny_upscale.py): the resolved config, one denoising step of the UNet given the noised
low-resolution image and its noise level, and a full short sampling run with the VAE decode.
"""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from diffusion.low_res import low_res_from_config, low_res_input
from models.factory import abstract_unet
from models.pretrained import (
    UPSCALE_LATENT_SCALING,
    PretrainedError,
    load_pipeline_vae,
    load_unet_params,
    resolve_pretrained_config,
)
from tests.cli_helpers import checkpoint_of_pretrained
from tests.tiny_upscale import (
    IMAGE_SIZE,
    LATENT_SIZE,
    LOW_RES_SIZE,
    MAX_NOISE_LEVEL,
    NUM_CLASS_EMBEDS,
    build_tiny_upscale_pipeline,
)
from train.sharding import make_mesh, tree_shardings

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_upscale_pipeline(tmp_path_factory.mktemp("x4") / "upscaler")


@pytest.fixture(scope="module")
def resolved(pipeline):
    config, lines = resolve_pretrained_config(_config(pipeline))
    return config, lines


def _config(directory, image_size=IMAGE_SIZE):
    config = demo.get_config()
    config.model.pretrained = str(directory)
    config.data.image_size = image_size
    return config


def _edited_copy(pipeline, tmp_path, edit_file, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(pipeline, directory)
    path = directory / edit_file
    content = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content))
    return directory


_DELETE = object()


def test_import_resolves_a_super_resolution_model(resolved):
    from train.config_check import validate_config

    config, lines = resolved
    validate_config(config)
    unet = config.model.unet
    assert (unet.in_channels, unet.out_channels) == (7, 4)
    assert unet.num_class_embeds == NUM_CLASS_EMBEDS and unet.sample_size == LATENT_SIZE
    # The low-res input: the VAE's factor, the pipeline's max level, low_res_scheduler's
    # schedule ("linear"), not the denoising scheduler's ("scaled_linear").
    assert config.model.low_res.to_dict() == {
        "factor": 4, "max_noise_level": MAX_NOISE_LEVEL, "schedule": "linear",
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
    assert config.diffusion.schedule == "scaled_linear"
    assert config.diffusion.prediction_type == "v_prediction"
    assert config.sample.noise_level == 20
    # The low-resolution image has the latents' size: the resize to the UNet input is the
    # identity.
    conditioning = low_res_from_config(config.model)
    assert conditioning.low_res_size(IMAGE_SIZE) == conditioning.size == LOW_RES_SIZE
    assert any(line.startswith("model.low_res from low_res_scheduler/") for line in lines)
    again, _ = resolve_pretrained_config(config)
    assert again.to_json(sort_keys=True) == config.to_json(sort_keys=True)


def test_user_noise_level_is_kept_and_checked(pipeline):
    from train.config_check import ConfigError, validate_config

    config = _config(pipeline)
    with config.unlocked():
        config.sample.noise_level = 50
    assert resolve_pretrained_config(config)[0].sample.noise_level == 50
    config.sample.noise_level = MAX_NOISE_LEVEL + 1
    resolved, _ = resolve_pretrained_config(config)
    with pytest.raises(ConfigError, match=r"sample.noise_level=100 must be an int in \[0, "
                                          r"model.low_res.max_noise_level=99\]"):
        validate_config(resolved)


def test_vae_latents_use_the_upscalers_scaling(pipeline, tmp_path, caplog):
    _, info = load_pipeline_vae(pipeline, dtype=jnp.float32)
    assert info["scaling_factor"] == UPSCALE_LATENT_SCALING and info["downsample_factor"] == 4
    # A VAE config without the key (as the published x4 upscaler's) or with SD's value: still
    # 0.08333, as diffusers' pipeline forces it, with a warning naming the file.
    for index, value in enumerate((_DELETE, 0.18215)):
        directory = _edited_copy(pipeline, tmp_path / str(index), "vae/config.json",
                                 scaling_factor=value)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _, info = load_pipeline_vae(directory, dtype=jnp.float32)
        assert info["scaling_factor"] == UPSCALE_LATENT_SCALING
        assert "vae/config.json: scaling_factor=" in caplog.text


@pytest.mark.parametrize("edit_file, changes, error, match", [
    ("unet/config.json", {"in_channels": 4}, PretrainedError,
     r"unet/config.json: in_channels=4 must be 7 .*latent_channels=4 \+ 3 low-resolution"),
    ("model_index.json", {"max_noise_level": NUM_CLASS_EMBEDS}, PretrainedError,
     r"num_class_embeds=100 .*noise levels 0..100 \(max_noise_level"),
    # diffusers' default when model_index.json has none: 350.
    ("model_index.json", {"max_noise_level": _DELETE}, PretrainedError,
     r"num_class_embeds=100 .*noise levels 0..350 \(max_noise_level"),
    ("unet/config.json", {"num_class_embeds": None}, PretrainedError,
     r"num_class_embeds=None .*num_class_embeds > max_noise_level"),
    ("model_index.json", {"max_noise_level": "350"}, PretrainedError,
     r"max_noise_level='350' must be a non-negative int"),
    ("model_index.json", {"low_res_scheduler": _DELETE}, PretrainedError,
     r"StableDiffusionUpscalePipeline needs a 'low_res_scheduler' entry"),
    ("model_index.json", {"low_res_scheduler": ["diffusers", "EulerDiscreteScheduler"]},
     PretrainedError, r"low_res_scheduler is diffusers.EulerDiscreteScheduler; supported"),
    ("low_res_scheduler/scheduler_config.json", {"beta_schedule": "sigmoid"}, PretrainedError,
     r"low_res_scheduler/scheduler_config.json: scheduler: beta_schedule='sigmoid'"),
])
def test_broken_upscaler_directories_are_named(pipeline, tmp_path, edit_file, changes, error,
                                               match):
    directory = _edited_copy(pipeline, tmp_path, edit_file, **changes)
    with pytest.raises(error, match=match):
        resolve_pretrained_config(_config(directory))


def test_post_processing_parts_are_named_as_not_applied(pipeline, tmp_path):
    directory = _edited_copy(pipeline, tmp_path, "model_index.json",
                             watermarker=["my_package", "Watermarker"])
    config, lines = resolve_pretrained_config(_config(directory))
    assert config.model.low_res.max_noise_level == MAX_NOISE_LEVEL
    assert "watermarker in model_index.json is not applied by our sampler" in lines


def test_missing_low_res_scheduler_files(pipeline, tmp_path):
    directory = tmp_path / "no_low_res"
    shutil.copytree(pipeline, directory)
    shutil.rmtree(directory / "low_res_scheduler")
    with pytest.raises(FileNotFoundError, match="low_res_scheduler/scheduler_config.json not "
                                                "found: the low-resolution input's noise"):
        resolve_pretrained_config(_config(directory))


def test_text_to_image_pipeline_is_not_a_super_resolution_model(tmp_path):
    from tests.tiny_sd import IMAGE_SIZE as SD_SIZE
    from tests.tiny_sd import build_tiny_sd_pipeline

    directory = build_tiny_sd_pipeline(tmp_path / "sd", version="1.x")
    config, _ = resolve_pretrained_config(_config(directory, SD_SIZE))
    assert not config.model.get("low_res")
    config = _config(directory, SD_SIZE)
    with config.unlocked():
        config.model.low_res = {"factor": 4, "max_noise_level": 350}
    with pytest.raises(PretrainedError, match="not a StableDiffusionUpscalePipeline"):
        resolve_pretrained_config(config)


def test_one_denoising_step_matches_diffusers(pipeline, resolved):
    """Our UNet (loaded into FSDP shardings) on the latents + the low-res image noised by our
    low-res conditioning, against diffusers' UNet on the same latents + the image noised by the
    pipeline's low_res_scheduler, with the same integer noise levels as class labels."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    config, _ = resolved
    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    graphdef, abstract = abstract_unet(config.model)
    params = load_unet_params(pipeline / "unet", abstract, tree_shardings(mesh, abstract))
    conditioning = low_res_from_config(config.model)

    @jax.jit  # one compile for both calls below (eager ops on sharded arrays are slow)
    def denoise(params, latents, low_res, noise, timesteps, context, levels):
        extra = low_res_input(conditioning, low_res, noise, levels)
        return nnx.merge(graphdef, params)(jnp.concatenate([latents, extra], -1), timesteps,
                                           context, class_labels=levels)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, LATENT_SIZE, LATENT_SIZE, 4)).astype(np.float32)
    low_res = rng.uniform(-1, 1, (2, LOW_RES_SIZE, LOW_RES_SIZE, 3)).astype(np.float32)
    noise = rng.standard_normal(low_res.shape).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    timesteps, levels = np.array([10, 900]), np.array([20, MAX_NOISE_LEVEL])

    def ours(levels):
        return np.asarray(denoise(params, latents, low_res, noise, timesteps, context, levels))

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    reference_unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    low_res_scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="low_res_scheduler")
    with torch.no_grad():
        noisy_low_res = low_res_scheduler.add_noise(nchw(low_res), nchw(noise),
                                                    torch.from_numpy(levels))
        reference = reference_unet(
            torch.cat([nchw(latents), noisy_low_res], 1), torch.from_numpy(timesteps),
            torch.from_numpy(context), class_labels=torch.from_numpy(levels),
        ).sample.numpy().transpose(0, 2, 3, 1)
    got = ours(levels)
    np.testing.assert_allclose(got, reference, atol=5e-5, rtol=1e-4)
    # The noise level matters (both as augmentation and as the class label): swapped levels
    # give outputs far outside the tolerance.
    assert np.abs(ours(levels[::-1]) - reference).max() > 100 * 5e-5



def test_upscale_config_resolves_on_an_upscaler_directory(pipeline):
    from configs import upscale_sd
    from train.config_check import validate_config

    config = upscale_sd.get_config()
    with pytest.raises(PretrainedError, match="config.model.pretrained is not set"):
        resolve_pretrained_config(config)
    config.model.pretrained = str(pipeline)
    config.data.image_size = IMAGE_SIZE
    config.data.paths = "/data/shards-{0..9}.array_record"
    config.sample.noise_level = 30
    config, _ = resolve_pretrained_config(config)
    validate_config(config)
    assert config.model.low_res.factor == 4 and config.sample.noise_level == 30
    assert config.model.unet.remat is True and config.model.dtype == "bfloat16"
    # The 512px default: 128x128 latents and low-resolution images.
    config.data.image_size = 512
    assert resolve_pretrained_config(config)[0].model.unet.sample_size == 128


def test_sampler_gives_the_diffusers_upscale_pipeline_images(pipeline, tmp_path, monkeypatch):
    """Our sampler (restore, CLIP, the low-res image noised per image, DDIM v-prediction over
    latents with CFG on 8 devices, VAE decode with the upscaler's 0.08333 scaling) against
    diffusers' StableDiffusionUpscalePipeline loaded from the run's export: the same initial
    latents, the same low-res noise (the pipeline's draw replaced by ours) and noise level."""
    from diffusers import DDIMScheduler, StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale

    from configs import upscale_sd
    from diffusion.low_res import sampling_noise
    from diffusion.sampling import image_keys
    from export.diffusers_export import export_checkpoint
    from sample.pipeline import generate, load_model, options_from_config

    config = upscale_sd.get_config()  # remat on, bf16, as users train: sampling in float32
    config.model.pretrained = str(pipeline)
    config.data.image_size = IMAGE_SIZE
    config.model.dtype = "float32"
    config.sample.noise_level = 60
    config, _ = resolve_pretrained_config(config)
    checkpoint_of_pretrained(config, tmp_path / "run")

    model = load_model(str(tmp_path / "run"))
    prompts, steps, scale = ["a red cat", "blue"], 3, 5.0
    options = options_from_config(model.config, steps=steps, cfg_scale=scale, seed=7)
    rng = np.random.default_rng(1)
    # Smooth low-res images (a colour gradient each): the VAE decode of the upscaled latents
    # then depends on them visibly.
    ramp = np.linspace(0, 1, LOW_RES_SIZE)[None, :, None, None]
    low_res = np.clip(255 * (rng.uniform(0, 1, (2, 1, 1, 3)) * ramp
                             + rng.uniform(0, 0.3, (2, LOW_RES_SIZE, LOW_RES_SIZE, 3))),
                      0, 255).astype(np.uint8)
    images, records = generate(model, prompts, options, batch_size=8, progress=False,
                               low_res=low_res)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)

    keys = image_keys([r["seed"] for r in records], [r["image_index"] for r in records])
    latents = np.asarray(jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, 0), (LATENT_SIZE, LATENT_SIZE, 4)))(keys))
    low_res_noise = np.asarray(sampling_noise(keys, (LOW_RES_SIZE, LOW_RES_SIZE, 3)))
    drawn = []

    def our_low_res_noise(shape, **_):
        # The pipeline's only draw when latents are given: the low-res augmentation noise.
        assert tuple(shape) == (2, 3, LOW_RES_SIZE, LOW_RES_SIZE)
        drawn.append(shape)
        return torch.from_numpy(low_res_noise.transpose(0, 3, 1, 2).copy())

    # The reference loads our export of the run (its UNet, the pipeline's other parts): the
    # upscaler round-trips to diffusers with its low_res_scheduler and max_noise_level.
    exported = export_checkpoint(str(tmp_path / "run"), tmp_path / "exported").out
    assert "low_res_scheduler" in os.listdir(exported)
    monkeypatch.setattr(pipeline_stable_diffusion_upscale, "randn_tensor", our_low_res_noise)
    reference_pipeline = StableDiffusionUpscalePipeline.from_pretrained(exported)
    assert reference_pipeline.config.max_noise_level == MAX_NOISE_LEVEL
    # Our DDIM ends at alpha_cumprod 1 (the published scheduler config says False).
    reference_pipeline.scheduler = DDIMScheduler.from_config(
        reference_pipeline.scheduler.config, set_alpha_to_one=True)
    reference = reference_pipeline(
        prompts, image=low_res.astype(np.float32) / 255, num_inference_steps=steps,
        guidance_scale=scale, noise_level=60,
        latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
        output_type="np").images
    assert len(drawn) == 1
    reference = np.clip(np.round(reference * 255), 0, 255)
    assert reference.std() > 10  # not a flat image: the comparison means something
    assert np.abs(images.astype(np.float64) - reference).max() <= 1


@pytest.mark.slow
def test_imported_upscaler_fine_tunes(pipeline):
    """configs/upscale_sd.py on the imported pipeline: the state starts from its UNet (7 input
    channels, the noise-level table), and steps on one batch (low-res inputs made from the
    images in the step) lower the loss at fixed random draws."""
    from safetensors.numpy import load_file

    from configs import upscale_sd
    from train.setup import build_run

    config = upscale_sd.get_config()
    config.model.pretrained = str(pipeline)
    config.data.image_size = IMAGE_SIZE
    config.data.paths = "unused"  # batches are given below
    config.train.global_batch_size = 8
    config.model.unet.remat = False
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 1
    run = build_run(config, make_mesh(config.mesh.shape), workdir=None)
    weights = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(
        np.asarray(run.state.params["conv_in"]["kernel"].get_value()),
        weights["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(run.state.params["class_embedding"]["embedding"].get_value()),
        weights["class_embedding.weight"])

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, IMAGE_SIZE)[None, None, :, None]
    images = np.broadcast_to(rng.uniform(0.2, 1, (8, 1, 1, 3)) * ramp,
                             (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    batch = jax.device_put({"images": images,
                            "input_ids": np.asarray(run.tokenizer(["a red cat", "blue"] * 4))},
                           run.data_sharding)

    def copy(tree):
        return jax.tree_util.tree_map(jnp.copy, tree)

    start = copy(run.state)
    _, first = run.compiled_step(copy(start), run.text_params, batch, *run.extra_inputs)
    state = copy(start)
    for _ in range(8):
        state, metrics = run.compiled_step(state, run.text_params, batch, *run.extra_inputs)
        assert np.isfinite(float(metrics["loss"]))
    trained = state.replace(step=start.step, ema_params=copy(state.params))
    _, again = run.compiled_step(trained, run.text_params, batch, *run.extra_inputs)
    assert float(again["loss"]) < 0.9 * float(first["loss"])
