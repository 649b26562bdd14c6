"""Conditional UNet of the Stable Diffusion family, NHWC, in Flax NNX.

Constructor arguments, submodule attribute names and nesting mirror diffusers'
`UNet2DConditionModel` one to one, so a diffusers checkpoint maps onto this module by renaming
leaves and transposing kernels only (`models.hf_weights.load_torch_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from models.logical_axes import EMBED, conv_kw, embed_kw, linear_kw, norm_kw

_DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")
# None: no class embedding, or, with `num_class_embeds`, a lookup table of integer labels.
CLASS_EMBED_TYPES = (None, "projection")
# diffusers' `addition_embed_type` values this module implements: None, or "text" (a pooled
# view of the text states added to the timestep embedding, `TextTimeEmbedding`).
ADDITION_EMBED_TYPES = (None, "text")


def _conv(in_features, out_features, kernel_size, *, stride=1, dtype, param_dtype, rngs):
    # Explicit symmetric padding: "SAME" would pad a strided conv bottom/right only, unlike torch.
    pad = kernel_size // 2
    padding = ((pad, pad), (pad, pad))
    return nnx.Conv(
        in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, conv_general_dilated=_conv_or_dot,
        **conv_kw(),
    )


def _conv_or_dot(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, precision, **kwargs):
    """`lax.conv_general_dilated`, with an unstrided, unpadded 1x1 kernel done as a dot.

    XLA CPU runs a 1x1 convolution's weight gradient as a convolution over transposed
    activations; as a dot it is a plain matrix product (docs/performance.md)."""
    pointwise = (rhs.shape[:-2] == (1, 1) and feature_group_count == 1
                 and set(window_strides) == {1} and set(lhs_dilation) == {1}
                 and all(tuple(pad) == (0, 0) for pad in padding)
                 and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
                 and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1))
    if not pointwise:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    kwargs.pop("out_sharding", None)
    return jax.lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision,
                               **kwargs)


def _linear(in_features, out_features, *, use_bias=True, dtype, param_dtype, rngs):
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, **linear_kw(),
    )


def _group_norm(num_features, num_groups, epsilon, *, dtype, param_dtype, rngs):
    return nnx.GroupNorm(
        num_features, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, **norm_kw(),
    )


def _dropout(rate, rngs):
    # An RNG stream is only stored when dropout is active, so the usual rate-0 model's state
    # holds nothing but parameters.
    return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _call(block, remat: bool, *args):
    if remat:
        return nnx.remat(lambda module, *inner: module(*inner))(block, *args)
    return block(*args)


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] (float32), as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels, time_embed_dim, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = _linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = _linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))


class AttentionPooling(nnx.Module):
    """diffusers' `AttentionPooling` (DeepFloyd IF): one vector per sequence, [B, L, D] -> [B, D].

    The query is the mean token plus a learned positional embedding; it attends over itself and
    every token (no mask: diffusers pools padding tokens too). No output projection.
    """

    def __init__(self, num_heads, embed_dim, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if embed_dim % num_heads:
            # diffusers would fail inside a reshape at the first forward pass instead.
            raise ValueError(
                f"addition_embed_type_num_heads={num_heads} does not divide the text width "
                f"{embed_dim} (cross_attention_dim) that the text pooling attends over"
            )
        self.num_heads = num_heads
        # A [1, D] parameter, not an Embed, because diffusers stores it as a bare tensor
        # `pool.positional_embedding` (no `.weight`); initialised as diffusers does.
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, embed_dim), param_dtype) / embed_dim**0.5,
            out_sharding=(None, EMBED), eager_sharding=False,
        )
        self.k_proj = _linear(embed_dim, embed_dim, **kw)
        self.q_proj = _linear(embed_dim, embed_dim, **kw)
        self.v_proj = _linear(embed_dim, embed_dim, **kw)

    def __call__(self, x):
        batch, _, width = x.shape
        class_token = (jnp.mean(x, axis=1, keepdims=True)
                       + self.positional_embedding[...].astype(x.dtype))
        tokens = jnp.concatenate([class_token, x], axis=1)
        split = lambda t: t.reshape(batch, t.shape[1], self.num_heads, width // self.num_heads)
        # diffusers scales q and k by head_dim**-0.25 each; one head_dim**-0.5 on q is the same
        # product, and the shared attention keeps its float32 softmax.
        pooled = dot_product_attention(
            split(self.q_proj(class_token)), split(self.k_proj(tokens)),
            split(self.v_proj(tokens)))
        return pooled.reshape(batch, width)


class TextTimeEmbedding(nnx.Module):
    """diffusers' `TextTimeEmbedding`: LayerNorm -> attention pooling -> Linear -> LayerNorm,
    text states [B, L, encoder_dim] -> [B, time_embed_dim], added to the timestep embedding."""

    def __init__(self, encoder_dim, time_embed_dim, *, num_heads, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # torch.nn.LayerNorm's default epsilon (Flax's is 1e-6).
        layer_norm = lambda dim: nnx.LayerNorm(dim, epsilon=1e-5, **kw, **norm_kw())
        self.norm1 = layer_norm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim, **kw)
        self.proj = _linear(encoder_dim, time_embed_dim, **kw)
        self.norm2 = layer_norm(time_embed_dim)

    def __call__(self, hidden_states):
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, temb_channels, *, groups, eps, dropout,
                 time_scale_shift="default", dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _group_norm(in_channels, groups, eps, **kw)
        self.conv1 = _conv(in_channels, out_channels, 3, **kw)
        # "default" adds the embedding to the features; "scale_shift" (FiLM, as diffusers'
        # resnet_time_scale_shift) scales and shifts the normalised features with it.
        self.time_scale_shift = time_scale_shift
        proj_channels = 2 * out_channels if time_scale_shift == "scale_shift" else out_channels
        self.time_emb_proj = _linear(temb_channels, proj_channels, **kw)
        self.norm2 = _group_norm(out_channels, groups, eps, **kw)
        self.dropout = _dropout(dropout, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            _conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x, temb):
        hidden = self.conv1(nnx.silu(self.norm1(x)))
        emb = self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        if self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(emb, 2, axis=-1)
            hidden = self.norm2(hidden) * (1.0 + scale) + shift
        else:
            hidden = self.norm2(hidden + emb)
        hidden = self.conv2(self.dropout(nnx.silu(hidden)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + hidden


class Attention(nnx.Module):
    def __init__(self, query_dim, context_dim, heads, dim_head, *, dropout, dtype, param_dtype,
                 rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = _linear(query_dim, inner_dim, use_bias=False, **kw)
        self.to_k = _linear(context_dim, inner_dim, use_bias=False, **kw)
        self.to_v = _linear(context_dim, inner_dim, use_bias=False, **kw)
        # Index 1 is diffusers' Dropout, kept so the output projection is `to_out.0`.
        self.to_out = nnx.List([_linear(inner_dim, query_dim, **kw), _dropout(dropout, rngs)])
        # One of ATTENTION_IMPLEMENTATIONS; the UNet sets its own choice on every attention.
        self.implementation = "auto"

    def __call__(self, x, context=None):
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)
        out = dot_product_attention(
            split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
            implementation=self.implementation,
        )
        out = self.to_out[0](out.reshape(*out.shape[:-2], self.heads * self.dim_head))
        return self.to_out[1](out)


# "auto": the heads-major formulation below on CPU; cuDNN's fused flash attention on an NVIDIA
# GPU for bf16 / fp16 inputs it accepts, XLA's attention for any other; XLA's elsewhere (TPU).
# "xla": jax.nn.dot_product_attention's XLA implementation. "cudnn": cuDNN's, an error where
# it does not apply. "heads_major": the CPU formulation on any backend.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "heads_major")
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)
# What jax raises, at trace time, for inputs or a setup cuDNN's fused kernel does not take.
_CUDNN_REFUSALS = (NotImplementedError, ValueError, RuntimeError)


def dot_product_attention(query, key, value, implementation: str = "auto"):
    """softmax(q k^T / sqrt(d)) v over [batch, tokens, heads, head_dim], logits in float32.

    `implementation` is one of ATTENTION_IMPLEMENTATIONS. Same values whichever runs (float
    rounding apart); "auto" picks by backend and dtype at trace time.
    """
    if implementation == "auto":
        backend = jax.default_backend()
        if backend == "cpu":
            implementation = "heads_major"
        elif backend == "gpu" and query.dtype in _HALF_DTYPES:
            try:
                return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
            except _CUDNN_REFUSALS as error:  # a head width, length or cuDNN version
                _note_attention_fallback(query.shape, error)
            implementation = "xla"
        else:
            implementation = "xla"
    if implementation == "heads_major":
        heads_major = lambda t: t.transpose(0, 2, 1, 3)
        out = _heads_major_attention(heads_major(query), heads_major(key), heads_major(value))
        return heads_major(out)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
        except _CUDNN_REFUSALS as error:
            raise ValueError(
                f"attention='cudnn' does not apply to queries of shape {query.shape} "
                f"({query.dtype}) on {jax.default_backend()}: {error}") from None
    if implementation != "xla":
        raise ValueError(
            f"attention={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    # XLA's attention computes the logits and the softmax in float32 even for bf16 inputs.
    return jax.nn.dot_product_attention(query, key, value, implementation="xla")


_FALLBACKS_NOTED: set = set()


def _note_attention_fallback(shape, error) -> None:
    key = (tuple(shape), str(error))
    if key not in _FALLBACKS_NOTED:
        _FALLBACKS_NOTED.add(key)
        logging.info("attention on queries %s: cuDNN's fused kernel does not apply (%s); "
                     "XLA's attention instead", tuple(shape), error)


# XLA CPU differentiates `jax.nn.dot_product_attention` into about a dozen passes over the
# [batch, heads, tokens, tokens] logits (broadcasts, copies, a recomputed softmax) and contracts
# them in a tokens-major layout; at 16x16 resolution that made the attention backward a sixth
# of the peer-size UNet's step. Keeping the probabilities from the forward pass and writing the
# gradient out (dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O))) takes 3.7x less time on
# this block (docs/performance.md).
@jax.custom_vjp
def _heads_major_attention(query, key, value):
    return _heads_major_attention_fwd(query, key, value)[0]


def _heads_major_attention_fwd(query, key, value):
    # The scale goes on the [tokens, head_dim] query, not on the [tokens, tokens] logits: XLA
    # CPU materialises a scalar multiplying a dot's output as a full-size broadcast.
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bnth,bnsh->bnts", query * scale, key,
                        preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = weights * (1.0 / jnp.sum(weights, axis=-1, keepdims=True))
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(value.dtype), value)
    return out, (query, key, value, probs, out)


def _heads_major_attention_bwd(residuals, d_out):
    query, key, value, probs, out = residuals
    scale = query.shape[-1] ** -0.5
    # dV and dK contract over the query tokens; written as [head_dim, tokens] products whose
    # [tokens, tokens] operand is read row-major, they run 2x faster on XLA CPU than as
    # "bnts,bnth->bnsh" (a transposed read of the big operand).
    d_value = jnp.einsum("bnth,bnts->bnhs", d_out, probs.astype(d_out.dtype)).swapaxes(2, 3)
    d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, value, preferred_element_type=jnp.float32)
    # Softmax backward: sum_s P dP equals sum_h dO O (one pass over [tokens, head_dim]).
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                      keepdims=True)
    d_logits = (probs * (d_probs - row_dot)).astype(query.dtype)
    d_query = jnp.einsum("bnts,bnsh->bnth", d_logits, key) * scale
    d_key = jnp.einsum("bnth,bnts->bnhs", query * scale, d_logits).swapaxes(2, 3)
    return d_query, d_key, d_value


_heads_major_attention.defvjp(_heads_major_attention_fwd, _heads_major_attention_bwd)


class GEGLU(nnx.Module):
    def __init__(self, dim_in, dim_out, *, dtype, param_dtype, rngs):
        self.proj = _linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    def __init__(self, dim, *, mult=4, dropout, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim = dim * mult
        self.net = nnx.List([
            GEGLU(dim, inner_dim, **kw), _dropout(dropout, rngs), _linear(inner_dim, dim, **kw)
        ])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim, heads, dim_head, *, cross_attention_dim, only_cross_attention,
                 dropout, norm_eps, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.only_cross_attention = only_cross_attention
        layer_norm = lambda: nnx.LayerNorm(dim, epsilon=norm_eps, **kw, **norm_kw())
        self.norm1 = layer_norm()
        self.attn1 = Attention(
            dim, cross_attention_dim if only_cross_attention else dim, heads, dim_head,
            dropout=dropout, **kw,
        )
        self.norm2 = layer_norm()
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, dropout=dropout, **kw)
        self.norm3 = layer_norm()
        self.ff = FeedForward(dim, dropout=dropout, **kw)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    def __init__(self, heads, dim_head, in_channels, *, num_layers, cross_attention_dim,
                 norm_num_groups, use_linear_projection, only_cross_attention, dropout, norm_eps,
                 remat, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim = heads * dim_head
        self.remat = remat
        # diffusers hard-codes eps=1e-6 here, independent of `norm_eps`.
        self.norm = _group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        # On NHWC a 1x1 conv and a Linear are the same map; the choice only fixes the
        # checkpoint's parameter shapes.
        project = (lambda i, o: _linear(i, o, **kw)) if use_linear_projection else (
            lambda i, o: _conv(i, o, 1, **kw))
        self.proj_in = project(in_channels, inner_dim)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(
                inner_dim, heads, dim_head, cross_attention_dim=cross_attention_dim,
                only_cross_attention=only_cross_attention, dropout=dropout, norm_eps=norm_eps,
                **kw,
            )
            for _ in range(num_layers)
        ])
        self.proj_out = project(inner_dim, in_channels)

    def __call__(self, x, context):
        batch, height, width, _ = x.shape
        hidden = self.proj_in(self.norm(x))
        hidden = hidden.reshape(batch, height * width, hidden.shape[-1])
        for block in self.transformer_blocks:
            hidden = _call(block, self.remat, hidden, context)
        hidden = hidden.reshape(batch, height, width, hidden.shape[-1])
        return self.proj_out(hidden) + x


class Downsample2D(nnx.Module):
    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = _conv(channels, channels, 3, stride=2, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        batch, height, width, channels = x.shape
        # Nearest-neighbour 2x as a broadcast: cheaper than a gather-based resize.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        return self.conv(x.reshape(batch, 2 * height, 2 * width, channels))


class DownBlock2D(nnx.Module):
    """diffusers `DownBlock2D`, or `CrossAttnDownBlock2D` when `transformer` kwargs are given."""

    def __init__(self, in_channels, out_channels, temb_channels, *, num_layers, add_downsample,
                 resnet_kw, transformer, remat, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = remat
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          **resnet_kw, **kw)
            for i in range(num_layers)
        ])
        self.attentions = None if transformer is None else nnx.List([
            Transformer2DModel(in_channels=out_channels, num_layers=layers, remat=remat,
                               **transformer["kw"], **kw)
            for layers in transformer["layers"]
        ])
        self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)]) if add_downsample else None

    def __call__(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _call(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels, temb_channels, *, num_layers, resnet_kw, transformer, remat,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = remat
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels, **resnet_kw, **kw)
            for _ in range(num_layers + 1)
        ])
        self.attentions = nnx.List([
            Transformer2DModel(in_channels=channels, num_layers=layers, remat=remat,
                               **transformer["kw"], **kw)
            for layers in transformer["layers"]
        ])

    def __call__(self, x, temb, context):
        x = _call(self.resnets[0], self.remat, x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = _call(resnet, self.remat, attention(x, context), temb)
        return x


class UpBlock2D(nnx.Module):
    """diffusers `UpBlock2D`, or `CrossAttnUpBlock2D` when `transformer` kwargs are given."""

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, *,
                 num_layers, add_upsample, resnet_kw, transformer, remat, dtype, param_dtype,
                 rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = remat
        resnets = []
        for i in range(num_layers):
            # The last resnet of an up block consumes the skip from the level above (the block's
            # input width); the others consume skips of this level's width.
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels,
                                         **resnet_kw, **kw))
        self.resnets = nnx.List(resnets)
        self.attentions = None if transformer is None else nnx.List([
            Transformer2DModel(in_channels=out_channels, num_layers=layers, remat=remat,
                               **transformer["kw"], **kw)
            for layers in transformer["layers"]
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _call(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _per_block(value, num_blocks: int, name: str) -> tuple:
    if isinstance(value, (int, float, bool)) or value is None:
        return (value,) * num_blocks
    value = tuple(value)
    if len(value) != num_blocks:
        raise ValueError(
            f"{name} has {len(value)} entries but there are {num_blocks} down blocks: {value}"
        )
    return value


class UNet2DConditionModel(nnx.Module):
    """Text-conditioned UNet: `(sample [B,H,W,C], timesteps [B], context [B,L,D]) -> [B,H,W,C]`.

    Arguments carry diffusers' names and meanings; in particular `attention_head_dim` is the
    number of heads per block when `num_attention_heads` is None (diffusers' historical naming).
    `dtype` is the compute dtype, `param_dtype` the storage dtype; `remat` recomputes each
    resnet and transformer block in the backward pass instead of storing its activations;
    `attention` is one of ATTENTION_IMPLEMENTATIONS (which kernel computes the attention: the
    parameters and values are the same).
    """

    def __init__(
        self,
        *,
        sample_size: int | Sequence[int] | None = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0,
        down_block_types: Sequence[str] = (
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int | Sequence[int] = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 128,
        transformer_layers_per_block: int | Sequence[int] = 1,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        addition_embed_type: str | None = None,
        addition_embed_type_num_heads: int | None = 64,
        resnet_time_scale_shift: str = "default",
        coordinate_channels: bool = False,
        patch_size: int = 1,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention={attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        num_blocks = len(block_out_channels)
        down_block_types, up_block_types = tuple(down_block_types), tuple(up_block_types)
        if len(down_block_types) != num_blocks or len(up_block_types) != num_blocks:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels need one entry per "
                f"level; got {down_block_types}, {up_block_types}, {tuple(block_out_channels)}"
            )
        for kind in down_block_types:
            if kind not in _DOWN_BLOCK_TYPES:
                raise ValueError(f"down_block_types: {kind!r} is not one of {_DOWN_BLOCK_TYPES}")
        for kind in up_block_types:
            if kind not in _UP_BLOCK_TYPES:
                raise ValueError(f"up_block_types: {kind!r} is not one of {_UP_BLOCK_TYPES}")
        if mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(
                f"mid_block_type: only 'UNetMidBlock2DCrossAttn', got {mid_block_type!r}"
            )
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn: only 'silu' is supported, got {act_fn!r}")
        if not isinstance(cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim: one int expected, got {cross_attention_dim!r}")
        # `upcast_attention` needs no switch: attention logits are always computed in float32.
        del upcast_attention

        # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the count.
        heads = _per_block(
            num_attention_heads if num_attention_heads is not None else attention_head_dim,
            num_blocks, "attention_head_dim",
        )
        layers = _per_block(layers_per_block, num_blocks, "layers_per_block")
        transformer_layers = _per_block(
            transformer_layers_per_block, num_blocks, "transformer_layers_per_block")
        only_cross = _per_block(only_cross_attention, num_blocks, "only_cross_attention")
        if not all(isinstance(count, int) for count in (*heads, *layers, *transformer_layers)):
            raise ValueError(
                "attention_head_dim / num_attention_heads, layers_per_block and "
                "transformer_layers_per_block take an int or one int per block"
            )
        for level, (channels, count) in enumerate(zip(block_out_channels, heads, strict=True)):
            if channels % norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{level}]={channels} is not divisible by "
                    f"norm_num_groups={norm_num_groups}"
                )
            has_attention = level == num_blocks - 1 or "CrossAttn" in (
                down_block_types[level] + up_block_types[num_blocks - 1 - level])
            if has_attention and channels < count:
                raise ValueError(
                    f"block {level}: {count} attention heads for only {channels} channels"
                )

        self.sample_size = sample_size
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.dtype = dtype
        self.num_upsamplers = num_blocks - 1

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if resnet_time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
            raise ValueError(
                f"resnet_time_scale_shift: {resnet_time_scale_shift!r} is not one of "
                f"{RESNET_TIME_SCALE_SHIFTS}"
            )
        resnet_kw = dict(groups=norm_num_groups, eps=norm_eps, dropout=dropout,
                         time_scale_shift=resnet_time_scale_shift)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj_dim = block_out_channels[0]

        def transformer(level: int, channels: int, count: int, only_cross_attention=None):
            if only_cross_attention is None:
                only_cross_attention = only_cross[level]
            return {
                "layers": (transformer_layers[level],) * count,
                "kw": dict(
                    heads=heads[level], dim_head=channels // heads[level],
                    cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention, dropout=dropout, norm_eps=norm_eps,
                ),
            }

        # Optional (not a diffusers option): two extra input channels holding each pixel's row
        # and column in [-1, 1]. Convolutions alone only learn absolute position slowly, from
        # the zero padding; a prompt that says "top left" needs it from the first step. The
        # parameters stay a diffusers set: those of a UNet with in_channels + 2.
        self.coordinate_channels = coordinate_channels
        # Optional (not a diffusers option): `patch_size` p > 1 folds each p x p pixel patch into
        # channels before conv_in (space-to-depth) and unfolds the output after conv_out, so the
        # whole network runs at 1/p the resolution: the pixel-space counterpart of working in a
        # VAE latent, p**2 times fewer activations per level. Parameters stay a diffusers set:
        # those of a UNet with in_channels * p**2 (+ 2) inputs and out_channels * p**2 outputs.
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size: a positive int expected, got {patch_size!r}")
        self.patch_size = patch_size
        self.conv_in = _conv(in_channels * patch_size**2 + 2 * coordinate_channels,
                             block_out_channels[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, **kw)
        # diffusers' "projection" class embedding: a vector per example (here the pooled text
        # embedding) mapped into the timestep embedding, so every resnet sees the whole prompt.
        if class_embed_type == "projection":
            if not projection_class_embeddings_input_dim:
                raise ValueError(
                    "class_embed_type='projection' needs projection_class_embeddings_input_dim"
                )
            self.class_embedding = TimestepEmbedding(
                projection_class_embeddings_input_dim, time_embed_dim, **kw
            )
        elif class_embed_type is None and num_class_embeds is not None:
            # diffusers' `nn.Embedding` class embedding: one learned vector per integer label.
            # The x4 upscaler feeds its low-resolution noise level through it (0..max level).
            if isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or (
                    num_class_embeds < 1):
                raise ValueError(
                    f"num_class_embeds: a positive int expected, got {num_class_embeds!r}")
            self.class_embedding = nnx.Embed(num_class_embeds, time_embed_dim, **kw,
                                             **embed_kw())
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(
                f"class_embed_type: {class_embed_type!r} is not one of {CLASS_EMBED_TYPES}"
            )

        # diffusers' addition embedding "text" (DeepFloyd IF's super-resolution stages): a pooled
        # view of the text states next to the class embedding, which an upscaler spends on its
        # noise level. diffusers reads `encoder_hid_dim` first; that option is refused, so the
        # pooling reads the cross-attention width.
        if addition_embed_type == "text":
            if isinstance(addition_embed_type_num_heads, bool) or not isinstance(
                    addition_embed_type_num_heads, int) or addition_embed_type_num_heads < 1:
                raise ValueError(
                    "addition_embed_type_num_heads: a positive int expected, got "
                    f"{addition_embed_type_num_heads!r}")
            self.add_embedding = TextTimeEmbedding(
                cross_attention_dim, time_embed_dim, num_heads=addition_embed_type_num_heads,
                **kw)
        elif addition_embed_type is None:
            self.add_embedding = None
        else:
            raise ValueError(
                f"addition_embed_type: {addition_embed_type!r} is not one of "
                f"{ADDITION_EMBED_TYPES}"
            )

        down_blocks = []
        output_channel = block_out_channels[0]
        for level, kind in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[level]
            down_blocks.append(DownBlock2D(
                input_channel, output_channel, time_embed_dim, num_layers=layers[level],
                add_downsample=level < num_blocks - 1, resnet_kw=resnet_kw,
                transformer=(transformer(level, output_channel, layers[level])
                             if kind == "CrossAttnDownBlock2D" else None),
                remat=remat, **kw,
            ))
        self.down_blocks = nnx.List(down_blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(
            block_out_channels[-1], time_embed_dim, num_layers=1,
            resnet_kw=resnet_kw,
            # diffusers' UNetMidBlock2DCrossAttn never takes only_cross_attention.
            transformer=transformer(num_blocks - 1, block_out_channels[-1], 1,
                                    only_cross_attention=False),
            remat=remat, **kw,
        )

        up_blocks = []
        reversed_channels = tuple(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, kind in enumerate(up_block_types):
            level = num_blocks - 1 - i
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, num_blocks - 1)]
            up_blocks.append(UpBlock2D(
                input_channel, prev_output_channel, output_channel, time_embed_dim,
                num_layers=layers[level] + 1, add_upsample=i < num_blocks - 1,
                resnet_kw=resnet_kw,
                transformer=(transformer(level, output_channel, layers[level] + 1)
                             if kind == "CrossAttnUpBlock2D" else None),
                remat=remat, **kw,
            ))
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = _group_norm(block_out_channels[0], norm_num_groups, norm_eps, **kw)
        self.conv_out = _conv(block_out_channels[0], out_channels * patch_size**2, 3, **kw)
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Attention):
                module.implementation = attention

    def __call__(self, sample, timesteps, encoder_hidden_states, class_labels=None):
        batch, height, width, _ = sample.shape
        patch = self.patch_size
        factor = 2**self.num_upsamplers * patch
        if height % factor or width % factor:
            raise ValueError(
                f"sample height and width must be multiples of {factor} (2 ** number of "
                f"downsamplers x patch_size {patch}), got {height}x{width}"
            )
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)

        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = timestep_embedding(timesteps, self.time_proj_dim,
                                   flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        temb = self.time_embedding(t_emb.astype(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding: pass class_labels")
            temb = temb + self._class_embed(class_labels, batch)
        if self.add_embedding is not None:
            temb = temb + self.add_embedding(context)

        if patch > 1:
            sample = space_to_depth(sample, patch)
        if self.coordinate_channels:
            sample = jnp.concatenate(
                [sample, coordinate_grid(batch, height // patch, width // patch, self.dtype)],
                axis=-1)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        x = self.conv_out(nnx.silu(self.conv_norm_out(x)))
        if patch > 1:
            x = depth_to_space(x, patch)
        return x.astype(jnp.float32)

    def _class_embed(self, class_labels, batch: int) -> jax.Array:
        class_labels = jnp.asarray(class_labels)
        if not isinstance(self.class_embedding, nnx.Embed):
            return self.class_embedding(class_labels.astype(self.dtype))
        num_labels = self.class_embedding.num_embeddings
        # Casting a float to an index would silently floor it (diffusers' torch.nn.Embedding
        # refuses floats too): a noise level given as a fraction must fail, not become 0.
        if not jnp.issubdtype(class_labels.dtype, jnp.integer):
            raise ValueError(
                f"class_labels: this UNet's class embedding is a table of {num_labels} rows "
                f"(num_class_embeds), indexed by integer labels such as the upscaler's noise "
                f"level; got dtype {class_labels.dtype}"
            )
        if class_labels.size not in (1, batch):
            raise ValueError(
                f"class_labels: one label or one per example ({batch}) expected, got shape "
                f"{class_labels.shape}"
            )
        if not isinstance(class_labels, jax.core.Tracer):
            low, high = int(class_labels.min()), int(class_labels.max())
            if low < 0 or high >= num_labels:
                raise ValueError(
                    f"class_labels: values must lie in [0, {num_labels}) (num_class_embeds), "
                    f"got {low}..{high}"
                )
        labels = jnp.broadcast_to(class_labels.reshape(-1), (batch,))
        return self.class_embedding(labels)


def space_to_depth(x: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch's pixels become channels."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: jax.Array, patch: int) -> jax.Array:
    """The inverse of `space_to_depth`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, patch, patch, c // (patch * patch))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * patch, w * patch, c // (patch * patch))


def coordinate_grid(batch: int, height: int, width: int, dtype=jnp.float32) -> jax.Array:
    """[batch, height, width, 2]: each pixel's (row, column) centre, scaled to [-1, 1]."""
    rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1).astype(dtype)
    return jnp.broadcast_to(grid[None], (batch, height, width, 2))


# diffusers UNet2DConditionModel options we do not model, with the value that switches them off.
_INERT_DIFFUSERS_OPTIONS = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "addition_time_embed_dim": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": None,
}

# Constructor options whose other diffusers values this module does not implement: refused
# here, by name, with the rest of a checkpoint's unsupported options.
_IMPLEMENTED_VALUES = {"addition_embed_type": ADDITION_EMBED_TYPES}

_OWN_KWARGS = ("coordinate_channels", "patch_size", "dtype", "param_dtype", "remat", "attention",
               "rngs")


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from a diffusers `unet/config.json` dict.

    Drops bookkeeping keys (`_class_name`, ...) and options left at their "off" value; raises
    on an option this module does not implement, so an unsupported checkpoint fails loudly.
    """
    import inspect

    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    accepted -= set(_OWN_KWARGS)
    kwargs, unsupported = {}, []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in accepted:
            if value not in _IMPLEMENTED_VALUES.get(key, (value,)):
                unsupported.append(f"{key}={value!r}")
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
            continue
        inert = _INERT_DIFFUSERS_OPTIONS.get(key, "unknown")
        if inert == "unknown" or value not in (inert if isinstance(inert, tuple) else (inert,)):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(f"unsupported diffusers UNet options: {', '.join(unsupported)}")
    if kwargs.get("addition_embed_type") is None:
        # Every diffusers config lists these; without the text path they mean nothing, and a
        # checkpoint's config.model.unet stays as short as before the option existed.
        kwargs.pop("addition_embed_type", None)
        kwargs.pop("addition_embed_type_num_heads", None)
    return kwargs
