"""CLIP text transformer in Flax NNX, its tokenizers, and the frozen-encoder factory.

Parameter paths mirror Hugging Face `CLIPTextModel` (`text_model.*` with the prefix dropped), so
a Hugging Face `model.safetensors` loads by renaming and transposing only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.hf_weights import load_torch_state_dict, read_safetensors
from models.logical_axes import embed_kw, linear_kw, norm_kw

# transformers warns at import time when torch is absent; tokenizers need no torch, so that
# warning is noise for every user. Respect an explicit setting.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEXT_ENCODER_KINDS = ("demo", "clip")
# Tokenizers of the demo encoder: "bytes" (UTF-8 bytes, one token each) or "bpe" (byte-level
# BPE trained on the training captions when training starts, saved in the workdir).
DEMO_TOKENIZERS = ("bytes", "bpe")
TOKENIZER_FILE = "tokenizer.json"
_BPE_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: the byte tokenizer's pad / end ids

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, *, dtype, param_dtype,
                 rngs):
        embed_init = nnx.initializers.normal(0.02)
        kw = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=embed_init, rngs=rngs,
                  **embed_kw())
        self.token_embedding = nnx.Embed(vocab_size, hidden_size, **kw)
        self.position_embedding = nnx.Embed(max_position_embeddings, hidden_size, **kw)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, hidden_size, num_heads, num_layers, *, dtype, param_dtype, rngs):
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_heads}"
            )
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        in_std = hidden_size**-0.5 * (2 * num_layers) ** -0.5
        linear = lambda std: nnx.Linear(
            hidden_size, hidden_size, kernel_init=nnx.initializers.normal(std), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs, **linear_kw(),
        )
        self.k_proj = linear(in_std)
        self.v_proj = linear(in_std)
        self.q_proj = linear(in_std)
        self.out_proj = linear(hidden_size**-0.5)

    def __call__(self, x):
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)
        out = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, hidden_size, intermediate_size, num_layers, hidden_act, *, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **linear_kw())
        self.activation = _ACTIVATIONS[hidden_act]
        self.fc1 = nnx.Linear(hidden_size, intermediate_size,
                              kernel_init=nnx.initializers.normal((2 * hidden_size) ** -0.5), **kw)
        fc2_std = hidden_size**-0.5 * (2 * num_layers) ** -0.5
        self.fc2 = nnx.Linear(intermediate_size, hidden_size,
                              kernel_init=nnx.initializers.normal(fc2_std), **kw)

    def __call__(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, hidden_size, intermediate_size, num_heads, num_layers, hidden_act, eps, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(hidden_size, num_heads, num_layers, **kw)
        self.layer_norm1 = nnx.LayerNorm(hidden_size, epsilon=eps, **kw, **norm_kw())
        self.mlp = CLIPMLP(hidden_size, intermediate_size, num_layers, hidden_act, **kw)
        self.layer_norm2 = nnx.LayerNorm(hidden_size, epsilon=eps, **kw, **norm_kw())

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, layers: list[CLIPEncoderLayer]):
        self.layers = nnx.List(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nnx.Module):
    """CLIP's text tower: `input_ids [B, L] -> last_hidden_state [B, L, hidden_size]`.

    Attention is causal, as in CLIP, so padding after the end token never changes the features
    of the text before it. A random instance is initialised like Hugging Face's
    `CLIPTextModel`, so the demo's frozen random encoder has an untrained CLIP's statistics.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        max_position_embeddings: int,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.max_position_embeddings = max_position_embeddings
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings,
                                             **kw)
        self.encoder = CLIPEncoder([
            CLIPEncoderLayer(hidden_size, intermediate_size, num_attention_heads,
                             num_hidden_layers, hidden_act, layer_norm_eps, **kw)
            for _ in range(num_hidden_layers)
        ])
        self.final_layer_norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, **kw,
                                             **norm_kw())

    def __call__(self, input_ids):
        if input_ids.shape[-1] > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings="
                f"{self.max_position_embeddings}"
            )
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


def pooled_output(last_hidden_state, input_ids, eos_token_id: int):
    """The feature at each sequence's first end token, as Hugging Face CLIP pools.

    Configs with the legacy `eos_token_id == 2` use the largest id instead, which is the end
    token in the original CLIP vocabulary; Hugging Face keeps that rule for compatibility.
    """
    if eos_token_id == 2:
        positions = jnp.argmax(input_ids, axis=-1)
    else:
        positions = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]


@runtime_checkable
class Tokenizer(Protocol):
    """Texts -> int32 ids [N, max_length], end token appended, padded or truncated."""

    max_length: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class HFTokenizer:
    """Adapts a `transformers` tokenizer to the `Tokenizer` protocol."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.max_length), np.int32)
        ids = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length,
            return_attention_mask=False, return_tensors="np",
        )["input_ids"]
        return ids.astype(np.int32)

    def truncated(self, texts: Sequence[str]) -> list[str]:
        """The texts that do not fit in max_length tokens (their ends would be cut off)."""
        return [text for text in texts
                if len(self.tokenizer(text, truncation=False)["input_ids"]) > self.max_length]


def byte_tokenizer(max_length: int) -> HFTokenizer:
    """UTF-8 bytes as ids (ByT5's scheme: pad 0, end 1, bytes from 3); needs no files."""
    from transformers import ByT5Tokenizer

    return HFTokenizer(ByT5Tokenizer(), max_length)


def uses_bpe_tokenizer(text_cfg) -> bool:
    """Whether this `model.text_encoder` config reads a trained BPE tokenizer from the workdir."""
    return _field(text_cfg, "kind") == "demo" and _field(text_cfg, "tokenizer", "bytes") == "bpe"


def train_bpe_tokenizer(captions, vocab_size: int, max_length: int) -> HFTokenizer:
    """A byte-level BPE tokenizer (CLIP's and GPT-2's scheme) trained on `captions`.

    Every byte is in the base alphabet, so any prompt tokenizes, unseen words as smaller pieces;
    frequent caption words become single tokens, which makes sequences about 4x shorter than
    bytes. Lower-cased, a space before every word, pad/end/unknown ids 0/1/2 as in the byte
    tokenizer, the end token appended. Deterministic for the same captions.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    pad, eos, unk = _BPE_SPECIALS
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=2, special_tokens=list(_BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(list(captions), trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, bpe.token_to_id(eos))])
    return _wrap_bpe(bpe, max_length)


def _wrap_bpe(bpe, max_length: int) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = _BPE_SPECIALS
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=pad, eos_token=eos,
                                   unk_token=unk)
    return HFTokenizer(fast, max_length)


def save_bpe_tokenizer(tokenizer: HFTokenizer, workdir: str | Path) -> Path:
    """Writes `workdir/tokenizer.json` atomically (the sampler reads it back)."""
    path = Path(workdir) / TOKENIZER_FILE
    tmp = path.with_suffix(".json.tmp")
    tokenizer.tokenizer.backend_tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def load_bpe_tokenizer(workdir: str | Path, max_length: int) -> HFTokenizer:
    from tokenizers import Tokenizer

    path = Path(workdir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: model.text_encoder.tokenizer='bpe' reads the tokenizer that "
            "training trained on its captions and saved in the workdir"
        )
    return _wrap_bpe(Tokenizer.from_file(str(path)), max_length)


def load_clip_text_weights(module: CLIPTextTransformer, safetensors_path: str | Path) -> None:
    """Loads a Hugging Face CLIP text checkpoint (file or directory) into `module` in place.

    Accepts `CLIPTextModel` files (keys with or without `text_model.`) and full `CLIPModel`
    files, whose vision tower and projections are ignored.
    """
    state = read_safetensors(safetensors_path)
    prefix = "text_model."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()
                 if key.startswith(prefix)}
    # A buffer, not a parameter: older checkpoints saved it, we compute positions on the fly.
    state.pop("embeddings.position_ids", None)
    load_torch_state_dict(module, state)


def _field(config, name: str, default=None):
    if hasattr(config, "get"):  # dict, ConfigDict
        return config.get(name, default)
    return getattr(config, name, default)


def _clip_dirs(text_cfg) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) of `pretrained_path`: a model dir or a diffusers pipeline root."""
    raw_path = _field(text_cfg, "pretrained_path", "")
    if not raw_path:
        raise FileNotFoundError(
            "model.text_encoder.kind='clip' needs model.text_encoder.pretrained_path: a local "
            "directory with config.json, model.safetensors and the tokenizer files"
        )
    path = Path(raw_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.text_encoder.pretrained_path={raw_path!r} is not a directory"
        )
    if (path / "config.json").is_file():
        return path, path
    if (path / "text_encoder" / "config.json").is_file():
        tokenizer_dir = path / "tokenizer"
        return path / "text_encoder", tokenizer_dir if tokenizer_dir.is_dir() else path
    raise FileNotFoundError(
        f"model.text_encoder.pretrained_path={raw_path!r} holds no config.json (nor "
        "text_encoder/config.json): expected a Hugging Face CLIP text model directory"
    )


def _clip_sizes(model_dir: Path) -> dict[str, Any]:
    hf_config = json.loads((model_dir / "config.json").read_text())
    hf_config = hf_config.get("text_config", hf_config)  # a full CLIPModel config nests it
    return dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=hf_config["num_attention_heads"],
        max_position_embeddings=hf_config["max_position_embeddings"],
        hidden_act=hf_config.get("hidden_act", "quick_gelu"),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
    )


def _check_kind(text_cfg) -> str:
    kind = _field(text_cfg, "kind")
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(
            f"model.text_encoder.kind={kind!r} is not supported; use one of {TEXT_ENCODER_KINDS}"
        )
    return kind


def build_tokenizer(text_cfg, workdir: str | Path | None = None) -> HFTokenizer:
    """The tokenizer alone (for data workers): no network, no parameters.

    The demo's "bpe" tokenizer is read from `workdir` (written there by training).
    """
    kind = _check_kind(text_cfg)
    if kind == "demo":
        max_length = int(_field(text_cfg, "max_length"))
        if max_length < 2:
            raise ValueError(f"model.text_encoder.max_length must be >= 2, got {max_length}")
        scheme = _field(text_cfg, "tokenizer", "bytes")
        if scheme not in DEMO_TOKENIZERS:
            raise ValueError(
                f"model.text_encoder.tokenizer={scheme!r} is not one of {DEMO_TOKENIZERS}")
        if scheme == "bpe":
            if workdir is None:
                raise ValueError("model.text_encoder.tokenizer='bpe' needs the workdir that "
                                 f"holds {TOKENIZER_FILE}")
            return load_bpe_tokenizer(workdir, max_length)
        return byte_tokenizer(max_length)

    from transformers import AutoTokenizer

    model_dir, tokenizer_dir = _clip_dirs(text_cfg)
    max_positions = _clip_sizes(model_dir)["max_position_embeddings"]
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    # 0 / None: the tokenizer's own length (77 for CLIP), within the model's positions.
    max_length = _field(text_cfg, "max_length") or min(hf_tokenizer.model_max_length,
                                                       max_positions)
    if max_length > max_positions:
        raise ValueError(
            f"model.text_encoder.max_length={max_length} exceeds the checkpoint's "
            f"max_position_embeddings={max_positions}"
        )
    return HFTokenizer(hf_tokenizer, max_length)


def build_text_encoder(
    text_cfg, *, rngs_seed: int | None = None, dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32, workdir: str | Path | None = None,
) -> tuple[HFTokenizer, CLIPTextTransformer]:
    """(tokenizer, encoder) from the `model.text_encoder` config section.

    kind="demo": byte tokenizer + a CLIP-style transformer from `seed` (or `rngs_seed`), the
    same parameters on every machine. kind="clip": a local Hugging Face directory; its
    config.json fixes the sizes and the size fields of `text_cfg` are ignored.
    """
    tokenizer = build_tokenizer(text_cfg, workdir)
    if _field(text_cfg, "kind") == "clip":
        model_dir, _ = _clip_dirs(text_cfg)
        # Abstract first: a large encoder is never initialised randomly only to be overwritten.
        module = nnx.eval_shape(lambda: CLIPTextTransformer(
            **_clip_sizes(model_dir), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
        load_clip_text_weights(module, model_dir)
        return tokenizer, module

    hidden_size = int(_field(text_cfg, "hidden_size"))
    num_heads = int(_field(text_cfg, "num_attention_heads"))
    if hidden_size % num_heads:
        raise ValueError(
            f"model.text_encoder.hidden_size={hidden_size} must be divisible by "
            f"model.text_encoder.num_attention_heads={num_heads}"
        )
    seed = _field(text_cfg, "seed", 0) if rngs_seed is None else rngs_seed
    module = CLIPTextTransformer(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(_field(text_cfg, "intermediate_size")),
        num_hidden_layers=int(_field(text_cfg, "num_hidden_layers")),
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.max_length,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=nnx.Rngs(int(seed)),
    )
    return tokenizer, module
