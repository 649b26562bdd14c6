"""Synthetic captioned shapes: the demo's training data and the adherence test's ground truth.

Each image holds one or two coloured shapes at named positions on a plain, slightly noisy
background. Colours are far apart in hue and backgrounds are unsaturated, so colour stays
readable after a small diffusion model blurs it. Some colour x shape combinations are held
out of training so the demo can ask whether a model composes attributes it saw separately.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import itertools
import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.records import encode_record
from data_pipeline.shards import TarShardWriter

SHAPES = ("circle", "square", "triangle")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 70, 235),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 200),
    "cyan": (20, 205, 215),
}

POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.26, 0.26),
    "top right": (0.74, 0.26),
    "bottom left": (0.26, 0.74),
    "bottom right": (0.74, 0.74),
    "center": (0.5, 0.5),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "white": (242, 242, 242),
    "grey": (128, 128, 128),
    "dark grey": (62, 62, 62),
    "beige": (222, 205, 172),
}

DEFAULT_HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

SIZE_RANGE = (0.28, 0.42)
# Jitter bounds are fractions of the image side; corner centres sit at 0.26 so the largest
# shape plus the largest jitter still fits, and render() clamps anyway.
POSITION_JITTER = 0.03
COLOUR_JITTER = 12
BACKGROUND_JITTER = 10
NOISE_STD = 3.0
_SUPERSAMPLE = 4
# Two-shape scenes use corners only: a centre shape next to a corner shape would have to be tiny
# to be guaranteed not to overlap it, and tiny shapes stop being recognisable at 32x32.
_CORNERS = ("top left", "top right", "bottom left", "bottom right")
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_POSITION_NAMES = tuple(POSITIONS)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str


def _check_held_out(held_out: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = tuple((colour, shape) for colour, shape in held_out)
    _validate_held_out(pairs)
    return pairs


@functools.cache
def _validate_held_out(pairs: tuple[tuple[str, str], ...]) -> None:
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"held-out combo ({colour!r}, {shape!r}) must use a colour from "
                f"{list(COLOURS)} and a shape from {list(SHAPES)}"
            )
    allowed = _allowed_pairs(pairs)
    missing_colours = set(COLOURS) - {colour for colour, _ in allowed}
    missing_shapes = set(SHAPES) - {shape for _, shape in allowed}
    if missing_colours or missing_shapes:
        raise ValueError(
            f"held_out={pairs} removes every training example of "
            f"{sorted(missing_colours | missing_shapes)}"
        )


@functools.cache
def _allowed_pairs(held_out: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(pair for pair in itertools.product(COLOURS, SHAPES) if pair not in set(held_out))


def _random_size(rng: np.random.Generator) -> float:
    return round(float(rng.uniform(*SIZE_RANGE)), 4)


def single_scene(colour: str, shape: str, position: str, rng: np.random.Generator) -> Scene:
    """One named shape with a random size and background."""
    if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(
            f"unknown attribute in ({colour!r}, {shape!r}, {position!r}); colours {list(COLOURS)}, "
            f"shapes {list(SHAPES)}, positions {list(POSITIONS)}"
        )
    background = _BACKGROUND_NAMES[rng.integers(len(_BACKGROUND_NAMES))]
    return Scene((ShapeSpec(colour, shape, position, _random_size(rng)),), background)


def random_scene(
    rng: np.random.Generator,
    *,
    held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT,
    two_shape_prob: float = 0.2,
) -> Scene:
    """A training scene: one shape, or with probability two_shape_prob two shapes in two corners.

    No shape uses a held-out (colour, shape) combination.
    """
    allowed = _allowed_pairs(_check_held_out(held_out))
    background = _BACKGROUND_NAMES[rng.integers(len(_BACKGROUND_NAMES))]
    if rng.random() < two_shape_prob:
        first, second = rng.choice(len(allowed), size=2, replace=False)
        corners = rng.choice(len(_CORNERS), size=2, replace=False)
        shapes = tuple(
            ShapeSpec(*allowed[pair], _CORNERS[corner], _random_size(rng))
            for pair, corner in ((first, corners[0]), (second, corners[1]))
        )
    else:
        colour, shape = allowed[rng.integers(len(allowed))]
        position = _POSITION_NAMES[rng.integers(len(_POSITION_NAMES))]
        shapes = (ShapeSpec(colour, shape, position, _random_size(rng)),)
    return Scene(shapes, background)


def _jittered_rgb(base: tuple[int, int, int], amount: int, rng: np.random.Generator | None):
    if rng is None:
        return base
    offsets = rng.integers(-amount, amount + 1, size=3).tolist()
    jittered = (value + offset for value, offset in zip(base, offsets, strict=True))
    return tuple(min(max(value, 0), 255) for value in jittered)


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, canvas: int, rng) -> None:
    side = spec.size * canvas
    half = side / 2
    fx, fy = POSITIONS[spec.position]
    cx, cy = fx * canvas, fy * canvas
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * canvas
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * canvas
    cx = min(max(cx, half), canvas - half)
    cy = min(max(cy, half), canvas - half)
    fill = _jittered_rgb(COLOURS[spec.colour], COLOUR_JITTER, rng)
    # PIL includes the right/bottom edge pixels of a box, so it ends one canvas pixel early.
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None):
    """Draw a scene as uint8 [H, W, 3].

    With an rng, position/colour/background jitter and pixel noise are drawn from it (same rng
    state, same image); without one the image is the clean, centred rendering.
    """
    canvas = image_size * _SUPERSAMPLE
    background = _jittered_rgb(BACKGROUNDS[scene.background], BACKGROUND_JITTER, rng)
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        _draw_shape(draw, spec, canvas, rng)
    # Drawing large and box-filtering down gives antialiased edges, which keeps small
    # triangles and circles recognisable at 32x32.
    pixels = np.asarray(image.reduce(_SUPERSAMPLE))
    if rng is not None:
        noise = rng.normal(0.0, NOISE_STD, size=pixels.shape)
        pixels = np.clip(pixels + noise, 0, 255).round().astype(np.uint8)
    return pixels


def _position_phrase(position: str, corner_word: bool = False) -> str:
    if position == "center":
        return "in the center"
    return f"in the {position} corner" if corner_word else f"in the {position}"


def prompt_for(colour: str, shape: str, position: str) -> str:
    """The canonical prompt, e.g. "a red circle in the top left"."""
    return f"a {colour} {shape} {_position_phrase(position)}"


def _single_caption(spec: ShapeSpec, background: str, template: int) -> str:
    thing = f"a {spec.colour} {spec.shape}"
    if template == 0:
        return f"{thing} {_position_phrase(spec.position)}"
    if template == 1:
        return f"{spec.position}: {thing} on a {background} background"
    if template == 2:
        return f"{thing}, {spec.position}"
    if template == 3:
        return f"a picture of {thing} {_position_phrase(spec.position, corner_word=True)}"
    return f"{thing} {_position_phrase(spec.position)} on a {background} background"


_NUM_SINGLE_TEMPLATES = 5


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from a randomly chosen template; every one names colour, shape and position."""
    if len(scene.shapes) == 1:
        template = int(rng.integers(_NUM_SINGLE_TEMPLATES))
        return _single_caption(scene.shapes[0], scene.background, template)
    parts = [f"a {s.colour} {s.shape} {_position_phrase(s.position)}" for s in scene.shapes]
    joined = " and ".join(parts)
    if rng.random() < 0.5:
        return joined
    return f"{joined} on a {scene.background} background"


def sample_captions(num: int, *, seed: int = 0, two_shape_prob: float = 0.05,
                    held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT) -> list[str]:
    """`num` training captions as the shards would hold them (no images drawn)."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng, held_out=held_out, two_shape_prob=two_shape_prob), rng)
            for _ in range(num)]


def max_caption_bytes() -> int:
    """The longest caption `caption()` can write, in UTF-8 bytes (a byte tokenizer's tokens).

    A tokenizer shorter than this (plus its end token) would cut positions and backgrounds
    off the ends of captions, and the model could never learn them.
    """
    longest = 0
    for colour, shape, position, background in itertools.product(
        COLOURS, SHAPES, POSITIONS, BACKGROUNDS
    ):
        spec = ShapeSpec(colour, shape, position, SIZE_RANGE[1])
        for template in range(_NUM_SINGLE_TEMPLATES):
            longest = max(longest, len(_single_caption(spec, background, template).encode()))
    # Two shapes: the two longest "a <colour> <shape> in the <corner>" phrases and the longest
    # background.
    phrases = sorted(
        len(f"a {c} {s} {_position_phrase(p)}".encode())
        for c, s, p in itertools.product(COLOURS, SHAPES, _CORNERS)
    )
    background = max(len(f" on a {b} background".encode()) for b in BACKGROUNDS)
    return max(longest, phrases[-1] + phrases[-2] + len(" and ") + background)


def all_combinations(
    held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """All (colour, shape, position) triples, split into (held_in, held_out)."""
    held_out_pairs = set(_check_held_out(held_out))
    held_in, held_back = [], []
    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        target = held_back if (colour, shape) in held_out_pairs else held_in
        target.append((colour, shape, position))
    return held_in, held_back


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: the images are tiny and PNG zlib effort dominates write time otherwise.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def synthetic_sample(index: int, *, seed: int, image_size: int, held_out, two_shape_prob: float):
    """Scene, caption and pixels of sample `index`; a function of (seed, index) alone."""
    rng = np.random.default_rng((seed, index))
    scene = random_scene(rng, held_out=held_out, two_shape_prob=two_shape_prob)
    text = caption(scene, rng)
    pixels = render(scene, image_size, rng)
    return scene, text, pixels


# Below this many samples, writing in one process beats starting worker processes.
PARALLEL_MIN_SAMPLES = 5000


def _sample_fields(index: int, *, seed: int, image_size: int, held_out, two_shape_prob: float):
    """(key, png bytes, caption, metadata) of sample `index`, as both shard formats store it."""
    scene, text, pixels = synthetic_sample(
        index, seed=seed, image_size=image_size, held_out=held_out, two_shape_prob=two_shape_prob,
    )
    key = f"{index:09d}"
    metadata = {
        "key": key,
        "caption": text,
        "background": scene.background,
        "shapes": [
            {"colour": s.colour, "shape": s.shape, "position": s.position, "size": s.size}
            for s in scene.shapes
        ],
        "width": image_size,
        "height": image_size,
    }
    return key, _png_bytes(pixels), text, metadata


def _write_shard(path: str, start: int, stop: int, *, seed: int, image_size: int, held_out,
                 two_shape_prob: float, on_sample=None) -> int:
    """Write samples [start, stop) to the tar at `path`; returns how many were written.
    `on_sample()` (in-process writing only) is called after each sample."""
    with TarShardWriter(path) as writer:
        for index in range(start, stop):
            key, png, text, metadata = _sample_fields(
                index, seed=seed, image_size=image_size, held_out=held_out,
                two_shape_prob=two_shape_prob,
            )
            writer.write(
                key,
                {"png": png, "txt": text.encode("utf-8"), "json": json.dumps(metadata).encode()},
            )
            if on_sample is not None:
                on_sample()
    return stop - start


def _write_record_shard(path: str, start: int, stop: int, *, seed: int, image_size: int,
                        held_out, two_shape_prob: float, on_sample=None) -> int:
    """Write samples [start, stop) as ArrayRecord records (data_pipeline.records' format); the
    file appears under its final name only once complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp_path = path + ".incomplete"
    # group_size:1 makes every record its own chunk: random reads decompress one record only.
    writer = ArrayRecordWriter(tmp_path, "group_size:1")
    try:
        for index in range(start, stop):
            key, png, text, metadata = _sample_fields(
                index, seed=seed, image_size=image_size, held_out=held_out,
                two_shape_prob=two_shape_prob,
            )
            del metadata["caption"], metadata["key"]
            writer.write(encode_record(key, png, "png", [text], metadata))
            if on_sample is not None:
                on_sample()
    finally:
        writer.close()
    os.replace(tmp_path, path)
    return stop - start


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    *,
    num_samples: int,
    num_shards: int,
    image_size: int = 32,
    seed: int = 0,
    held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT,
    two_shape_prob: float = 0.2,
    progress: bool = True,
    num_workers: int | None = None,
    file_format: str = "tar",
) -> list[str]:
    """Write `num_samples` captioned images as `out_dir/shard-00000.tar`, ... (file_format
    "tar") or `out_dir/synthetic-00000-of-00016.array_record`, ... ("array_record", one
    data_pipeline.records record per image); return the paths.

    Sample i is drawn from rng (seed, i) alone, so the shards are byte-identical for a seed
    whatever `num_workers` is. `num_workers` processes write whole shards in parallel; 1 writes
    in this process. The default is one per CPU core (at most one per shard) from
    PARALLEL_MIN_SAMPLES samples on, else 1. Workers are spawned, so each imports the calling
    script's main module: keep heavy imports of a script that calls this inside its main().
    """
    from tqdm.auto import tqdm

    if num_samples < 1 or num_shards < 1:
        raise ValueError(f"num_samples ({num_samples}) and num_shards ({num_shards}) must be >= 1")
    if num_shards > num_samples:
        raise ValueError(f"num_shards ({num_shards}) exceeds num_samples ({num_samples})")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers ({num_workers}) must be >= 1")
    held_out = _check_held_out(held_out)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    bounds = np.linspace(0, num_samples, num_shards + 1).round().astype(int)
    if file_format == "tar":
        paths = [os.path.join(out_dir, f"shard-{i:05d}.tar") for i in range(num_shards)]
        write_one = _write_shard
    elif file_format == "array_record":
        paths = [os.path.join(out_dir, f"synthetic-{i:05d}-of-{num_shards:05d}.array_record")
                 for i in range(num_shards)]
        write_one = _write_record_shard
    else:
        raise ValueError(f"file_format {file_format!r} must be 'tar' or 'array_record'")
    jobs = [(paths[i], int(bounds[i]), int(bounds[i + 1])) for i in range(num_shards)]
    options = dict(seed=seed, image_size=image_size, held_out=held_out,
                   two_shape_prob=two_shape_prob)
    if num_workers is None:
        num_workers = (os.cpu_count() or 1) if num_samples >= PARALLEL_MIN_SAMPLES else 1
    workers = min(num_workers, num_shards)
    with tqdm(total=num_samples, desc="synthetic shards", unit="img", disable=not progress) as bar:
        if workers == 1:
            for path, start, stop in jobs:
                write_one(path, start, stop, **options, on_sample=lambda: bar.update(1))
        else:
            # "spawn": the caller may already run JAX's threads, which a fork would copy mid-state.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(write_one, *job, **options) for job in jobs]
                for future in concurrent.futures.as_completed(futures):
                    bar.update(future.result())
    info = {
        "num_samples": num_samples,
        "num_shards": num_shards,
        "image_size": image_size,
        "held_out": [list(pair) for pair in held_out],
        "seed": seed,
        "two_shape_prob": two_shape_prob,
        "shards": [os.path.basename(path) for path in paths],
        "format": file_format,
    }
    with open(os.path.join(out_dir, "dataset_info.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    return paths
