"""UNet: shapes, conditioning wiring, gradients, and one-to-one parity with diffusers.

XLA compiles are the cost here, so every test builds abstractly (`nnx.eval_shape`) and fills
parameters from numpy or from a torch reference; configs are shared so compiles are reused.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hf_weights import flat_param_names, load_torch_state_dict, to_torch_state_dict
from models.unet import (
    ATTENTION_IMPLEMENTATIONS,
    Attention,
    Transformer2DModel,
    UNet2DConditionModel,
    coordinate_grid,
    depth_to_space,
    dot_product_attention,
    space_to_depth,
    timestep_embedding,
    unet_kwargs_from_diffusers_config,
)

# Both block kinds, a conv_shortcut (8 -> 16), per-block head counts (the mid block must take
# the last), only-cross-attention on one level (the mid block must ignore it).
TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    only_cross_attention=(False, True),
    cross_attention_dim=12,
    norm_num_groups=4,
)

# One level, no resampling, attention in the mid block only: the cheapest graph to compile.
MINI = TINY | dict(
    sample_size=4,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    block_out_channels=(8,),
    attention_head_dim=2,
    only_cross_attention=False,
)

# Names and shapes only (no compile): linear projections, stacked transformer blocks, two
# resnets per level, equal widths, the other block order.
WIDE = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 8),
    layers_per_block=2,
    transformer_layers_per_block=(2, 1),
    attention_head_dim=8,
    cross_attention_dim=12,
    norm_num_groups=4,
    use_linear_projection=True,
)


def _abstract_unet(config, **kwargs):
    return nnx.eval_shape(lambda: UNet2DConditionModel(**config, **kwargs, rngs=nnx.Rngs(0)))


def _fill_params(module, seed):
    """Random parameters from numpy: no per-shape XLA random-init compiles."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(module):
        if not isinstance(variable, nnx.Param):
            continue
        shape = variable.shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        variable.set_value(jnp.asarray(value, variable.dtype))
    return module


@nnx.jit
def _apply(model, sample, timesteps, context):
    return model(sample, timesteps, context)


def _inputs(config, batch=2, seed=0, length=5):
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    sample = rng.standard_normal((batch, size, size, config["in_channels"]))
    context = rng.standard_normal((batch, length, config["cross_attention_dim"]))
    timesteps = np.array([3, 870][:batch], np.int32)
    return (jnp.asarray(sample, jnp.float32), jnp.asarray(timesteps),
            jnp.asarray(context, jnp.float32))


@pytest.fixture(scope="module")
def tiny_unet():
    return _fill_params(_abstract_unet(TINY), seed=0)


@pytest.mark.parametrize("query_tokens,context_tokens", [(24, 24), (24, 5)])
def test_cpu_attention_matches_jax_attention_with_gradients(query_tokens, context_tokens):
    """The CPU attention's hand-written gradient equals autodiff through jax's attention."""
    rng = np.random.default_rng(0)
    shape = lambda tokens: (2, tokens, 3, 8)
    query, key, value = (jnp.asarray(3 * rng.standard_normal(shape(tokens)), jnp.float32)
                         for tokens in (query_tokens, context_tokens, context_tokens))
    weights = jnp.asarray(rng.standard_normal(shape(query_tokens)), jnp.float32)

    def loss(attention):
        return jax.value_and_grad(
            lambda q, k, v: jnp.sum(attention(q, k, v) * weights), argnums=(0, 1, 2))

    ours = jax.jit(loss(dot_product_attention))(query, key, value)
    reference = jax.jit(loss(jax.nn.dot_product_attention))(query, key, value)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _attention_inputs(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.standard_normal((2, 6, 3, 8)), dtype) for _ in range(3))


def _recording_jax_attention(monkeypatch, cudnn_error=None):
    """Replaces jax.nn.dot_product_attention with a recorder of the `implementation` asked for;
    "cudnn" raises `cudnn_error` when given (what jax raises for inputs cuDNN does not take)."""
    real, asked = jax.nn.dot_product_attention, []

    def recorder(query, key, value, implementation=None):
        asked.append(implementation)
        if implementation == "cudnn" and cudnn_error is not None:
            raise cudnn_error
        return real(query, key, value)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
    return asked


@pytest.mark.parametrize("backend,dtype,cudnn_error,expected", [
    ("cpu", jnp.bfloat16, None, []),  # the heads-major formulation, no jax attention
    ("gpu", jnp.bfloat16, None, ["cudnn"]),
    ("gpu", jnp.float16, None, ["cudnn"]),
    # A head width the fused kernel does not take: XLA's attention instead.
    ("gpu", jnp.bfloat16, NotImplementedError("The head dim must be <= 128"), ["cudnn", "xla"]),
    ("gpu", jnp.float32, None, ["xla"]),  # cuDNN's kernel is half precision only
    ("tpu", jnp.bfloat16, None, ["xla"]),
])
def test_auto_attention_picks_by_backend_and_dtype(monkeypatch, backend, dtype, cudnn_error,
                                                   expected):
    asked = _recording_jax_attention(monkeypatch, cudnn_error)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    query, key, value = _attention_inputs(dtype)
    out = dot_product_attention(query, key, value, implementation="auto")
    assert asked == expected
    reference = np.asarray(_heads_major(query, key, value), np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=2e-2, atol=2e-2)


def _heads_major(query, key, value):
    return dot_product_attention(query, key, value, implementation="heads_major")


def test_forced_attention_implementations(monkeypatch):
    query, key, value = _attention_inputs()
    reference = np.asarray(_heads_major(query, key, value))
    asked = _recording_jax_attention(monkeypatch)
    np.testing.assert_allclose(dot_product_attention(query, key, value, implementation="xla"),
                               reference, rtol=1e-5, atol=1e-5)
    assert asked == ["xla"]
    # cuDNN's kernel where it does not apply (here: float32 on CPU) is an error naming it.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="attention='cudnn' does not apply"):
        dot_product_attention(query, key, value, implementation="cudnn")
    with pytest.raises(ValueError, match="is not one of"):
        dot_product_attention(query, key, value, implementation="flash")


def test_unet_sets_its_attention_on_every_attention_layer():
    for implementation in ATTENTION_IMPLEMENTATIONS:
        model = _abstract_unet(TINY, attention=implementation)
        layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention)]
        assert layers and {layer.implementation for layer in layers} == {implementation}
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        _abstract_unet(TINY, attention="flash")


def test_config_attention_reaches_the_unet():
    from configs import tiny
    from models.factory import build_unet

    config = tiny.get_config()
    config.model.attention = "xla"
    model = nnx.eval_shape(lambda: build_unet(config.model, nnx.Rngs(0)))
    assert {m.implementation for _, m in nnx.iter_modules(model) if isinstance(m, Attention)} == {
        "xla"}


def test_unet_output_is_the_same_with_xla_attention(tiny_unet):
    sample, timesteps, context = _inputs(TINY)
    xla = _fill_params(_abstract_unet(TINY, attention="xla"), seed=0)
    np.testing.assert_allclose(np.asarray(_apply(xla, sample, timesteps, context)),
                               np.asarray(_apply(tiny_unet, sample, timesteps, context)),
                               rtol=1e-5, atol=1e-5)


def test_structure_and_state():
    model = _abstract_unet(TINY)
    # No RNG streams or other state beside parameters while dropout is off.
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    names = flat_param_names(model)
    assert "down_blocks.0.resnets.0.conv_shortcut.weight" not in names
    assert names["down_blocks.1.resnets.0.conv_shortcut.weight"] == (1, 1, 8, 16)
    block = "up_blocks.0.attentions.0.transformer_blocks.0"
    assert names[f"{block}.ff.net.0.proj.weight"] == (16, 128)  # GEGLU: 2 * 4 * 16
    assert names[f"{block}.ff.net.2.weight"] == (64, 16)
    assert names[f"{block}.attn1.to_k.weight"] == (12, 16)  # only-cross: reads the context
    assert f"{block}.attn1.to_q.bias" not in names and f"{block}.attn1.to_out.0.bias" in names


def test_forward_shape_and_conditioning(tiny_unet):
    sample, timesteps, context = _inputs(TINY)
    base = np.asarray(_apply(tiny_unet, sample, timesteps, context))
    assert base.shape == (2, 8, 8, 3) and base.dtype == np.float32
    assert np.isfinite(base).all()
    other_context = np.asarray(_apply(tiny_unet, sample, timesteps, context + 1.0))
    other_time = np.asarray(_apply(tiny_unet, sample, timesteps + 100, context))
    assert np.abs(base - other_context).max() > 1e-3
    assert np.abs(base - other_time).max() > 1e-3


def _block(dtype=jnp.float32):
    return nnx.eval_shape(lambda: Transformer2DModel(
        2, 4, 8, num_layers=2, cross_attention_dim=12, norm_num_groups=4,
        use_linear_projection=True, only_cross_attention=False, dropout=0.0, norm_eps=1e-5,
        remat=False, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
    ))


def _block_inputs():
    rng = np.random.default_rng(2)
    return (jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, 3, 12)), jnp.float32))


@nnx.jit
def _apply_block(model, x, context):
    return model(x, context)


def test_bfloat16_compute():
    # The whole UNet is only traced (compiling it again in bf16 costs ~10 s on a small CPU);
    # numerics are checked on a transformer block, where low precision bites first.
    out = jax.eval_shape(lambda m: m(*_inputs(TINY)), _abstract_unet(TINY, dtype=jnp.bfloat16))
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32

    ref_block = _fill_params(_block(), seed=3)
    bf16_block = _block(jnp.bfloat16)
    nnx.update(bf16_block, nnx.state(ref_block))
    x, context = _block_inputs()
    out = np.asarray(_apply_block(bf16_block, x.astype(jnp.bfloat16),
                                  context.astype(jnp.bfloat16)), np.float32)
    ref = np.asarray(_apply_block(ref_block, x, context))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_gradients_reach_every_parameter_with_remat_and_equal_plain_ones():
    model = _fill_params(_abstract_unet(MINI, remat=True), seed=1)
    plain = _abstract_unet(MINI, remat=False)
    nnx.update(plain, nnx.state(model))
    sample, _, context = _inputs(MINI)

    @nnx.jit
    def grads(model):
        # A scalar timestep broadcasts over the batch.
        loss = lambda m: jnp.mean(m(sample, jnp.float32(250.0), context) ** 2)
        return nnx.grad(loss)(model)

    flat = nnx.to_flat_state(grads(model))
    assert len(flat) == len(flat_param_names(model))
    zero = [".".join(map(str, path)) for path, g in flat if not np.any(np.asarray(g.get_value()))]
    assert not zero, f"parameters without gradient: {zero}"
    assert all(np.isfinite(np.asarray(g.get_value())).all() for _, g in flat)
    # Recomputing activations in the backward pass changes memory, not the gradient.
    for (path, g), (_, g_plain) in zip(flat, nnx.to_flat_state(grads(plain)), strict=True):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(g_plain.get_value()),
                                   rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_demo_config_builds():
    from configs import demo

    model = _abstract_unet(dict(demo.get_config().model.unet))
    names = flat_param_names(model)
    # Every cross-attention reads the text encoder's width.
    assert names["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (128, 64)


def test_rejects_unsupported_options(tiny_unet):
    with pytest.raises(ValueError, match="down_block_types"):
        _abstract_unet(TINY | {"down_block_types": ("DownBlock2D", "AttnDownBlock2D")})
    with pytest.raises(ValueError, match="norm_num_groups"):
        _abstract_unet(TINY | {"norm_num_groups": 3})
    with pytest.raises(ValueError, match="class_embed_type"):
        _abstract_unet(TINY | {"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        unet_kwargs_from_diffusers_config(TINY | {"addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="multiples of 2"):
        _apply(tiny_unet, jnp.zeros((1, 6, 5, 4)), 1, jnp.zeros((1, 2, 12)))


def _randomised(torch, module):
    # diffusers starts norms at the identity and some biases at zero; perturb every tensor so
    # that a swapped or mis-transposed one cannot go unnoticed.
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return module.eval()


def _nchw(torch, array):
    return torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)


def _torch_output(torch, reference, sample, timesteps, context):
    """A diffusers UNet's output on NHWC numpy/jax inputs, back in NHWC."""
    with torch.no_grad():
        return reference(
            _nchw(torch, sample), torch.from_numpy(np.array(timesteps)),
            torch.from_numpy(np.array(context)),
        ).sample.permute(0, 2, 3, 1).numpy()


def _state(module):
    return {name: tensor.numpy() for name, tensor in module.state_dict().items()}


def _load_and_compare_with_diffusers(options):
    """A randomised diffusers UNet with `options`, loaded into ours; outputs must agree."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = _randomised(torch, diffusers.UNet2DConditionModel(**options))
    state = _state(reference)

    model = _abstract_unet(unet_kwargs_from_diffusers_config(dict(reference.config)))
    assert flat_param_names(model, layout="torch") == {k: v.shape for k, v in state.items()}
    load_torch_state_dict(model, state)

    sample, timesteps, context = _inputs(options)
    expected = _torch_output(torch, reference, sample, timesteps, context)
    out = np.asarray(_apply(model, sample, timesteps, context))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    return model, state


def test_matches_diffusers(tiny_unet):
    model, state = _load_and_compare_with_diffusers(TINY)
    exported = to_torch_state_dict(model)
    assert all(np.array_equal(exported[name], value) for name, value in state.items())


def test_names_match_diffusers_wide():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.UNet2DConditionModel(**WIDE)
    model = _abstract_unet(unet_kwargs_from_diffusers_config(dict(reference.config)))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert flat_param_names(model, layout="torch") == expected


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' own deprecated import
def test_linear_projection_transformer_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    reference = _randomised(torch, diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, num_layers=2,
        cross_attention_dim=12, norm_num_groups=4, use_linear_projection=True,
    ))
    model = _block()
    load_torch_state_dict(model, _state(reference))

    x, context = _block_inputs()
    with torch.no_grad():
        expected = reference(_nchw(torch, x), encoder_hidden_states=torch.from_numpy(
            np.array(context)))
    expected = expected.sample.permute(0, 2, 3, 1).numpy()
    out = np.asarray(_apply_block(model, x, context))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flip_sin_to_cos,freq_shift,dim", [(True, 0, 16), (False, 1, 7)])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos, freq_shift, dim):
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    timesteps = np.array([0, 1, 17, 999])
    expected = embeddings.get_timestep_embedding(
        torch.from_numpy(timesteps), dim, flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=freq_shift,
    ).numpy()
    out = timestep_embedding(jnp.asarray(timesteps), dim, flip_sin_to_cos=flip_sin_to_cos,
                             freq_shift=freq_shift)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-4)


PROJECTED = MINI | dict(class_embed_type="projection", projection_class_embeddings_input_dim=6)


def test_projection_class_embedding_conditions_output():
    model = _fill_params(_abstract_unet(PROJECTED), seed=1)
    sample, timesteps, context = _inputs(PROJECTED, length=3)
    labels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6)), jnp.float32)
    apply = nnx.jit(lambda m, labels: m(sample, timesteps, context, class_labels=labels))
    assert not np.allclose(apply(model, labels), apply(model, labels + 1.0), atol=1e-4)
    with pytest.raises(ValueError, match="pass class_labels"):
        model(sample, timesteps, context)


def test_projection_class_embedding_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = _randomised(torch, diffusers.UNet2DConditionModel(**PROJECTED))
    state = _state(reference)
    model = _abstract_unet(unet_kwargs_from_diffusers_config(dict(reference.config)))
    assert flat_param_names(model, layout="torch") == {k: v.shape for k, v in state.items()}
    load_torch_state_dict(model, state)
    sample, timesteps, context = _inputs(PROJECTED, length=3)
    labels = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
    with torch.no_grad():
        expected = reference(
            _nchw(torch, sample), torch.from_numpy(np.array(timesteps)),
            torch.from_numpy(np.array(context)), class_labels=torch.from_numpy(labels),
        ).sample.permute(0, 2, 3, 1).numpy()
    out = np.asarray(nnx.jit(
        lambda m: m(sample, timesteps, context, class_labels=jnp.asarray(labels)))(model))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_coordinate_grid():
    grid = np.asarray(coordinate_grid(2, 4, 8))
    assert grid.shape == (2, 4, 8, 2)
    # Pixel centres: rows vary along height only, columns along width only, symmetric about 0.
    np.testing.assert_allclose(grid[0, :, 0, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(grid[0, 0, :, 1], (np.arange(8) + 0.5) / 4 - 1)
    assert np.all(grid[:, :, :, 0] == grid[:, :, :1, 0]) and np.all(grid[1] == grid[0])


COORDS = MINI | dict(in_channels=3)


def test_coordinate_channels_match_diffusers_with_two_more_inputs():
    """With coordinate_channels the parameters are exactly those of a diffusers UNet taking
    in_channels + 2 inputs, and the output is that UNet's on (sample, row, column)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = _randomised(torch, diffusers.UNet2DConditionModel(**COORDS | {"in_channels": 5}))
    state = _state(reference)
    model = _abstract_unet(COORDS, coordinate_channels=True)
    assert flat_param_names(model, layout="torch") == {k: v.shape for k, v in state.items()}
    load_torch_state_dict(model, state)
    sample, timesteps, context = _inputs(COORDS)
    with_coords = jnp.concatenate([sample, coordinate_grid(2, 4, 4)], axis=-1)
    expected = _torch_output(torch, reference, with_coords, timesteps, context)
    out = np.asarray(_apply(model, sample, timesteps, context))
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)



def test_space_to_depth_layout_and_inverse():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    folded = np.asarray(space_to_depth(x, 2))
    assert folded.shape == (2, 2, 3, 12)
    # Pixel (2i + a, 2j + b), channel c lands in cell (i, j), channel (2a + b) * C + c.
    for i, j, a, b, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (0, 1, 1, 1, 1)]:
        assert folded[1, i, j, (2 * a + b) * 3 + c] == x[1, 2 * i + a, 2 * j + b, c]
    np.testing.assert_array_equal(depth_to_space(jnp.asarray(folded), 2), x)


PATCHED = COORDS | dict(sample_size=8)


def test_patch_size_is_a_diffusers_unet_on_folded_pixels():
    """patch_size=2: the parameters are those of a diffusers UNet with 4x the input and output
    channels (+ 2 coordinate inputs), run on the 2x2-folded sample at half the resolution,
    its output unfolded back to full resolution."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = _randomised(torch, diffusers.UNet2DConditionModel(
        **PATCHED | {"sample_size": 4, "in_channels": 3 * 4 + 2, "out_channels": 3 * 4}))
    state = _state(reference)
    model = _abstract_unet(PATCHED, coordinate_channels=True, patch_size=2)
    assert flat_param_names(model, layout="torch") == {k: v.shape for k, v in state.items()}
    load_torch_state_dict(model, state)
    sample, timesteps, context = _inputs(PATCHED)
    folded = jnp.concatenate([space_to_depth(sample, 2), coordinate_grid(2, 4, 4)], axis=-1)
    expected = _torch_output(torch, reference, folded, timesteps, context)
    out = np.asarray(_apply(model, sample, timesteps, context))
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(out, np.asarray(depth_to_space(jnp.asarray(expected), 2)),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="patch_size 2"):
        _apply(model, jnp.zeros((1, 6, 5, 3)), 1, jnp.zeros((1, 2, 12)))
    with pytest.raises(ValueError, match="patch_size"):
        _abstract_unet(PATCHED, patch_size=0)


def test_scale_shift_resnets_match_diffusers():
    model, _ = _load_and_compare_with_diffusers(TINY | {"resnet_time_scale_shift": "scale_shift"})
    # scale_shift doubles time_emb_proj's outputs (a scale and a shift per channel).
    assert model.down_blocks[0].resnets[0].time_emb_proj.kernel.shape[-1] == 2 * TINY[
        "block_out_channels"][0]
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        _abstract_unet(TINY | {"resnet_time_scale_shift": "scale"})
