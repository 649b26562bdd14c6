"""A tiny random Stable Diffusion pipeline directory, built offline with diffusers' PyTorch classes.

`build_tiny_sd_pipeline(path, version="1.x" | "2.x")` writes the diffusers layout
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) that
`StableDiffusionPipeline.from_pretrained` reads, with the architecture options of the real
releases at toy sizes:

- 1.x: CLIP-L style text encoder (quick_gelu), conv projections in the UNet's transformers,
  one head count for every level, PNDM scheduler, epsilon prediction.
- 2.x: OpenCLIP-H in the Hugging Face CLIP layout (gelu), linear projections, a head width
  per level, DDIM scheduler, v-prediction.

Sizes: images 16x16 -> VAE latents 8x8x4 (VAE factor 2), text width 32, 77 tokens.
Tests that use it skip when torch / diffusers are not installed (`pytest.importorskip`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VERSIONS = ("1.x", "2.x")
IMAGE_SIZE = 16
LATENT_SIZE = 8
LATENT_CHANNELS = 4
TEXT_WIDTH = 32
MAX_LENGTH = 77
# A few merges so tokenization is real BPE (words become one token), not bytes only.
_MERGES = (("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("b", "l"), ("bl", "ue</w>"),
           ("u", "e</w>"))


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair) for pair in _MERGES]
    # The end token last, as in CLIP's vocabulary (the legacy eos_token_id=2 rule pools at
    # the largest id).
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    return vocab_file, merges_file


def tiny_tokenizer(scratch: Path, *, version: str = "1.x"):
    """A transformers `CLIPTokenizer` over a hand-made vocabulary (no download)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _write_tokenizer_files(scratch)
    # SD 2.x's tokenizer pads with "!" (id 0); SD 1.x's with the end token.
    pad = "!" if version == "2.x" else "<|endoftext|>"
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad,
                         model_max_length=MAX_LENGTH)


# Stable Diffusion 1.5's sizes (runwayml/stable-diffusion-v1-5's configs), for
# `build_tiny_sd_pipeline(size="sd15")`: the bench's random full-size pipeline.
SD15_IMAGE_SIZE = 512
_SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12)
_TINY_TEXT = dict(hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)


def tiny_text_encoder(tokenizer, *, version: str = "1.x", sizes: dict | None = None):
    """A tiny random CLIP text model in SD `version`'s layout (2.x: gelu and the tokenizer's own
    end token; 1.x: quick_gelu and end token 2, as SD 1's config states it); `sizes` replaces
    the tiny widths and depths."""
    transformers = pytest.importorskip("transformers")
    sd2 = version == "2.x"
    sizes = sizes or _TINY_TEXT
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        **sizes,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=sizes["hidden_size"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=2 if not sd2 else tokenizer.eos_token_id,
    )
    return transformers.CLIPTextModel(config).eval()


def build_tiny_sd_pipeline(path, *, version: str = "1.x", seed: int = 0,
                           size: str = "tiny") -> Path:
    """Writes a tiny random SD `version` pipeline to `path` (created) and returns it.

    size="sd15": SD 1.5's own sizes instead (859.5M-parameter UNet, 83.7M VAE, CLIP ViT-L/14
    text encoder; 512 px images, 64x64 latents) with random weights and the toy tokenizer, for
    timing fine-tuning where no weights can be downloaded (bench/gpu_figures.py)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if size not in ("tiny", "sd15") or (size == "sd15" and version != "1.x"):
        raise ValueError(f"size must be 'tiny', or 'sd15' with version 1.x, got {size!r}")
    sd2, full = version == "2.x", size == "sd15"
    path = Path(path)
    torch.manual_seed(seed)

    tokenizer = tiny_tokenizer(path / "_tokenizer_src", version=version)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SD15_IMAGE_SIZE // 8 if full else LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 64),
        layers_per_block=2 if full else 1,
        down_block_types=(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",) if full
                          else ("CrossAttnDownBlock2D", "DownBlock2D")),
        up_block_types=(("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 if full
                        else ("UpBlock2D", "CrossAttnUpBlock2D")),
        cross_attention_dim=_SD15_TEXT["hidden_size"] if full else TEXT_WIDTH,
        # 1.x: one head count everywhere; 2.x: per level, as SD 2's (5, 10, 20, 20).
        attention_head_dim=(2, 4) if sd2 else 8 if full else 2,
        use_linear_projection=sd2,
        norm_num_groups=32 if full else 8,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (4 if full else 2),
        up_block_types=("UpDecoderBlock2D",) * (4 if full else 2),
        block_out_channels=(128, 256, 512, 512) if full else (16, 32),
        layers_per_block=2 if full else 1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32 if full else 8,
        sample_size=SD15_IMAGE_SIZE if full else IMAGE_SIZE,
    )
    text_encoder = tiny_text_encoder(tokenizer, version=version,
                                     sizes=_SD15_TEXT if full else None)
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                  clip_sample=False)
    if sd2:
        scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", **common)
    else:
        scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon",
                                            **{k: v for k, v in common.items()
                                               if k != "clip_sample"})
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    for leftover in (path / "_tokenizer_src").iterdir():
        leftover.unlink()
    (path / "_tokenizer_src").rmdir()
    return path
