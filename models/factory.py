"""Build the networks named by a config; shared by training, sampling and the demo."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from models.text_encoder import build_text_encoder
from models.unet import UNet2DConditionModel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config: ml_collections.ConfigDict):
    return _DTYPES[model_config.dtype]


def build_unet(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> UNet2DConditionModel:
    kwargs = dict(model_config.unet)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return UNet2DConditionModel(**kwargs, dtype=compute_dtype(model_config), rngs=rngs)


def abstract_unet(model_config: ml_collections.ConfigDict):
    """(graphdef, abstract params) without allocating any parameter."""
    module = nnx.eval_shape(lambda: build_unet(model_config, nnx.Rngs(0)))
    return nnx.split(module)


def build_frozen_text_encoder(model_config: ml_collections.ConfigDict):
    """(tokenizer, graphdef, params) of the frozen text encoder."""
    tokenizer, encoder = build_text_encoder(model_config.text_encoder)
    graphdef, params = nnx.split(encoder)
    return tokenizer, graphdef, params
