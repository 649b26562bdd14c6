"""Name and layout mapping between our NNX parameters and Hugging Face (PyTorch) state dicts.

Our modules mirror the PyTorch attribute names, so a parameter's torch name is its NNX path
joined with dots, with the leaf renamed (`kernel`/`scale`/`embedding` -> `weight`). Only
kernels change layout: torch stores (out, in, *spatial), Flax (*spatial, in, out).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

_TORCH_LEAF_NAME = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                    # a bare nn.Parameter keeps its attribute name (diffusers' AttentionPooling)
                    "positional_embedding": "positional_embedding"}


def _torch_name(path: tuple) -> str:
    *parents, leaf = (str(key) for key in path)
    if leaf not in _TORCH_LEAF_NAME:
        raise ValueError(f"parameter {'.'.join((*parents, leaf))} has no torch equivalent")
    return ".".join((*parents, _TORCH_LEAF_NAME[leaf]))


def torch_name(path: tuple) -> str:
    """The torch state-dict name of the parameter at NNX `path` (e.g. `conv_in.weight`)."""
    return _torch_name(path)


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    ndim = kernel.ndim
    return np.transpose(kernel, (ndim - 1, ndim - 2, *range(ndim - 2)))


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    ndim = weight.ndim
    return np.transpose(weight, (*range(2, ndim), 1, 0))


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    if leaf != "kernel":
        return tuple(shape)
    return (shape[-1], shape[-2], *shape[:-2])


def _params(module: nnx.Module):
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            yield path, variable


def flat_param_names(module: nnx.Module, *, layout: str = "flax") -> dict[str, tuple[int, ...]]:
    """Torch-style dotted name -> parameter shape, in `layout` "flax" or "torch".

    With layout="torch" the result compares equal to
    `{k: tuple(v.shape) for k, v in torch_module.state_dict().items()}` when the structure
    mirrors the torch module one to one.
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")
    names = {}
    for path, variable in _params(module):
        shape = tuple(variable.shape)
        names[_torch_name(path)] = shape if layout == "flax" else _torch_shape(str(path[-1]), shape)
    return names


def to_torch_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters as a torch-layout state dict of numpy arrays (for export)."""
    state = {}
    for path, variable in _params(module):
        value = np.asarray(variable.get_value())
        state[_torch_name(path)] = _kernel_to_torch(value) if path[-1] == "kernel" else value
    return state


def load_torch_state_dict(
    module: nnx.Module, state: Mapping[str, np.ndarray], *, strict: bool = True
) -> None:
    """Copies a torch-layout state dict into `module` in place, casting to each param's dtype.

    Works on abstract modules from `nnx.eval_shape` too, so large models are never
    initialised randomly just to be overwritten. Every parameter of `module` must be present;
    with `strict`, every entry of `state` must be used as well.
    """
    missing, mismatched, used = [], [], set()
    for path, variable in _params(module):
        name = _torch_name(path)
        if name not in state:
            missing.append(name)
            continue
        used.add(name)
        value = np.asarray(state[name])
        if path[-1] == "kernel":
            value = _kernel_from_torch(value)
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append(f"{name}: checkpoint {value.shape} vs model {tuple(variable.shape)}")
            continue
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    unexpected = sorted(set(state) - used) if strict else []
    problems = [
        f"{label} ({len(names)}): {'; '.join(names[:20])}"
        for label, names in (
            ("missing from checkpoint", missing),
            ("unexpected in checkpoint", unexpected),
            ("shape mismatch", mismatched),
        )
        if names
    ]
    if problems:
        raise ValueError("cannot load weights: " + " | ".join(problems))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file, or a directory holding one or an index-sharded set."""
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.is_file():
            path = single
        elif index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(path / shard))
            return state
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path}"
            )
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    return load_file(path)
