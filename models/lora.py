"""LoRA for the UNet and the CLIP text encoder: surgery, training split, and file formats.

`apply_lora` replaces matching `nnx.Linear` (and 1x1 `nnx.Conv`) layers in place with
`LoRALinear` / `LoRAConv`: subclasses that keep the base layer's `kernel` and `bias` at the
same paths and add `y += scale * (x @ A) @ B` with `scale = alpha / rank` (the PEFT /
diffusers convention). Because the base paths do not move, the base part of a LoRA model's
state has exactly the tree of the plain model's state: parameters loaded from a pretrained
checkpoint are the frozen base as they are.

Files: ours are the PEFT naming that diffusers' `load_lora_weights` reads
(`unet.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r], torch layouts), with rank
and alpha in the safetensors metadata under `lora_adapter_metadata`, where diffusers looks for
them. `load_lora_file` also reads older diffusers files (`.lora.down.weight`,
`processor.to_q_lora`) and kohya-ss files (`lora_unet_<module_with_underscores>.lora_down
.weight`, `.lora_up.weight`, `.alpha`; `lora_te_` for the text encoder).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.logical_axes import EMBED, MLP

# Attention projections: diffusers' UNet names and Hugging Face CLIP's.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Components of a pipeline a LoRA file may carry, as diffusers prefixes them.
COMPONENTS = ("unet", "text_encoder")
# Filter for `nnx.split(module, LORA_PARAMS, ...)`: the trainable low-rank factors.
LORA_PARAMS = nnx.LoRAParam
# The file name diffusers' `load_lora_weights(directory)` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"
# Hugging Face's CLIPTextModel nests the transformer under `text_model.`; ours drops it.
_TORCH_MODULE_PREFIX = {"unet": "", "text_encoder": "text_model."}
# Marks a factor of a 1x1 conv, whose torch layout has two trailing spatial dimensions.
_CONV_METADATA = "lora_conv"


# ----------------------------------------------------------------------------------------------
# Layers


def _adopt_fields(new: nnx.Module, base: nnx.Module) -> None:
    """Moves `base`'s fields (its Variables included, by reference) onto `new`."""
    data_fields = base._pytree__nodes
    for name, value in vars(base).items():
        if name.startswith("_pytree__"):
            continue
        setattr(new, name, nnx.data(value) if data_fields.get(name) else value)


def _low_rank(in_features: int, rank: int, out_features: int, *, dtype, param_dtype, conv: bool,
              rngs: nnx.Rngs) -> nnx.LoRA:
    # A's bound 1/sqrt(in) as PEFT's kaiming_uniform(a=sqrt(5)); B zero, so a fresh adapter
    # leaves the output unchanged. Logical axes let the mesh rules shard A and B like the kernel.
    extra = {_CONV_METADATA: True} if conv else {}
    return nnx.LoRA(
        in_features, rank, out_features, dtype=dtype, param_dtype=param_dtype,
        a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        b_initializer=nnx.initializers.zeros,
        a_metadata={"out_sharding": (EMBED, None), "eager_sharding": False, **extra},
        b_metadata={"out_sharding": (None, MLP), "eager_sharding": False, **extra},
        rngs=rngs,
    )


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` (same `kernel` / `bias` paths) plus `scale * (x @ lora_a) @ lora_b`."""

    def __init__(self, base: nnx.Linear, *, rank: int, scale: float, rngs: nnx.Rngs):
        _adopt_fields(self, base)
        self.lora = _low_rank(base.in_features, rank, base.out_features, dtype=base.dtype,
                              param_dtype=base.param_dtype, conv=False, rngs=rngs)
        self.scale = float(scale)

    def __call__(self, inputs, out_sharding=None):
        return super().__call__(inputs, out_sharding=out_sharding) + self.scale * self.lora(inputs)


class LoRAConv(nnx.Conv):
    """A 1x1, stride-1 `nnx.Conv` (SD 1.x's `proj_in` / `proj_out`) with a LoRA update: on
    NHWC a 1x1 conv is a matmul over the last axis, so the update is LoRALinear's."""

    def __init__(self, base: nnx.Conv, *, rank: int, scale: float, rngs: nnx.Rngs):
        _adopt_fields(self, base)
        self.lora = _low_rank(base.in_features, rank, base.out_features, dtype=base.dtype,
                              param_dtype=base.param_dtype, conv=True, rngs=rngs)
        self.scale = float(scale)

    def __call__(self, inputs):
        return super().__call__(inputs) + self.scale * self.lora(inputs)


_LORA_LAYERS = (LoRALinear, LoRAConv)


def _is_pointwise_conv(layer) -> bool:
    return (isinstance(layer, nnx.Conv) and all(k == 1 for k in layer.kernel_size)
            and all(s == 1 for s in np.atleast_1d(layer.strides))
            and layer.feature_group_count == 1)


def _dotted(path: Sequence) -> str:
    return ".".join(str(key) for key in path)


def _layers(module: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, layer) of every Linear and Conv."""
    for path, node in nnx.iter_graph(module):
        if isinstance(node, (nnx.Linear, nnx.Conv)) and path:
            yield tuple(path), node


def _replace(module: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = module
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _matches(dotted: str, target: str) -> bool:
    # "to_out" names diffusers' `to_out.0`: a trailing list index may be left out.
    for name in (dotted, re.sub(r"\.\d+$", "", dotted)):
        if name == target or name.endswith("." + target):
            return True
    return False


def _check_rank_alpha(rank, alpha) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


def apply_lora(module: nnx.Module, *, rank: int, alpha: float,
               targets: Sequence[str] = DEFAULT_TARGETS, rngs: nnx.Rngs) -> int:
    """Wraps every Linear (or 1x1 Conv) whose path ends in one of `targets` with a LoRA layer,
    in place; returns how many were wrapped.

    A target is a layer name (`to_q`) or a dotted path suffix (`attn2.to_k`, only the
    cross-attention keys); a trailing list index may be left out (`to_out` is `to_out.0`).
    B starts at zero, so the module's output is unchanged until training moves it.
    """
    _check_rank_alpha(rank, alpha)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("apply_lora: targets is empty")
    chosen, hits = [], dict.fromkeys(targets, 0)
    for path, layer in _layers(module):
        dotted = _dotted(path)
        matched = [target for target in targets if _matches(dotted, target)]
        if not matched:
            continue
        if isinstance(layer, _LORA_LAYERS):
            raise ValueError(f"apply_lora: {dotted} already has a LoRA adapter")
        if isinstance(layer, nnx.Conv) and not _is_pointwise_conv(layer):
            raise ValueError(
                f"apply_lora: target {matched[0]!r} matches {dotted}, a {layer.kernel_size} "
                "conv; only Linear and 1x1 stride-1 Conv layers take LoRA adapters"
            )
        for target in matched:
            hits[target] += 1
        chosen.append((path, layer))
    unmatched = [target for target, count in hits.items() if count == 0]
    if unmatched:
        names = sorted({str(path[-1]) for path, _ in _layers(module)
                        if not isinstance(path[-1], int)})
        raise ValueError(
            f"apply_lora: target(s) {unmatched} match no Linear or Conv layer of "
            f"{type(module).__name__}; its layer names are {names}"
        )
    scale = alpha / rank
    for path, layer in chosen:
        wrapper = LoRAConv if isinstance(layer, nnx.Conv) else LoRALinear
        _replace(module, path, wrapper(layer, rank=rank, scale=scale, rngs=rngs))
    return len(chosen)


def _plain_copy(layer: nnx.Module) -> nnx.Module:
    """The base layer of a LoRA layer as a plain Linear / Conv sharing its Variables."""
    if isinstance(layer, LoRAConv):
        build = lambda: nnx.Conv(layer.in_features, layer.out_features, layer.kernel_size,
                                 use_bias=layer.use_bias, rngs=nnx.Rngs(0))
    else:
        build = lambda: nnx.Linear(layer.in_features, layer.out_features,
                                   use_bias=layer.use_bias, rngs=nnx.Rngs(0))
    plain = nnx.eval_shape(build)  # fields are all overwritten: no need to allocate
    data_fields = layer._pytree__nodes
    for name, value in vars(layer).items():
        if name.startswith("_pytree__") or name in ("lora", "scale"):
            continue
        setattr(plain, name, nnx.data(value) if data_fields.get(name) else value)
    return plain


def _fold(variable: nnx.Variable, delta: np.ndarray | jnp.ndarray) -> None:
    value = variable.get_value()
    variable.set_value((value + jnp.asarray(delta, jnp.float32)).astype(value.dtype))


def merge_lora(module: nnx.Module) -> int:
    """Folds every LoRA layer into its base kernel (W += scale * A @ B) and puts the plain
    layer back, in place; returns how many were merged. The module then has the plain
    model's structure (for export, or sampling without the adapter's extra matmuls). The
    kernels' Variables are written, as in `apply_lora_weights(merge=True)`."""
    found = [(path, layer) for path, layer in _layers(module) if isinstance(layer, _LORA_LAYERS)]
    for path, layer in found:
        delta = layer.scale * (jnp.asarray(layer.lora.lora_a.get_value(), jnp.float32)
                               @ jnp.asarray(layer.lora.lora_b.get_value(), jnp.float32))
        _fold(layer.kernel, delta.reshape(layer.kernel.shape))
        _replace(module, path, _plain_copy(layer))
    return len(found)


# ----------------------------------------------------------------------------------------------
# Training: the trainable LoRA factors apart from the frozen base


def split_lora(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, base_params, lora_params) of a module after `apply_lora`.

    `base_params` holds everything but the LoRA factors and has the same tree as the plain
    model's `nnx.state`; `nnx.merge(graphdef, base_params, lora_params)` rebuilds the module.
    """
    graphdef, lora_params, base_params = nnx.split(module, LORA_PARAMS, ...)
    return graphdef, base_params, lora_params


def merge_params(base_params: nnx.State, lora_params: nnx.State) -> nnx.State:
    """One state for `nnx.merge(graphdef, state)`: the base with the LoRA factors added."""
    return nnx.merge_state(base_params, lora_params)


def abstract_lora_model(build: Callable[[], nnx.Module], *, rank: int, alpha: float,
                        targets: Sequence[str] = DEFAULT_TARGETS
                        ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract base, abstract LoRA) of `build()` with adapters, allocating nothing.

    The abstract base has the plain model's tree, so a pretrained loader that fills the plain
    model's abstract params (with their shardings) fills the base as it is.
    """
    def build_adapted():
        module = build()
        apply_lora(module, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(0))
        return module

    return split_lora(nnx.eval_shape(build_adapted))


def init_lora_params(build: Callable[[], nnx.Module], rng, *, rank: int, alpha: float,
                     targets: Sequence[str] = DEFAULT_TARGETS) -> nnx.State:
    """Fresh LoRA factors (A random from `rng`, B zero) for `build()`'s model.

    Meant for `jax.jit(..., out_shardings=lora_shardings)`: the base model is built too, but
    none of it is returned, so XLA drops its initialisation and only the factors are created,
    each in its shards.
    """
    module = build()
    apply_lora(module, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(params=rng))
    return split_lora(module)[2]


def default_lora_config():
    """`model.lora` fields: rank 0 means full fine-tuning (no adapters)."""
    import ml_collections

    return ml_collections.ConfigDict({
        "rank": 0,
        # scale = alpha / rank; alpha = rank gives scale 1 (diffusers' training scripts' default)
        "alpha": 4.0,
        "targets": DEFAULT_TARGETS,
        # Also adapt the text encoder's attention (TEXT_ENCODER_TARGETS), same rank and alpha.
        "text_encoder": False,
    })


def count_params(state: nnx.State) -> int:
    return sum(int(np.prod(variable.shape)) for _, variable in nnx.to_flat_state(state))


def check_lora_config(rank, alpha, targets, *, field: str = "model.lora") -> None:
    """Config check for `model.lora` (rank 0 means full fine-tuning); messages name fields."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"{field}.rank: a non-negative int (0 = full fine-tuning), got {rank!r}")
    if rank == 0:
        return
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"{field}.alpha: a positive number, got {alpha!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(
            f"{field}.targets: a non-empty sequence of layer names such as {DEFAULT_TARGETS}, "
            f"got {targets!r}"
        )


# ----------------------------------------------------------------------------------------------
# Writing: PEFT naming, as diffusers' load_lora_weights reads it


def _factors(lora_params: nnx.State) -> dict[str, dict[str, nnx.Variable]]:
    """module path -> {"lora_a": Variable, "lora_b": Variable} from a LoRA state."""
    layers: dict[str, dict] = {}
    for path, variable in nnx.to_flat_state(lora_params):
        if len(path) < 3 or path[-2] != "lora" or path[-1] not in ("lora_a", "lora_b"):
            raise ValueError(f"{_dotted(path)} is not a LoRA factor (expected <layer>.lora.lora_a"
                             " / lora_b): pass the LORA_PARAMS part of nnx.split")
        layers.setdefault(_dotted(path[:-2]), {})[path[-1]] = variable
    return layers


def _torch_factor(variable) -> np.ndarray:
    value = np.asarray(getattr(variable, "get_value", lambda: variable)(), dtype=np.float32).T
    conv = bool(getattr(variable, "get_metadata", dict)().get(_CONV_METADATA))
    # Contiguous: safetensors' numpy writer stores a transposed view's memory as it lies.
    return np.ascontiguousarray(value[:, :, None, None] if conv else value)


def lora_state_dict_peft(lora_params: nnx.State, prefix: str = "unet") -> dict[str, np.ndarray]:
    """PEFT-named torch-layout tensors: `{prefix}.{module}.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] ([.., 1, 1] for 1x1 convs). `prefix` is the pipeline component
    (`unet` or `text_encoder`); alpha is not a tensor in this format (see
    `save_lora_safetensors`)."""
    if prefix not in COMPONENTS:
        raise ValueError(f"prefix must be one of {COMPONENTS}, got {prefix!r}")
    tensors = {}
    for module, factors in _factors(lora_params).items():
        name = f"{prefix}.{_TORCH_MODULE_PREFIX[prefix]}{module}"
        tensors[f"{name}.lora_A.weight"] = _torch_factor(factors["lora_a"])
        tensors[f"{name}.lora_B.weight"] = _torch_factor(factors["lora_b"])
    return tensors


def _adapter_metadata(lora_params: nnx.State, prefix: str, alpha: float) -> dict:
    # diffusers builds peft's LoraConfig from these keys (prefix removed) instead of guessing.
    # Module names are relative to our module: peft matches them as name suffixes, so they
    # fit CLIPTextModel with (transformers 4) and without (5) its `text_model.` level.
    ranks = {module: int(factors["lora_a"].shape[-1])
             for module, factors in _factors(lora_params).items()}
    if not ranks:
        return {}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    return {
        f"{prefix}.r": rank,
        f"{prefix}.lora_alpha": float(alpha),
        f"{prefix}.target_modules": sorted(ranks),
        # A layer of another rank keeps the same alpha: scale alpha / r per layer, as we train.
        f"{prefix}.rank_pattern": {module: r for module, r in ranks.items() if r != rank},
    }


def save_lora_safetensors(path: str | Path, unet_lora: nnx.State | None = None, *,
                          alpha: float, text_encoder_lora: nnx.State | None = None,
                          text_encoder_alpha: float | None = None) -> Path:
    """Writes the LoRA factors of the UNet and/or the text encoder to one safetensors file that
    diffusers' `pipeline.load_lora_weights(dir_or_file)` and `load_lora_file` read."""
    from safetensors.numpy import save_file

    if unet_lora is None and text_encoder_lora is None:
        raise ValueError("save_lora_safetensors: nothing to save (no unet_lora, no "
                         "text_encoder_lora)")
    tensors, metadata = {}, {}
    for prefix, params, component_alpha in (
        ("unet", unet_lora, alpha),
        ("text_encoder", text_encoder_lora,
         alpha if text_encoder_alpha is None else text_encoder_alpha),
    ):
        if params is None:
            continue
        tensors.update(lora_state_dict_peft(params, prefix))
        metadata.update(_adapter_metadata(params, prefix, component_alpha))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path),
              metadata={"format": "pt", _METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def export_lora(out_dir: str | Path, unet_lora: nnx.State, *, alpha: float,
                text_encoder_lora: nnx.State | None = None,
                text_encoder_alpha: float | None = None) -> Path:
    """`python -m export` for a LoRA run: `out_dir/pytorch_lora_weights.safetensors`, the
    file name `StableDiffusionPipeline.load_lora_weights(out_dir)` looks for."""
    return save_lora_safetensors(Path(out_dir) / LORA_WEIGHT_NAME, unet_lora, alpha=alpha,
                                 text_encoder_lora=text_encoder_lora,
                                 text_encoder_alpha=text_encoder_alpha)


# ----------------------------------------------------------------------------------------------
# Reading: ours / PEFT, older diffusers, kohya-ss


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One layer's adapter in torch layout: `down` [r, in, *k], `up` [out, r, *1]; the update
    is `alpha / r * up @ down` (alpha None: alpha = r, scale 1)."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# Older diffusers suffixes (attention-processor and `.lora.` naming) -> (module suffix, which).
_OLD_DIFFUSERS = re.compile(
    r"^(?P<module>.+?)(?:\.processor\.(?P<proc>to_q|to_k|to_v|to_out)_lora|\.lora"
    r"|\.lora_linear_layer)\.(?P<which>down|up)\.weight$"
)


def _component(key: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in COMPONENTS:
        return head, rest
    return "unet", key  # a bare model file (e.g. UNet2DConditionModel.save_lora_adapter)


def _module_name(component: str, name: str) -> str:
    """A file's module name relative to our module (text encoder: without `text_model`)."""
    for prefix in ("text_model.", "text_model_"):
        if component == "text_encoder" and name.startswith(prefix):
            return name[len(prefix):]
    return name


def _file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        raw = (handle.metadata() or {}).get(_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _peft_alpha(metadata: Mapping, component: str, module: str) -> float | None:
    base = metadata.get(f"{component}.lora_alpha", metadata.get("lora_alpha"))
    pattern = metadata.get(f"{component}.alpha_pattern", metadata.get("alpha_pattern")) or {}
    for key, value in pattern.items():
        if re.fullmatch(key.lstrip("^").rstrip("$"), module) or module.endswith(key):
            return float(value)
    return None if base is None else float(base)


def load_lora_file(path: str | Path) -> dict[str, dict[str, LoraWeights]]:
    """Reads a LoRA safetensors file: `{component: {module name: LoraWeights}}`, component
    `unet` or `text_encoder`, module names relative to our modules (kohya names keep their
    underscores; `apply_lora_weights` matches either spelling)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    tensors = load_file(str(path))
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    pairs: dict[tuple[str, str], dict] = {}
    alphas: dict[tuple[str, str], float] = {}
    unknown = []
    kohya = any(key.startswith(tuple(_KOHYA_PREFIXES)) for key in tensors)
    metadata = {} if kohya else _file_metadata(path)
    for key, value in tensors.items():
        if kohya:
            stem, _, leaf = key.partition(".")
            prefix = next((p for p in _KOHYA_PREFIXES if stem.startswith(p)), None)
            which = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(leaf)
            if prefix is None or which is None:
                unknown.append(key)
                continue
            component = _KOHYA_PREFIXES[prefix]
            slot = (component, _module_name(component, stem[len(prefix):]))
        else:
            component, rest = _component(key)
            if rest.endswith((".lora_A.weight", ".lora_B.weight")):
                module, which = rest[:-len(".lora_A.weight")], {"A": "down", "B": "up"}[rest[-8]]
            elif rest.endswith(".alpha"):
                module, which = rest[:-len(".alpha")], "alpha"
            elif match := _OLD_DIFFUSERS.match(rest):
                module, which = match["module"], match["which"]
                if match["proc"]:
                    proc = match["proc"]
                    module = f"{module}.{'to_out.0' if proc == 'to_out' else proc}"
            else:
                unknown.append(key)
                continue
            slot = (component, _module_name(component, module))
        if which == "alpha":
            alphas[slot] = float(np.asarray(value).reshape(()))
        else:
            pairs.setdefault(slot, {})[which] = np.asarray(value, dtype=np.float32)
    if unknown:
        raise ValueError(f"{path}: keys in no LoRA format we read (PEFT lora_A/lora_B, diffusers "
                         f"lora.down/up, kohya lora_down/lora_up/alpha): {unknown[:10]}")
    result: dict[str, dict[str, LoraWeights]] = {}
    for (component, module), factors in pairs.items():
        if set(factors) != {"down", "up"}:
            raise ValueError(f"{path}: {component} layer {module} has only "
                             f"{sorted(factors)} of down (A) and up (B)")
        alpha = alphas.get((component, module))
        if alpha is None and metadata:
            alpha = _peft_alpha(metadata, component, module)
        result.setdefault(component, {})[module] = LoraWeights(
            factors["down"], factors["up"], alpha)
    return result


def _canonical(name: str) -> str:
    return name.replace(".", "_")


def apply_lora_weights(module: nnx.Module, lora: Mapping, *, component: str = "unet",
                       scale: float = 1.0, merge: bool = False) -> int:
    """Puts a loaded LoRA (`load_lora_file`'s result, or one component of it) into `module`,
    in place; returns the number of layers changed.

    `merge=True` folds `W += scale * alpha / r * up @ down` into the base kernels (1x1 and
    kxk convs too) and leaves no LoRA modules; otherwise each layer becomes a LoRA layer with
    that scale. Keys that name no layer of `module` are an error that lists them.

    Merging writes into the kernels' Variables: a module from `nnx.merge(graphdef, state)`
    shares them with `state` unless merged with `copy=True`.
    """
    if lora and all(key in COMPONENTS for key in lora):
        if component not in lora:
            raise ValueError(f"the LoRA has no {component!r} part, only {sorted(lora)}")
        lora = lora[component]
    if not lora:
        raise ValueError(f"the LoRA's {component!r} part is empty")
    index = {_canonical(_dotted(path)): (path, layer) for path, layer in _layers(module)}
    unmatched = sorted(name for name in lora if _canonical(name) not in index)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} LoRA key(s) name no Linear or Conv layer of "
            f"{type(module).__name__} ({component}): {unmatched[:10]}"
        )
    planned = []
    for name, weights in lora.items():
        path, layer = index[_canonical(name)]
        dotted = _dotted(path)
        kernel_shape = tuple(layer.kernel.shape)  # [*k, in, out]
        in_features, out_features = kernel_shape[-2], kernel_shape[-1]
        spatial = kernel_shape[:-2]
        down, up = weights.down, weights.up
        expected_down = (weights.rank, in_features, *spatial)
        expected_up = (out_features, weights.rank, *(1,) * len(spatial))
        if down.shape != expected_down or up.shape != expected_up:
            raise ValueError(
                f"LoRA for {dotted}: down {down.shape} / up {up.shape}, the layer needs "
                f"{expected_down} / {expected_up}"
            )
        if not merge:
            if isinstance(layer, _LORA_LAYERS):
                raise ValueError(f"{dotted} already has a LoRA adapter: load with merge=True, "
                                 "or merge_lora first")
            if isinstance(layer, nnx.Conv) and not _is_pointwise_conv(layer):
                raise ValueError(f"LoRA for {dotted} ({spatial} conv) can only be merged: "
                                 "pass merge=True")
        planned.append((path, layer, weights))
    for path, layer, weights in planned:
        layer_scale = scale * weights.scale
        rank = weights.rank
        down = weights.down.reshape(rank, -1)  # [r, in * k]
        up = weights.up.reshape(up_rows := weights.up.shape[0], rank)
        if merge:
            delta = (up @ down).reshape(up_rows, *weights.down.shape[1:])  # torch [out, in, *k]
            delta = np.transpose(delta, (*range(2, delta.ndim), 1, 0))
            _fold(layer.kernel, layer_scale * delta)
            continue
        wrapper = LoRAConv if isinstance(layer, nnx.Conv) else LoRALinear
        adapted = wrapper(layer, rank=rank, scale=layer_scale, rngs=nnx.Rngs(0))
        adapted.lora.lora_a.set_value(jnp.asarray(down.T, adapted.lora.lora_a.dtype))
        adapted.lora.lora_b.set_value(jnp.asarray(up.T, adapted.lora.lora_b.dtype))
        _replace(module, path, adapted)
    return len(planned)


def apply_lora_file(module: nnx.Module, path: str | Path, *, component: str = "unet",
                    scale: float = 1.0, merge: bool = False) -> int:
    """`apply_lora_weights(module, load_lora_file(path), ...)`: what a sampler's `--lora FILE
    --lora_scale S [--lora_merge]` does to its UNet (and, with component="text_encoder", to
    its text encoder)."""
    return apply_lora_weights(module, load_lora_file(path), component=component, scale=scale,
                              merge=merge)
