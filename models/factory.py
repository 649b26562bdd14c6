"""Build the networks named by a config; shared by training, sampling and the demo."""

from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.text_encoder import build_text_encoder, pooled_output
from models.unet import UNet2DConditionModel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config: ml_collections.ConfigDict):
    return _DTYPES[model_config.dtype]


def build_unet(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs, *,
               remat: bool | None = None) -> UNet2DConditionModel:
    """The configured UNet; `remat` (when not None) overrides `model.unet.remat`."""
    kwargs = dict(model_config.unet)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if remat is not None:
        kwargs["remat"] = remat
    return UNet2DConditionModel(**kwargs, dtype=compute_dtype(model_config),
                                attention=model_config.get("attention", "auto"), rngs=rngs)


def abstract_unet(model_config: ml_collections.ConfigDict, *, remat: bool | None = None):
    """(graphdef, abstract params) without allocating any parameter.

    Samplers pass remat=False: recomputation only matters for a backward pass, and nnx.remat
    inside the solver's loop fails to trace (TraceContextError). The parameters are the same.
    """
    module = nnx.eval_shape(lambda: build_unet(model_config, nnx.Rngs(0), remat=remat))
    return nnx.split(module)


def lora_options(model_config: ml_collections.ConfigDict) -> dict | None:
    """`models.lora` keyword arguments of `model.lora` when it trains adapters (rank > 0)."""
    lora = model_config.get("lora")
    if lora is None or not lora.rank:
        return None
    return {"rank": int(lora.rank), "alpha": float(lora.alpha), "targets": tuple(lora.targets)}


def abstract_trainable_unet(model_config: ml_collections.ConfigDict, *,
                            remat: bool | None = None):
    """(graphdef, abstract trainable params, abstract frozen base | None), allocating nothing:
    the whole UNet and None, or with `model.lora.rank` > 0 the adapters and the frozen UNet
    (whose tree is the plain UNet's, so the pretrained loader fills it as it is). Training,
    the loop's resume check, the sampler and the exporter share it."""
    from models.lora import abstract_lora_model

    options = lora_options(model_config)
    if options is None:
        graphdef, params = abstract_unet(model_config, remat=remat)
        return graphdef, params, None
    graphdef, base, adapters = abstract_lora_model(
        lambda: build_unet(model_config, nnx.Rngs(0), remat=remat), **options)
    return graphdef, adapters, base


def build_frozen_text_encoder(model_config: ml_collections.ConfigDict, workdir: str | None = None):
    """(tokenizer, graphdef, params) of the frozen text encoder (`workdir` holds the demo's
    trained BPE tokenizer when it uses one). It computes in `model.dtype`, as the UNet; its
    parameters stay float32."""
    tokenizer, encoder = build_text_encoder(model_config.text_encoder, workdir=workdir,
                                            dtype=compute_dtype(model_config))
    graphdef, params = nnx.split(encoder)
    return tokenizer, graphdef, params


def encode_prompts(text_graphdef, text_params, input_ids, *, pooling: str, pad_token_id: int,
                   eos_token_id: int) -> dict:
    """Frozen-encoder conditioning: per-token states for cross-attention and one pooled vector
    per prompt (fed to the UNet's class embedding when it has one)."""
    encoder = nnx.merge(text_graphdef, text_params)
    hidden = encoder(input_ids)
    if pooling == "eos":
        pooled = pooled_output(hidden, input_ids, eos_token_id)
    else:
        # Mean over real tokens: with a randomly initialised demo encoder this keeps every
        # word's contribution, where the end token alone carries little of the prompt.
        mask = (input_ids != pad_token_id).astype(hidden.dtype)[..., None]
        pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return {"hidden": hidden, "pooled": pooled}


def text_conditioning_fn(model_config: ml_collections.ConfigDict, tokenizer, text_graphdef):
    """encode(text_params, input_ids) -> {"hidden", "pooled"} for the configured pooling."""
    pooling = model_config.text_encoder.get("pooling", "eos")
    pad_id = getattr(tokenizer, "pad_token_id", 0) or 0
    eos_id = getattr(tokenizer, "eos_token_id", 1)

    def encode(text_params, input_ids):
        return encode_prompts(text_graphdef, text_params, input_ids, pooling=pooling,
                              pad_token_id=pad_id, eos_token_id=eos_id)

    return encode


class FrozenVAE(NamedTuple):
    """The frozen VAE of a latent-diffusion model: module split for jitted code, plus its
    latent facts (scaling_factor, shift_factor, latent_channels, downsample_factor)."""

    graphdef: Any
    params: Any
    info: dict


def build_frozen_vae(model_config: ml_collections.ConfigDict) -> FrozenVAE | None:
    """The VAE of `model.pretrained` (computing in `model.dtype`, parameters float32), or None
    for a pixel-space model."""
    directory = model_config.get("pretrained", "")
    if not directory:
        return None
    from models.pretrained import load_pipeline_vae

    vae, info = load_pipeline_vae(directory, dtype=compute_dtype(model_config))
    graphdef, params = nnx.split(vae)
    return FrozenVAE(graphdef, params, info)


def latent_encoder_fn(vae: FrozenVAE):
    """encode(vae_params, images in [-1, 1], rng) -> float32 latents, scaled as the UNet sees
    them: a posterior sample of the frozen VAE, (z - shift) * scale."""
    from models.vae import encode_to_latents

    graphdef, info = vae.graphdef, vae.info

    def encode(vae_params, images, rng):
        latents = encode_to_latents(nnx.merge(graphdef, vae_params), images, rng,
                                    info["scaling_factor"], info["shift_factor"])
        return latents.astype(jnp.float32)

    return encode


def latent_decoder_fn(vae: FrozenVAE):
    """decode(vae_params, latents) -> float32 images, about [-1, 1]."""
    from models.vae import decode_from_latents

    graphdef, info = vae.graphdef, vae.info

    def decode(vae_params, latents):
        images = decode_from_latents(nnx.merge(graphdef, vae_params), latents,
                                     info["scaling_factor"], info["shift_factor"])
        return images.astype(jnp.float32)

    return decode


def denoiser_apply_fn(unet_graphdef, *, super_resolution: bool):
    """apply(params, x, t, cond) -> UNet output, for the solvers (`diffusion.sampling`).

    `cond` is the per-example conditioning pytree: {"hidden", "pooled"} from the text encoder,
    plus, for a super-resolution model, "low_res" (the extra input channels,
    `diffusion.low_res.low_res_input`) and "noise_level" (int labels of its class embedding).
    Training (`train.step`) calls the UNet the same way."""

    def apply(params, x, t, cond):
        return unet_forward(nnx.merge(unet_graphdef, params), x, t, cond,
                            super_resolution=super_resolution)

    return apply


def unet_forward(unet, x, t, cond, *, super_resolution: bool):
    """The UNet's output for noisy input `x` at timesteps `t`: the one call of the UNet that
    training and sampling share. A super-resolution model gets cond["low_res"] concatenated to
    its input channels and cond["noise_level"] as `class_labels`; otherwise `class_labels` is
    the pooled prompt (the input of a projection class embedding, ignored by a UNet without a
    class embedding)."""
    if super_resolution:
        x = jnp.concatenate([x, cond["low_res"].astype(x.dtype)], axis=-1)
        return unet(x, t, cond["hidden"], class_labels=cond["noise_level"])
    return unet(x, t, cond["hidden"], class_labels=cond["pooled"])
