"""diffusers' `addition_embed_type="text"` (TextTimeEmbedding: LayerNorm, attention pooling with
the mean token as query, Linear, LayerNorm) next to a class embedding, in the pixel-space
upscaler's shape (3 noisy + 3 low-resolution channels, the noise level through the
`num_class_embeds` table), imported through the pretrained path (config.json ->
unet_kwargs_from_diffusers_config, safetensors -> models.pretrained.load_unet_params) and checked
against diffusers' PyTorch UNet.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hf_weights import flat_param_names, to_torch_state_dict
from models.pretrained import load_unet_params
from models.unet import UNet2DConditionModel, unet_kwargs_from_diffusers_config
from train.sharding import logical_names, make_mesh, tree_shardings

TEXT_WIDTH = 12
TINY_TEXT_UPSCALER = dict(
    sample_size=8,
    in_channels=6,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 8, 16),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=TEXT_WIDTH,
    norm_num_groups=4,
    num_class_embeds=351,
    addition_embed_type="text",
    # diffusers' default of 64 heads needs a text width of 64 or more; 4 heads of 3 features.
    addition_embed_type_num_heads=4,
)
# The same pooled-text path next to the "projection" class embedding (a float vector per
# example) instead of the integer table, at two levels to keep the compile short.
TINY_TEXT_PROJECTION = TINY_TEXT_UPSCALER | dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    num_class_embeds=None,
    class_embed_type="projection",
    projection_class_embeddings_input_dim=7,
)

BATCH, TEXT_TOKENS = 2, 5


def _abstract(kwargs):
    return nnx.eval_shape(lambda: UNet2DConditionModel(**kwargs, rngs=nnx.Rngs(0)))


def _perturbed_reference(config, seed):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    reference = diffusers.UNet2DConditionModel(**config)
    # diffusers starts norms at the identity and biases at zero; perturb every tensor so that a
    # swapped, mis-transposed or unused one cannot go unnoticed.
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return reference.eval()


def _load_through_pretrained_path(reference, directory):
    reference.save_pretrained(directory, safe_serialization=True)
    kwargs = unet_kwargs_from_diffusers_config(json.loads((directory / "config.json").read_text()))
    graphdef, abstract_params = nnx.split(_abstract(kwargs))
    mesh = make_mesh([("data", 2), ("fsdp", -1)])
    params = load_unet_params(directory, abstract_params, tree_shardings(mesh, abstract_params))
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """(diffusers reference, our UNet loaded from its save_pretrained directory)."""
    reference = _perturbed_reference(TINY_TEXT_UPSCALER, seed=0)
    directory = tmp_path_factory.mktemp("text_upscaler") / "unet"
    return reference, _load_through_pretrained_path(reference, directory)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    size = TINY_TEXT_UPSCALER["sample_size"]
    noisy = rng.standard_normal((BATCH, size, size, 3)).astype(np.float32)
    low_res = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)
    text = rng.standard_normal((BATCH, TEXT_TOKENS, TEXT_WIDTH)).astype(np.float32)
    timesteps = np.array([17, 903], np.int32)
    return np.concatenate([noisy, low_res], axis=-1), timesteps, text


def _torch_output(reference, sample, timesteps, text, class_labels):
    import torch

    with torch.no_grad():
        return reference(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
            torch.from_numpy(text), class_labels=torch.from_numpy(class_labels),
        ).sample.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _apply(model, sample, timesteps, text, class_labels):
    return model(sample, timesteps, text, class_labels=class_labels)


def test_text_time_upscaler_matches_diffusers(upscaler):
    torch = pytest.importorskip("torch")
    reference, model = upscaler
    sample, timesteps, text = _inputs()
    noise_levels = np.array([20, 350], np.int64)
    expected = _torch_output(reference, sample, timesteps, text, noise_levels)
    out = np.asarray(_apply(model, *map(jnp.asarray, (sample, timesteps, text, noise_levels))))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)

    # The pooled text vector itself, so a failure above points at this part or the rest.
    with torch.no_grad():
        pooled = reference.add_embedding(torch.from_numpy(text)).numpy()
    np.testing.assert_allclose(np.asarray(model.add_embedding(jnp.asarray(text))), pooled,
                               atol=1e-5, rtol=1e-5)

    # Without the pooled text path the output moves: the path is used, not just loaded.
    graphdef, state = nnx.split(model)
    silenced = nnx.merge(graphdef, _zero_add_embedding(state))
    silent = np.asarray(_apply(silenced, *map(jnp.asarray,
                                              (sample, timesteps, text, noise_levels))))
    moved = np.abs(silent - expected) > 1e-4 + 1e-4 * np.abs(expected)
    assert moved.mean() > 0.9, f"only {moved.mean():.2f} of outputs depend on add_embedding"


def _zero_add_embedding(state):
    return nnx.from_flat_state([
        (path, variable.replace(jnp.zeros_like(variable.get_value()))
         if path[0] == "add_embedding" else variable)
        for path, variable in nnx.to_flat_state(state)
    ])


def test_parameters_are_diffusers_and_export_back(upscaler):
    reference, model = upscaler
    torch_state = {name: t.numpy() for name, t in reference.state_dict().items()}
    assert flat_param_names(model, layout="torch") == {
        name: value.shape for name, value in torch_state.items()}
    added = {name for name in torch_state if name.startswith("add_embedding.")}
    assert {"add_embedding.pool.positional_embedding", "add_embedding.pool.q_proj.weight",
            "add_embedding.norm1.weight", "add_embedding.norm2.bias"} <= added

    # diffusers -> safetensors -> ours -> torch layout gives back the very same tensors.
    exported = to_torch_state_dict(model)
    assert exported.keys() == torch_state.keys()
    for name in added | {"class_embedding.weight", "conv_in.weight"}:
        np.testing.assert_array_equal(exported[name], torch_state[name], err_msg=name)

    # Every new parameter carries logical axes, so the mesh rules place it like the rest: the
    # [1, text width] positional embedding splits its width over `fsdp` as a kernel's input does.
    for path, variable in nnx.to_flat_state(nnx.state(model.add_embedding, nnx.Param)):
        names = logical_names(variable)
        assert names is not None and len(names) == variable.get_value().ndim, path
    assert model.add_embedding.pool.positional_embedding[...].sharding.spec == (
        jax.sharding.PartitionSpec(None, "fsdp"))


def test_text_path_with_projection_class_embedding_matches_diffusers(tmp_path):
    reference = _perturbed_reference(TINY_TEXT_PROJECTION, seed=1)
    model = _load_through_pretrained_path(reference, tmp_path / "unet")
    sample, timesteps, text = _inputs(seed=1)
    pooled_prompt = np.random.default_rng(2).standard_normal((BATCH, 7)).astype(np.float32)
    expected = _torch_output(reference, sample, timesteps, text, pooled_prompt)
    out = np.asarray(_apply(model, *map(jnp.asarray, (sample, timesteps, text, pooled_prompt))))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_own_input_options_keep_the_text_path():
    """patch_size / coordinate_channels only change conv_in and conv_out: the pooled text path
    keeps its parameters and the network its output shape (checked abstractly, no compile)."""
    kwargs = TINY_TEXT_UPSCALER | dict(patch_size=2, coordinate_channels=True)
    graphdef, abstract_params = nnx.split(_abstract(kwargs))
    names = flat_param_names(nnx.merge(graphdef, abstract_params), layout="torch")
    plain = flat_param_names(_abstract(TINY_TEXT_UPSCALER), layout="torch")
    assert names["conv_in.weight"] == (8, 6 * 4 + 2, 3, 3)
    assert {k: v for k, v in names.items() if k.startswith("add_embedding.")} == {
        k: v for k, v in plain.items() if k.startswith("add_embedding.")}
    sample, timesteps, text = map(jnp.asarray, _inputs())
    sample = jnp.tile(sample, (1, 2, 2, 1))  # 16x16: two downsamplers x patch 2
    out = jax.eval_shape(
        lambda params: nnx.merge(graphdef, params)(
            sample, timesteps, text, class_labels=jnp.array([3, 9])),
        abstract_params)
    assert out.shape == (BATCH, 16, 16, 3)

def test_diffusers_config_accepts_text_and_refuses_other_addition_embeddings():
    kwargs = unet_kwargs_from_diffusers_config(TINY_TEXT_UPSCALER)
    assert kwargs["addition_embed_type"] == "text"
    assert kwargs["addition_embed_type_num_heads"] == 4
    for kind in ("text_time", "text_image", "image", "image_hint"):
        with pytest.raises(ValueError, match=f"unsupported diffusers UNet options: "
                                             f"addition_embed_type='{kind}'"):
            unet_kwargs_from_diffusers_config(TINY_TEXT_UPSCALER | {"addition_embed_type": kind})
    # Without the text path the head count is diffusers' unused default, whatever it says.
    off = TINY_TEXT_UPSCALER | {"addition_embed_type": None, "addition_embed_type_num_heads": 64}
    off_kwargs = unet_kwargs_from_diffusers_config(off)
    assert "addition_embed_type_num_heads" not in off_kwargs
    assert _abstract(off_kwargs).add_embedding is None

    with pytest.raises(ValueError, match="addition_embed_type: 'text_time' is not one of"):
        _abstract(TINY_TEXT_UPSCALER | {"addition_embed_type": "text_time"})
    # diffusers' default 64 heads cannot split a 12-wide text state: refused when built, not
    # at the first forward pass.
    with pytest.raises(ValueError, match="addition_embed_type_num_heads=64 does not divide "
                                         "the text width 12"):
        _abstract(TINY_TEXT_UPSCALER | {"addition_embed_type_num_heads": 64})
    with pytest.raises(ValueError, match="addition_embed_type_num_heads: a positive int"):
        _abstract(TINY_TEXT_UPSCALER | {"addition_embed_type_num_heads": None})
