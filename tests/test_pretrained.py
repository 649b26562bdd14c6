"""Import of diffusers Stable Diffusion pipeline directories (`model.pretrained`).

Tiny random SD 1.x and 2.x pipelines written by diffusers' PyTorch classes are the references:
our UNet (loaded straight into FSDP shardings over 8 fake devices) and CLIP text encoder must
give their torch modules' outputs, our tokenizer the same ids, and the config the scheduler's
schedule and prediction type. Broken directories fail with errors that name what is wrong.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from models.factory import abstract_unet, build_frozen_text_encoder
from models.pretrained import (
    PretrainedError,
    diffusion_fields_from_scheduler,
    load_unet_params,
    resolve_pretrained_config,
)
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd_pipeline
from train.config_check import validate_config
from train.sharding import make_mesh, tree_shardings

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {version: build_tiny_sd_pipeline(root / version, version=version)
            for version in ("1.x", "2.x")}


def _config(directory, image_size=IMAGE_SIZE):
    config = demo.get_config()
    config.model.pretrained = str(directory)
    config.data.image_size = image_size
    return config


def _broken_copy(pipelines, tmp_path, edit_file=None, **changes):
    directory = tmp_path / "broken"
    shutil.copytree(pipelines["1.x"], directory)
    if edit_file:
        path = directory / edit_file
        content = json.loads(path.read_text())
        content.update(changes)
        path.write_text(json.dumps(content))
    return directory


@pytest.mark.parametrize("version", ["1.x", "2.x"])
def test_import_matches_the_torch_pipeline(pipelines, version):
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    directory = pipelines[version]
    config, lines = resolve_pretrained_config(_config(directory))
    validate_config(config)
    assert config.model.unet.sample_size == LATENT_SIZE
    assert config.model.unet.use_linear_projection is (version == "2.x")
    expected_prediction = "v_prediction" if version == "2.x" else "epsilon"
    assert config.diffusion.prediction_type == expected_prediction
    assert config.diffusion.schedule == "scaled_linear"
    assert (config.diffusion.beta_start, config.diffusion.beta_end) == (0.00085, 0.012)
    assert (config.sample.timestep_spacing, config.sample.steps_offset) == ("leading", 1)
    assert any("prediction_type" in line for line in lines)

    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    graphdef, abstract = abstract_unet(config.model)
    params = load_unet_params(directory / "unet", abstract, tree_shardings(mesh, abstract))
    kernel = params["down_blocks"][0]["resnets"][0]["conv1"]["kernel"].get_value()
    # Placed as training shards it: split over fsdp, never whole on one device.
    assert kernel.sharding.shard_shape(kernel.shape)[2] == kernel.shape[2] // 4

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, LATENT_SIZE, LATENT_SIZE, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    timesteps = np.array([10, 900])
    ours = np.asarray(nnx.merge(graphdef, params)(
        jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)))
    reference_unet = UNet2DConditionModel.from_pretrained(directory / "unet").eval()
    with torch.no_grad():
        reference = reference_unet(
            torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
            torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=1e-4)

    prompts = ["a red cat", "blue", ""]
    tokenizer, text_graphdef, text_params = build_frozen_text_encoder(config.model)
    hf_tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    expected_ids = hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="np").input_ids
    ids = tokenizer(prompts)
    np.testing.assert_array_equal(ids, expected_ids)
    assert tokenizer.max_length == 77 and tokenizer.pad_token_id == hf_tokenizer.pad_token_id
    hidden = np.asarray(nnx.merge(text_graphdef, text_params)(jnp.asarray(ids)))
    reference_text = CLIPTextModel.from_pretrained(directory / "text_encoder").eval()
    with torch.no_grad():
        expected_hidden = reference_text(
            torch.from_numpy(expected_ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, expected_hidden, atol=2e-5, rtol=1e-4)


def test_resolving_is_idempotent_and_keeps_user_settings(pipelines):
    config = _config(pipelines["1.x"])
    config.model.unet.remat = True
    config.optim.learning_rate = 3e-5
    once, _ = resolve_pretrained_config(config)
    twice, _ = resolve_pretrained_config(once)
    assert once.to_json(sort_keys=True) == twice.to_json(sort_keys=True)
    assert once.model.unet.remat is True and once.optim.learning_rate == 3e-5
    # The demo's pixel-space extensions are gone: the architecture is the directory's.
    assert "patch_size" not in once.model.unet and "coordinate_channels" not in once.model.unet
    # The caller's config is not modified.
    assert config.model.unet.patch_size == 2 and config.diffusion.schedule == "cosine"
    unchanged, lines = resolve_pretrained_config(demo.get_config())
    assert lines == [] and unchanged.model.unet.patch_size == 2


def test_scheduler_translation():
    diffusion, sample, notes = diffusion_fields_from_scheduler({
        "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500,
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing", "steps_offset": 0, "thresholding": True,
    })
    assert diffusion["schedule"] == "cosine" and diffusion["num_train_timesteps"] == 500
    assert diffusion["rescale_zero_terminal_snr"] is True
    assert sample == {"timestep_spacing": "trailing", "steps_offset": 0}
    assert any("thresholding" in note for note in notes)
    with pytest.raises(PretrainedError, match="beta_schedule='sigmoid'"):
        diffusion_fields_from_scheduler({"beta_schedule": "sigmoid"})
    with pytest.raises(PretrainedError, match="trained_betas"):
        diffusion_fields_from_scheduler({"trained_betas": [0.1, 0.2]})


def test_missing_directory_and_files(pipelines, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained=.*not a directory"):
        resolve_pretrained_config(_config(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model_index.json not found"):
        resolve_pretrained_config(_config(tmp_path))
    directory = _broken_copy(pipelines, tmp_path)
    (directory / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json not found"):
        resolve_pretrained_config(_config(directory))

    directory = _broken_copy(pipelines, tmp_path / "weights")
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    config, _ = resolve_pretrained_config(_config(directory))
    graphdef, abstract = abstract_unet(config.model)
    mesh = make_mesh((("data", 8),))
    with pytest.raises(FileNotFoundError, match="no UNet weights in .*unet"):
        load_unet_params(directory / "unet", abstract, tree_shardings(mesh, abstract))


def test_unknown_architecture_field_is_named(pipelines, tmp_path):
    directory = _broken_copy(pipelines, tmp_path, "unet/config.json",
                             addition_embed_type="text_time")
    with pytest.raises(PretrainedError, match="unet/config.json.*addition_embed_type='text_time'"):
        resolve_pretrained_config(_config(directory))

    directory = _broken_copy(pipelines, tmp_path / "te", "text_encoder/config.json",
                             architectures=["CLIPTextModelWithProjection"])
    with pytest.raises(PretrainedError, match="CLIPTextModelWithProjection"):
        resolve_pretrained_config(_config(directory))

    directory = _broken_copy(pipelines, tmp_path / "sdxl", "model_index.json",
                             text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(PretrainedError, match="text_encoder_2"):
        resolve_pretrained_config(_config(directory))


def test_shape_mismatch_names_the_parameter(pipelines, tmp_path):
    # A config that disagrees with the weights: the cross-attention keys expect 48 inputs.
    directory = _broken_copy(pipelines, tmp_path, "unet/config.json", cross_attention_dim=48)
    config, _ = resolve_pretrained_config(_config(directory))
    _, abstract = abstract_unet(config.model)
    mesh = make_mesh((("data", 8),))
    with pytest.raises(PretrainedError, match=r"shape mismatch .*attn2\.to_k\.weight: checkpoint "
                                              r"\(64, 32\)"):
        load_unet_params(directory / "unet", abstract, tree_shardings(mesh, abstract))


def test_image_size_must_fit_the_vae_and_unet(pipelines):
    # VAE factor 2 x one UNet downsample: multiples of 4 only.
    with pytest.raises(PretrainedError, match="image_size=18 must be a multiple of 4"):
        resolve_pretrained_config(_config(pipelines["1.x"], image_size=18))
    config, _ = resolve_pretrained_config(_config(pipelines["1.x"], image_size=32))
    assert config.model.unet.sample_size == 16


def test_sharded_load_equals_whole_load(pipelines):
    """Every shard read from its slice of the file equals the tensor read whole."""
    from models.hf_weights import load_torch_state_dict, read_safetensors
    from models.unet import UNet2DConditionModel

    directory = pipelines["2.x"]
    config, _ = resolve_pretrained_config(_config(directory))
    graphdef, abstract = abstract_unet(config.model)
    mesh = make_mesh((("data", 1), ("fsdp", 8)))
    params = load_unet_params(directory / "unet", abstract, tree_shardings(mesh, abstract))
    whole = nnx.eval_shape(lambda: UNet2DConditionModel(
        **{k: v for k, v in config.model.unet.items()}, rngs=nnx.Rngs(0)))
    load_torch_state_dict(whole, read_safetensors(directory / "unet" /
                                                  "diffusion_pytorch_model.safetensors"))
    expected = jax.tree_util.tree_leaves(nnx.state(whole))
    got = jax.tree_util.tree_leaves(params)
    assert len(expected) == len(got)
    assert any(len({str(s.index) for s in x.addressable_shards}) > 1 for x in got)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_index_sharded_and_fp16_weight_files(pipelines, tmp_path):
    """The UNet files diffusers writes for large models (an index over several safetensors
    files) and the `fp16` variant load the same parameters (fp16 rounded, cast to float32)."""
    from diffusers import UNet2DConditionModel

    source = pipelines["1.x"] / "unet"
    config, _ = resolve_pretrained_config(_config(pipelines["1.x"]))
    _, abstract = abstract_unet(config.model)
    shardings = tree_shardings(make_mesh((("data", 2), ("fsdp", 4))), abstract)
    expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(
        load_unet_params(source, abstract, shardings))]

    unet = UNet2DConditionModel.from_pretrained(source)
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    unet.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for directory, tolerance in ((tmp_path / "sharded", 0.0), (tmp_path / "fp16", 1e-3)):
        got = jax.tree_util.tree_leaves(load_unet_params(directory, abstract, shardings))
        assert all(x.dtype == np.float32 for x in got)
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_allclose(np.asarray(b), a, rtol=tolerance, atol=tolerance)
