"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`), NHWC, in Flax NNX.

Submodule attribute names and nesting mirror diffusers' PyTorch `AutoencoderKL` one to one, so
`vae/diffusion_pytorch_model.safetensors` maps onto this module by renaming leaves and
transposing kernels only (`models.hf_weights.load_torch_state_dict`).

Latent diffusion uses it frozen: images in [-1, 1] -> `encode_to_latents` -> the UNet's space,
and `decode_from_latents` back to images.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.hf_weights import load_torch_state_dict, read_safetensors
from models.logical_axes import conv_kw, linear_kw, norm_kw
from models.unet import Upsample2D  # same layer and parameter names in diffusers' VAE

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu", "swish")  # the same function under two names in diffusers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Read in this order; hub repositories often carry the half-precision variant only.
WEIGHT_FILES = (WEIGHTS_FILE, "diffusion_pytorch_model.fp16.safetensors")

# diffusers hard-codes this epsilon for every norm of the VAE.
_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)


def _conv(in_features, out_features, kernel_size, *, stride=1, padding=None, dtype, param_dtype,
          rngs):
    if padding is None:
        pad = kernel_size // 2
        padding = ((pad, pad), (pad, pad))
    return nnx.Conv(
        in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, **conv_kw(),
    )


def _group_norm(num_features, num_groups, *, dtype, param_dtype, rngs):
    return nnx.GroupNorm(
        num_features, num_groups=num_groups, epsilon=_EPS, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, **norm_kw(),
    )


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding (temb_channels=None)."""

    def __init__(self, in_channels, out_channels, *, groups, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _group_norm(in_channels, groups, **kw)
        self.conv1 = _conv(in_channels, out_channels, 3, **kw)
        self.norm2 = _group_norm(out_channels, groups, **kw)
        self.conv2 = _conv(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            _conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x):
        hidden = self.conv1(nnx.silu(self.norm1(x)))
        hidden = self.conv2(nnx.silu(self.norm2(hidden)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + hidden


class Attention(nnx.Module):
    """The VAE's single-head spatial self-attention with its own group norm and a residual."""

    def __init__(self, channels, *, groups, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        linear = lambda: nnx.Linear(channels, channels, **kw, **linear_kw())
        self.group_norm = _group_norm(channels, groups, **kw)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        # A list so the projection is `to_out.0`, as in diffusers (index 1 there is a Dropout).
        self.to_out = nnx.List([linear()])

    def __call__(self, x):
        batch, height, width, channels = x.shape
        hidden = self.group_norm(x).reshape(batch, height * width, 1, channels)
        # XLA's attention computes the logits and the softmax in float32 even for bf16 inputs,
        # as diffusers' upcast_softmax=True does here.
        out = jax.nn.dot_product_attention(self.to_q(hidden), self.to_k(hidden),
                                           self.to_v(hidden))
        out = self.to_out[0](out.reshape(batch, height, width, channels))
        return out + x


class Downsample2D(nnx.Module):
    def __init__(self, channels, *, dtype, param_dtype, rngs):
        # diffusers' VAE pads right and bottom only (0, 1, 0, 1), then convolves unpadded.
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, *, num_layers, add_downsample, groups, dtype,
                 param_dtype, rngs):
        kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw)
            for i in range(num_layers)
        ])
        self.downsamplers = nnx.List([
            Downsample2D(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ]) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers or ():
            x = downsampler(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, *, num_layers, add_upsample, groups, dtype,
                 param_dtype, rngs):
        kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([
            Upsample2D(out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers or ():
            x = upsampler(x)
        return x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, channels, *, add_attention, groups, dtype, param_dtype, rngs):
        kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, **kw)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, in_channels, latent_channels, *, block_out_channels, layers_per_block,
                 groups, mid_block_add_attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = _conv(in_channels, block_out_channels[0], 3, **kw)
        down_blocks, output_channel = [], block_out_channels[0]
        for level, channels in enumerate(block_out_channels):
            input_channel, output_channel = output_channel, channels
            down_blocks.append(DownEncoderBlock2D(
                input_channel, output_channel, num_layers=layers_per_block,
                add_downsample=level < len(block_out_channels) - 1, groups=groups, **kw,
            ))
        self.down_blocks = nnx.List(down_blocks)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups=groups,
                                        add_attention=mid_block_add_attention, **kw)
        self.conv_norm_out = _group_norm(block_out_channels[-1], groups, **kw)
        # Mean and log-variance side by side.
        self.conv_out = _conv(block_out_channels[-1], 2 * latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, latent_channels, out_channels, *, block_out_channels, layers_per_block,
                 groups, mid_block_add_attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        reversed_channels = tuple(reversed(block_out_channels))
        self.conv_in = _conv(latent_channels, reversed_channels[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups=groups,
                                        add_attention=mid_block_add_attention, **kw)
        up_blocks, output_channel = [], reversed_channels[0]
        for i, channels in enumerate(reversed_channels):
            input_channel, output_channel = output_channel, channels
            up_blocks.append(UpDecoderBlock2D(
                input_channel, output_channel, num_layers=layers_per_block + 1,
                add_upsample=i < len(reversed_channels) - 1, groups=groups, **kw,
            ))
        self.up_blocks = nnx.List(up_blocks)
        self.conv_norm_out = _group_norm(block_out_channels[0], groups, **kw)
        self.conv_out = _conv(block_out_channels[0], out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


def _check_options(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for value in values:
        if value not in allowed:
            raise ValueError(f"{name}: {value!r} is not one of {tuple(allowed)}")


class AutoencoderKL(nnx.Module):
    """diffusers' AutoencoderKL: `encode` images -> (mean, logvar), `decode` latents -> images.

    Both take and return NHWC float32 (computing in `dtype`); images are in [-1, 1].
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        block_out_channels = tuple(block_out_channels)
        num_blocks = len(block_out_channels)
        if len(down_block_types) != num_blocks or len(up_block_types) != num_blocks:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels need one entry per "
                f"level; got {tuple(down_block_types)}, {tuple(up_block_types)}, "
                f"{block_out_channels}"
            )
        _check_options("down_block_types", down_block_types, DOWN_BLOCK_TYPES)
        _check_options("up_block_types", up_block_types, UP_BLOCK_TYPES)
        _check_options("act_fn", (act_fn,), ACT_FNS)
        for level, channels in enumerate(block_out_channels):
            if channels % norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{level}]={channels} is not divisible by "
                    f"norm_num_groups={norm_num_groups}"
                )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shared = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                      groups=norm_num_groups, mid_block_add_attention=mid_block_add_attention)
        self.dtype = dtype
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (num_blocks - 1)
        self.encoder = Encoder(in_channels, latent_channels, **shared, **kw)
        self.decoder = Decoder(latent_channels, out_channels, **shared, **kw)
        self.quant_conv = (
            _conv(2 * latent_channels, 2 * latent_channels, 1, **kw) if use_quant_conv else None)
        self.post_quant_conv = (
            _conv(latent_channels, latent_channels, 1, **kw) if use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] in [-1, 1] -> posterior (mean, logvar), each [B, H/f, W/f, latent]
        with f = `downsample_factor`; logvar clamped as diffusers does."""
        _, height, width, _ = x.shape
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"image height and width must be multiples of the VAE's downsample factor "
                f"{factor}, got {height}x{width}"
            )
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, latent] (unscaled) -> images [B, h*f, w*f, C], about [-1, 1]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw z ~ N(mean, exp(logvar))."""
    noise = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def encode_to_latents(vae: AutoencoderKL, images: jax.Array, rng: jax.Array,
                      scaling_factor: float, shift_factor: float | None = None) -> jax.Array:
    """Images in [-1, 1] -> the diffusion model's latents, (z - shift) * scale."""
    z = sample_posterior(*vae.encode(images), rng)
    return (z - (shift_factor or 0.0)) * scaling_factor


def decode_from_latents(vae: AutoencoderKL, latents: jax.Array, scaling_factor: float,
                        shift_factor: float | None = None) -> jax.Array:
    """The inverse of `encode_to_latents`'s scaling, then the decoder: images about [-1, 1]."""
    return vae.decode(latents / scaling_factor + (shift_factor or 0.0))


# AutoencoderKL config keys that are not architecture: read by load_vae or ignored here.
_NOT_ARCHITECTURE = ("sample_size", "scaling_factor", "shift_factor", "force_upcast")
# Options we do not model, with the value(s) that switch them off.
_INERT_DIFFUSERS_OPTIONS = {"latents_mean": None, "latents_std": None}
_OWN_KWARGS = ("dtype", "param_dtype", "rngs")


def vae_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from a diffusers `vae/config.json` dict.

    Drops bookkeeping keys (`_class_name`, ...), the latent scaling (see `latent_scaling`) and
    tiling / precision hints; raises naming any option this module does not implement.
    """
    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    accepted -= set(_OWN_KWARGS)
    kwargs, unsupported = {}, []
    for key, value in config.items():
        if key.startswith("_") or key in _NOT_ARCHITECTURE:
            continue
        if key in accepted:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key not in _INERT_DIFFUSERS_OPTIONS or value != _INERT_DIFFUSERS_OPTIONS[key]:
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(f"unsupported diffusers VAE options: {', '.join(unsupported)}")
    return kwargs


def latent_scaling(config: Mapping[str, Any]) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers VAE config; shift 0.0 when it has none."""
    scaling = config.get("scaling_factor", 0.18215)  # diffusers' default
    return float(scaling), float(config.get("shift_factor") or 0.0)


def load_vae(directory: str | Path, *, dtype: Any = jnp.float32
             ) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The VAE of a diffusers `vae/` directory (config.json + diffusion_pytorch_model.safetensors,
    or its .fp16 variant) and its latent facts: {"scaling_factor", "shift_factor" (0.0 when absent),
    "latent_channels", "downsample_factor"}. Parameters stay float32; `dtype` is the compute dtype.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"VAE config not found: {config_path}")
    weights_path = next((directory / name for name in WEIGHT_FILES
                         if (directory / name).is_file()), None)
    if weights_path is None:
        others = sorted(p.name for p in directory.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(others)}; only safetensors are read)" if others else ""
        raise FileNotFoundError(
            f"VAE weights not found in {directory}: expected {' or '.join(WEIGHT_FILES)}{hint}")
    config = json.loads(config_path.read_text())
    try:
        kwargs = vae_kwargs_from_diffusers_config(config)
        vae = nnx.eval_shape(lambda: AutoencoderKL(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
        load_torch_state_dict(vae, read_safetensors(weights_path))
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from error
    scaling_factor, shift_factor = latent_scaling(config)
    return vae, {
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "latent_channels": vae.latent_channels,
        "downsample_factor": vae.downsample_factor,
    }
