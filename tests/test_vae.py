"""VAE: a tiny random diffusers AutoencoderKL saved with save_pretrained loads into ours and
encodes / decodes as it does; the latent scaling helpers; clear errors for broken directories."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hf_weights import flat_param_names
from models.vae import (
    AutoencoderKL,
    decode_from_latents,
    encode_to_latents,
    load_vae,
    sample_posterior,
    vae_kwargs_from_diffusers_config,
)

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    # Not diffusers' defaults, so the test sees that load_vae reads them.
    scaling_factor=0.5,
    shift_factor=0.125,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch VAE, its save_pretrained directory); every tensor perturbed so that a swapped or
    mis-transposed one (norms start at the identity, biases at zero) cannot go unnoticed."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    directory = tmp_path_factory.mktemp("vae")
    model.eval().save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def _torch_posterior(reference, images):
    import torch

    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    return nhwc(posterior.mean), nhwc(posterior.logvar)


def _torch_decode(reference, latents):
    import torch

    with torch.no_grad():
        out = reference.decode(torch.from_numpy(np.asarray(latents)).permute(0, 3, 1, 2)).sample
    return out.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _encode(vae, images):
    return vae.encode(images)


@nnx.jit
def _decode(vae, latents):
    return vae.decode(latents)


def test_load_vae_matches_diffusers(reference, images):
    torch_vae, directory = reference
    vae, info = load_vae(directory)
    assert flat_param_names(vae, layout="torch") == {
        name: tuple(t.shape) for name, t in torch_vae.state_dict().items()}
    assert info == {"scaling_factor": 0.5, "shift_factor": 0.125, "latent_channels": 4,
                    "downsample_factor": 2}

    expected_mean, expected_logvar = _torch_posterior(torch_vae, images)
    mean, logvar = _encode(vae, images)
    assert mean.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logvar, expected_logvar, atol=1e-4, rtol=1e-4)

    decoded = _decode(vae, expected_mean)
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32
    np.testing.assert_allclose(decoded, _torch_decode(torch_vae, expected_mean),
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_stays_close_to_diffusers(reference, images):
    torch_vae, directory = reference
    vae, _ = load_vae(directory, dtype=jnp.bfloat16)
    # Parameters stay float32 (frozen, read once); only the computation is bf16.
    assert {v.dtype for v in jax.tree.leaves(nnx.state(vae, nnx.Param))} == {jnp.dtype("float32")}
    expected_mean, _ = _torch_posterior(torch_vae, images)
    mean, _ = _encode(vae, images)
    assert mean.dtype == jnp.float32
    assert np.abs(np.asarray(mean) - expected_mean).max() < 0.05 * np.abs(expected_mean).max()
    expected = _torch_decode(torch_vae, expected_mean)
    decoded = np.asarray(_decode(vae, expected_mean))
    assert np.abs(decoded - expected).max() < 0.05 * np.abs(expected).max()


def test_latent_scaling_helpers(reference, images):
    torch_vae, directory = reference
    vae, info = load_vae(directory)
    scale, shift = info["scaling_factor"], info["shift_factor"]
    mean, logvar = _encode(vae, images)

    # Many posterior draws: centred on (mean - shift) * scale, spread exp(logvar / 2) * scale.
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.jit(jax.vmap(lambda key: (sample_posterior(mean, logvar, key) - shift) * scale))(
        keys)
    np.testing.assert_allclose(draws.mean(0), (mean - shift) * scale,
                               atol=0.1 * scale * float(np.exp(0.5 * logvar).max()))
    np.testing.assert_allclose(draws.std(0), np.exp(0.5 * logvar) * scale, rtol=0.1)

    latents = nnx.jit(encode_to_latents, static_argnums=(3, 4))(
        vae, images, jax.random.PRNGKey(1), scale, shift)
    assert latents.shape == mean.shape
    # A draw lies within a few posterior standard deviations of the mean.
    assert np.all(np.abs(latents / scale + shift - mean) < 6 * np.exp(0.5 * logvar))

    # Decoding scaled latents is diffusers' decode of latents / scale + shift.
    scaled = (np.asarray(mean) - shift) * scale
    decoded = nnx.jit(decode_from_latents, static_argnums=(2, 3))(vae, scaled, scale, shift)
    np.testing.assert_allclose(decoded, _torch_decode(torch_vae, scaled / scale + shift),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [
    # Stable Diffusion 1.x / 2.x (83.7M parameters).
    dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
    dict(use_quant_conv=False, use_post_quant_conv=False),
    dict(mid_block_add_attention=False, layers_per_block=2, block_out_channels=(8, 16, 16),
         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
         norm_num_groups=4),
])
def test_parameter_names_match_diffusers_variants(options):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch_vae = diffusers.AutoencoderKL(**TINY | options)
    kwargs = vae_kwargs_from_diffusers_config(dict(torch_vae.config))
    vae = nnx.eval_shape(lambda: AutoencoderKL(**kwargs, rngs=nnx.Rngs(0)))
    assert flat_param_names(vae, layout="torch") == {
        name: tuple(t.shape) for name, t in torch_vae.state_dict().items()}


def _copy(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "vae")


def test_half_precision_weights_load_as_float32(reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _copy(reference[1], tmp_path)
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v.astype(np.float16) for k, v in state.items()},
              directory / "diffusion_pytorch_model.fp16.safetensors")
    weights.unlink()
    vae, _ = load_vae(directory)
    kernel = vae.decoder.conv_out.kernel.get_value()
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(
        kernel, np.transpose(state["decoder.conv_out.weight"].astype(np.float16), (2, 3, 1, 0)))


def test_missing_files_are_named(reference, tmp_path):
    directory = _copy(reference[1], tmp_path)
    (directory / "diffusion_pytorch_model.safetensors").rename(
        directory / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"VAE weights not found in .*expected "
                       r"diffusion_pytorch_model\.safetensors.*found diffusion_pytorch_model"
                       r"\.bin; only safetensors"):
        load_vae(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"VAE config not found: .*config\.json"):
        load_vae(directory)


def test_unsupported_options_are_named(reference, tmp_path):
    directory = _copy(reference[1], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["latents_mean"] = [0.0] * 4
    config["norm_type"] = "spatial"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported diffusers VAE options: "
                       r"latents_mean=\[0\.0.*norm_type='spatial'"):
        load_vae(directory)
    with pytest.raises(ValueError, match="down_block_types: 'AttnDownEncoderBlock2D'"):
        AutoencoderKL(**vae_kwargs_from_diffusers_config(
            TINY | {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}),
            rngs=nnx.Rngs(0))


def test_wrong_or_missing_weights_are_named(reference, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _copy(reference[1], tmp_path)
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:2]
    del state["encoder.mid_block.attentions.0.to_q.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError) as error:
        load_vae(directory)
    message = str(error.value)
    assert str(directory) in message
    assert "missing from checkpoint (1): encoder.mid_block.attentions.0.to_q.bias" in message
    assert "decoder.conv_out.weight: checkpoint (3, 3, 32, 2) vs model (3, 3, 32, 3)" in message


def test_image_size_must_divide_by_the_downsample_factor(reference):
    vae, _ = load_vae(reference[1])
    with pytest.raises(ValueError, match="multiples of the VAE's downsample factor 2, got 15x16"):
        jax.eval_shape(vae.encode, jnp.zeros((1, 15, 16, 3)))
