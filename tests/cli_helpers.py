"""Helpers of the sampling and CLI tests: checkpoints written without training (random or
pretrained weights) and subprocess runs of the CLIs with the environment they get on a user's
machine."""

import json
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipeline.input_pipeline import synthetic_tokenizer_workdir
from models.factory import build_unet
from models.text_encoder import TOKENIZER_FILE
from tests.xla_env import xla_flags
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 4


def save_ema_checkpoint(workdir, config, params, step: int = STEP) -> None:
    """A checkpoint in train/checkpoint.py's layout holding `params` as the EMA UNet (what the
    sampler and the exporter read), with `config` beside it; no training state."""
    checkpoint.save_config(workdir, config)
    meta = {"step": step, "config": json.loads(config.to_json_best_effort(sort_keys=True)),
            "data": {}}
    with checkpoint.make_manager(workdir, async_save=False) as manager:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.int32(step)}),
            ema_params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


def write_random_checkpoint(workdir, config, params_model_config=None):
    """A checkpoint with random EMA weights (no training) and the demo data's tokenizer."""
    _, params = nnx.split(build_unet((params_model_config or config.model), nnx.Rngs(3)))
    params = jax.tree_util.tree_map(lambda p: p * 1.5, params)
    save_ema_checkpoint(workdir, config, params)
    shutil.copy(os.path.join(synthetic_tokenizer_workdir(config), TOKENIZER_FILE), workdir)


def checkpoint_of_pretrained(config, workdir) -> None:
    """A training workdir whose EMA UNet is `config.model.pretrained`'s own (step 1)."""
    from models.factory import abstract_unet
    from models.pretrained import load_unet_params
    from train.sharding import make_mesh, tree_shardings

    _, abstract = abstract_unet(config.model)
    mesh = make_mesh((("data", -1),))
    params = load_unet_params(f"{config.model.pretrained}/unet", abstract,
                              tree_shardings(mesh, abstract))
    save_ema_checkpoint(workdir, config, params, step=1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (a multi-process run's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(devices):
    env = dict(os.environ)
    # Single-threaded CPU devices, as the CLIs' default --cpu_devices sets them.
    env["XLA_FLAGS"] = xla_flags(devices, "--xla_cpu_multi_thread_eigen=false")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def run_cli(args, devices=2, timeout=300):
    return subprocess.run(args, cwd=ROOT, env=cli_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def error_line(result):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines, result.stderr[-2000:]
    return lines[-1]


