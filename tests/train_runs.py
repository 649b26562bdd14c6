"""Tiny-config runs built once per test session (each build compiles a train step, the slow
part of these tests) and shared by the train-step, FSDP and setup tests."""

import functools

import jax
import numpy as np

from configs import tiny
from train.setup import build_run
from train.sharding import make_mesh

BATCH = 16


def tiny_config(**overrides):
    """The tiny config with the byte tokenizer (no tokenizer training in a workdir); 32 tokens
    truncate the longer synthetic captions, which does not matter for step tests."""
    config = tiny.get_config()
    config.model.text_encoder.tokenizer = "bytes"
    config.model.text_encoder.max_length = 32
    config.train.global_batch_size = BATCH
    for field, value in overrides.items():
        section, name = field.split("__")
        config[section][name] = value
    return config


@functools.cache
def tiny_run(mesh_shape=(("data", -1), ("fsdp", 1)), grad_accum_steps=1):
    config = tiny_config(train__grad_accum_steps=grad_accum_steps, mesh__shape=mesh_shape)
    return build_run(config, make_mesh(mesh_shape), workdir=None, init=True)


def batch_for(run, seed=0):
    rng = np.random.default_rng(seed)
    size = run.abstract_batch["images"].shape[1]
    captions = ["a red circle in the top left", "a blue square in the center"]
    batch = {
        "images": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
        "input_ids": np.asarray(run.tokenizer([captions[i % 2] for i in range(BATCH)])),
    }
    return jax.device_put(batch, run.data_sharding)


def fresh_state(run, seed=0):
    """A new initial state (the compiled step donates the one it is given)."""
    return run.init_state(jax.random.PRNGKey(seed))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
