"""The UNet's super-resolution layout: diffusers' x4-upscaler UNet (7 input channels = 4 noisy
latent + 3 low-resolution image, the noise level through an `nn.Embedding` class embedding,
self-attention replaced by cross-attention on some levels), imported through the same path
as a pretrained pipeline's `unet/` (config.json -> unet_kwargs_from_diffusers_config,
safetensors -> models.pretrained.load_unet_params) and checked against diffusers' PyTorch UNet.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hf_weights import flat_param_names, to_torch_state_dict
from models.pretrained import load_unet_params
from models.unet import UNet2DConditionModel, unet_kwargs_from_diffusers_config
from train.sharding import make_mesh, tree_shardings

# stabilityai/stable-diffusion-x4-upscaler, unet/config.json as published (diffusers 0.8.0).
X4_UPSCALER_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.8.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "UpBlock2D"],
    "use_linear_projection": True,
}

# The same layout at toy width (as diffusers' own upscale-pipeline test shrinks it): both
# only_cross_attention settings on attention levels, so attn1 reads the text on one level and
# the image on the other, in the down and (reversed) up path.
TINY_UPSCALER = dict(
    sample_size=8,
    in_channels=7,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 8, 16),
    layers_per_block=2,
    attention_head_dim=2,
    only_cross_attention=(True, True, False),
    use_linear_projection=True,
    cross_attention_dim=12,
    norm_num_groups=4,
    num_class_embeds=1000,
)

BATCH, TEXT_TOKENS = 2, 5


def _abstract(kwargs):
    return nnx.eval_shape(lambda: UNet2DConditionModel(**kwargs, rngs=nnx.Rngs(0)))


def test_x4_upscaler_config_maps_onto_diffusers_parameters():
    """The real 473M-parameter layout: every name and shape equals diffusers' (no weights are
    allocated on either side: eval_shape here, the meta device there)."""
    kwargs = unet_kwargs_from_diffusers_config(X4_UPSCALER_UNET_CONFIG)
    assert kwargs["num_class_embeds"] == 1000
    ours = flat_param_names(_abstract(kwargs), layout="torch")
    # An embedding table is (rows, width) in both frameworks: loaded without a transpose.
    assert ours["class_embedding.weight"] == (1000, 1024)
    assert ours["conv_in.weight"] == (256, 7, 3, 3)
    # only_cross_attention: attn1 reads the 1024-wide text, not the 512-wide image features.
    assert ours["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == (
        512, 1024)
    assert ours["down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == (
        1024, 1024)

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**{
            k: v for k, v in X4_UPSCALER_UNET_CONFIG.items() if not k.startswith("_")})
    assert ours == {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert sum(math.prod(shape) for shape in ours.values()) == sum(
        t.numel() for t in reference.parameters())


def test_refuses_class_embedding_options_it_does_not_model():
    with pytest.raises(ValueError, match="class_embeddings_concat=True"):
        unet_kwargs_from_diffusers_config(TINY_UPSCALER | {"class_embeddings_concat": True})
    with pytest.raises(ValueError, match="num_class_embeds: a positive int"):
        _abstract(TINY_UPSCALER | {"num_class_embeds": 0})
    with pytest.raises(ValueError, match="class_embed_type: 'timestep' is not one of"):
        _abstract(TINY_UPSCALER | {"class_embed_type": "timestep"})


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """(diffusers reference, our UNet loaded from its save_pretrained directory, that dir)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**TINY_UPSCALER)
    # diffusers starts norms at the identity and some biases at zero; perturb every tensor so
    # that a swapped or mis-transposed one cannot go unnoticed.
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    reference.eval()
    unet_dir = tmp_path_factory.mktemp("x4_upscaler") / "unet"
    reference.save_pretrained(unet_dir, safe_serialization=True)

    kwargs = unet_kwargs_from_diffusers_config(json.loads((unet_dir / "config.json").read_text()))
    graphdef, abstract_params = nnx.split(_abstract(kwargs))
    # Sharded as training places it: the class embedding's width splits over `fsdp`.
    mesh = make_mesh([("data", 2), ("fsdp", -1)])
    params = load_unet_params(unet_dir, abstract_params, tree_shardings(mesh, abstract_params))
    return reference, nnx.merge(graphdef, params), unet_dir


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    size = TINY_UPSCALER["sample_size"]
    noisy_latents = rng.standard_normal((BATCH, size, size, 4)).astype(np.float32)
    # The upscaler sees the low-resolution image at the latent's size (its VAE downsamples 4x).
    low_res = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)
    text = rng.standard_normal((BATCH, TEXT_TOKENS, 12)).astype(np.float32)
    timesteps = np.array([17, 903], np.int32)
    noise_levels = np.array([20, 350], np.int32)
    return np.concatenate([noisy_latents, low_res], axis=-1), timesteps, text, noise_levels


@nnx.jit
def _apply(model, sample, timesteps, text, class_labels):
    return model(sample, timesteps, text, class_labels=class_labels)


def test_tiny_upscaler_matches_diffusers(upscaler):
    torch = pytest.importorskip("torch")
    reference, model, unet_dir = upscaler
    sample, timesteps, text, noise_levels = _inputs()
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
            torch.from_numpy(text), class_labels=torch.from_numpy(noise_levels).long(),
        ).sample.permute(0, 2, 3, 1).numpy()
    out = np.asarray(_apply(model, jnp.asarray(sample), jnp.asarray(timesteps),
                            jnp.asarray(text), jnp.asarray(noise_levels)))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)

    # The loaded table is diffusers' own, row for row, and exports back unchanged.
    table = reference.state_dict()["class_embedding.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(model.class_embedding.embedding[...]), table)
    np.testing.assert_array_equal(to_torch_state_dict(model)["class_embedding.weight"], table)
    assert model.class_embedding.embedding[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp")
    assert (unet_dir / "diffusion_pytorch_model.safetensors").is_file()


def test_noise_level_labels_are_checked(upscaler):
    _, model, _ = upscaler
    sample, timesteps, text, noise_levels = (jnp.asarray(x) for x in _inputs())
    # Every check fires while tracing, before any UNet compute or compile.
    with pytest.raises(ValueError, match="pass class_labels"):
        model(sample, timesteps, text)
    # A fraction of the maximum noise level must not be floored to row 0 silently.
    with pytest.raises(ValueError, match="integer labels.*float32"):
        _apply(model, sample, timesteps, text, noise_levels / 350.0)
    with pytest.raises(ValueError, match=r"in \[0, 1000\).*got 20\.\.1000"):
        model(sample, timesteps, text, class_labels=jnp.array([20, 1000]))
    with pytest.raises(ValueError, match=r"one label or one per example \(2\)"):
        model(sample, timesteps, text, class_labels=jnp.array([20, 30, 40]))
