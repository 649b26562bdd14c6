"""Export: a real Orbax checkpoint of a tiny diffusers-compatible run is written as a diffusers
directory; diffusers' PyTorch UNet loads it and denoises as our sampler's UNet does. Models
diffusers cannot represent are refused, through the CLI too."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from export.diffusers_export import ExportError, diffusers_unet_config, export_checkpoint
from models.factory import abstract_unet, text_conditioning_fn
from models.hf_weights import flat_param_names, to_torch_state_dict
from models.unet import UNet2DConditionModel, unet_kwargs_from_diffusers_config
from train import checkpoint
from train.state import init_train_state, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 2


def _config(**unet):
    """The tiny config made diffusers-compatible (no patch folding, no coordinate channels);
    it keeps the projection class embedding and scale-shift resnets, which diffusers has."""
    config = tiny.get_config()
    config.model.unet.patch_size = 1
    config.model.unet.coordinate_channels = False
    config.model.text_encoder.tokenizer = "bytes"  # no tokenizer training in the workdir
    config.model.text_encoder.max_length = 32
    config.model.unet.update(unet)
    return config


def _save_checkpoint(workdir, config, seed=0):
    """A checkpoint as training writes it (`train.checkpoint.save`), parameters drawn from numpy
    rather than trained: no train-step compile. The EMA is half the raw parameters, so the two
    cannot be confused."""
    _, abstract = abstract_unet(config.model)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape)
        if "kernel" in name:  # unit-variance activations through the depth
            value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = ("scale" in name) + 0.1 * noise
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, abstract)
    optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(0)).replace(
        step=jnp.asarray(STEP, jnp.int32), ema_params=jax.tree.map(lambda p: 0.5 * p, params))
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, state, config=config)
        manager.wait_until_finished()
    return params


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    raw = _save_checkpoint(workdir, _config())
    return workdir, raw


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sd"
    summary = export_checkpoint(run[0], out)
    return out, summary


def test_unet_config_inverts_the_import():
    unet = dict(_config().model.unet)
    config = diffusers_unet_config(unet)
    assert config["_class_name"] == "UNet2DConditionModel"
    json.dumps(config)  # all plain JSON
    # Read back by the importer, the config builds a UNet with the same parameters.
    kwargs = unet_kwargs_from_diffusers_config(config)
    original = nnx.merge(*abstract_unet(_config().model))
    rebuilt = nnx.eval_shape(lambda: UNet2DConditionModel(**kwargs, rngs=nnx.Rngs(0)))
    assert flat_param_names(rebuilt) == flat_param_names(original)
    # Our defaults are written out: diffusers' differ (e.g. layers_per_block 2, 32 groups).
    assert config["layers_per_block"] == 1 and config["norm_num_groups"] == 8


@pytest.mark.parametrize("field,value", [("patch_size", 2), ("coordinate_channels", True)])
def test_fields_diffusers_cannot_represent_are_refused(field, value):
    with pytest.raises(ExportError, match=f"config.model.unet.{field}={value!r} has no "
                       "equivalent in diffusers"):
        diffusers_unet_config(dict(_config(**{field: value}).model.unet))


def test_export_writes_unet_only_without_a_pretrained_pipeline(exported):
    out, summary = exported
    assert summary.step == STEP and summary.ema and not summary.pipeline
    assert sorted(os.listdir(out)) == ["unet"]
    assert os.listdir(out.parent) == [out.name]  # the partial directory was renamed
    assert sorted(os.listdir(out / "unet")) == ["config.json",
                                                "diffusion_pytorch_model.safetensors"]


def _assert_denoises_as_our_sampler(workdir, unet_dir):
    """diffusers' UNet2DConditionModel read from `unet_dir` and our sampler's UNet of `workdir`
    give the same output for the same noisy input, timesteps and text states."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from sample.pipeline import load_model

    config = json.loads((unet_dir / "config.json").read_text())
    # Every key is one diffusers' UNet2DConditionModel takes (an unknown one it would ignore).
    _, unused, _ = diffusers.UNet2DConditionModel.extract_init_dict(config)
    assert not unused
    reference = diffusers.UNet2DConditionModel.from_pretrained(unet_dir).eval()

    # Our side: the sampler's loader, text encoder and UNet call.
    model = load_model(workdir, devices=jax.local_devices()[:1])
    encode = text_conditioning_fn(model.config.model, model.tokenizer, model.text_graphdef)
    ids = np.asarray(model.tokenizer(["a red circle in the top left", "a blue square"]),
                     np.int32)
    text = jax.jit(encode)(model.text_params, ids)
    rng = np.random.default_rng(1)
    size = model.config.data.image_size
    noisy = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    timesteps = np.array([17, 901], np.int32)

    @jax.jit
    def denoise(params, x, t, text):
        return nnx.merge(model.unet_graphdef, params)(x, t, text["hidden"],
                                                      class_labels=text["pooled"])

    ours = np.asarray(denoise(model.params, noisy, timesteps, text))
    with torch.no_grad():
        theirs = reference(
            torch.from_numpy(noisy).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(np.array(text["hidden"])),
            class_labels=torch.from_numpy(np.array(text["pooled"])),
        ).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(ours).max() > 0.5  # a real output, not zeros on both sides
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_exported_unet_denoises_as_our_sampler(run, exported):
    _assert_denoises_as_our_sampler(run[0], exported[0] / "unet")


@pytest.mark.slow
def test_cli_exports_a_trained_run(tmp_path):
    """Two real training steps (`train_and_evaluate`), then `python -m export`: diffusers reads
    back the EMA parameters the loop saved."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from sample.pipeline import load_model
    from train.loop import train_and_evaluate

    # One level (no resampling): the cheapest train step to compile.
    config = _config(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",))
    config.data.synthetic_num_samples = 64
    config.model.text_encoder.max_length = 106  # the config check wants whole captions
    config.train.num_train_steps = 2
    config.train.checkpoint_every_steps = 2
    config.train.sample_every_steps = 0
    workdir = str(tmp_path / "run")
    assert train_and_evaluate(config, workdir)["step"] == 2
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "export", "--workdir", workdir, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "exported the EMA UNet of checkpoint step 2" in result.stdout
    assert "only unet/ was written" in result.stdout

    reference = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    model = load_model(workdir, devices=jax.local_devices()[:1])
    expected = to_torch_state_dict(nnx.merge(model.unet_graphdef, model.params))
    loaded = {name: t.numpy() for name, t in reference.state_dict().items()}
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_no_ema_exports_the_raw_parameters(run, exported, tmp_path):
    from safetensors.numpy import load_file

    workdir, raw = run
    summary = export_checkpoint(workdir, tmp_path / "raw", ema=False)
    assert not summary.ema
    graphdef, _ = abstract_unet(_config().model)
    expected = to_torch_state_dict(nnx.merge(graphdef, raw))
    written = load_file(tmp_path / "raw" / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(exported[0] / "unet" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
        np.testing.assert_allclose(ema[name], 0.5 * value, rtol=1e-6, err_msg=name)


def test_refuses_a_non_empty_out(run, exported):
    with pytest.raises(ExportError, match="is not empty"):
        export_checkpoint(run[0], exported[0])


def test_refuses_raw_lora_adapters_and_lora_export_of_a_full_run(tmp_path, run):
    import ml_collections

    from export.diffusers_export import export_lora_checkpoint

    config = _config()
    config.model.lora = ml_collections.ConfigDict({"rank": 4, "alpha": 4.0})
    workdir = str(tmp_path / "run")
    _save_checkpoint(workdir, config)
    with pytest.raises(ExportError, match=r"lora.rank=4: --no_ema is not supported"):
        export_checkpoint(workdir, tmp_path / "out", ema=False)
    with pytest.raises(ExportError, match=r"whole UNet \(config.model.lora.rank=0\)"):
        export_lora_checkpoint(run[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_refuses_a_patch_size_2_model_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    _save_checkpoint(str(workdir), _config(patch_size=2))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "export", "--workdir", str(workdir), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export: error: config.model.unet.patch_size=2 has no equivalent")
    assert not out.exists()  # refused before anything was written


# 2.x (linear projections, a head count per level) is the costlier variant: slow.
@pytest.mark.parametrize("version", ["1.x", pytest.param("2.x", marks=pytest.mark.slow)])
def test_fine_tuned_pipeline_round_trips_through_stable_diffusion_pipeline(version, tmp_path):
    """A run of `model.pretrained` = a tiny SD pipeline, exported: StableDiffusionPipeline loads
    the directory, its UNet is the fine-tuned one (it denoises as our sampler's does), the other
    parts are the pretrained ones, linked, and it generates an image."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from models.pretrained import load_unet_params, resolve_pretrained_config
    from sample.pipeline import load_model
    from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd_pipeline
    from train.sharding import make_mesh, replicated

    source = build_tiny_sd_pipeline(tmp_path / "sd", version=version)
    config = tiny.get_config()
    config.model.pretrained = str(source)
    config.data.image_size = IMAGE_SIZE
    config, _ = resolve_pretrained_config(config)
    _, abstract = abstract_unet(config.model)
    rep = replicated(make_mesh([("data", -1)], devices=jax.local_devices()[:1]))
    pretrained = load_unet_params(source / "unet", abstract, jax.tree.map(lambda _: rep, abstract))
    # "Fine-tuned": every parameter moved, so a copied unet/ would not pass.
    noise = np.random.default_rng(0)
    tuned = jax.tree.map(
        lambda p: p + 0.05 * jnp.asarray(noise.standard_normal(p.shape), p.dtype), pretrained)
    optimizer, _ = make_optimizer(config.optim, config.train.num_train_steps)
    state = init_train_state(tuned, optimizer, jax.random.PRNGKey(0)).replace(
        step=jnp.asarray(STEP, jnp.int32))
    workdir = str(tmp_path / "run")
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, state, config=config)
        manager.wait_until_finished()

    out = tmp_path / "exported"
    summary = export_checkpoint(workdir, out)
    assert summary.pipeline
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    vae_weights = "vae/diffusion_pytorch_model.safetensors"
    assert os.path.samefile(out / vae_weights, source / vae_weights)  # linked, not copied
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet.config.sample_size == LATENT_SIZE  # the pipeline's, not training's

    model = load_model(workdir, devices=jax.local_devices()[:1])
    encode = text_conditioning_fn(model.config.model, model.tokenizer, model.text_graphdef)
    ids = np.asarray(model.tokenizer(["a red cat", "blue"]), np.int32)
    hidden = np.array(jax.jit(encode)(model.text_params, ids)["hidden"])
    with torch.no_grad():
        torch_hidden = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(hidden, torch_hidden, atol=1e-4, rtol=1e-4)
    latents = noise.standard_normal((2, LATENT_SIZE, LATENT_SIZE, 4)).astype(np.float32)
    timesteps = np.array([17, 901], np.int32)
    ours = np.asarray(jax.jit(lambda params, x, t, h: nnx.merge(model.unet_graphdef, params)(
        x, t, h))(model.params, latents, timesteps, hidden))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2),
                           torch.from_numpy(timesteps), encoder_hidden_states=torch.from_numpy(
                               hidden)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    image = pipe("a red cat", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                 output_type="np").images
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
