import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shards import iter_tar_samples
from data_pipeline.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_HELD_OUT,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeSpec,
    all_combinations,
    caption,
    prompt_for,
    random_scene,
    render,
    single_scene,
    write_synthetic_shards,
)


def _digest(paths):
    return [hashlib.sha256(open(path, "rb").read()).hexdigest() for path in paths]


def _samples(out_dir):
    samples = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            samples.extend(iter_tar_samples(os.path.join(out_dir, name)))
    return samples


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(out_dir, num_samples=600, num_shards=3, seed=7, progress=False)
    return out_dir


def test_attribute_vocabularies():
    assert SHAPES == ("circle", "square", "triangle")
    assert len(COLOURS) == 6 and len(set(COLOURS.values())) == 6
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}
    assert len(BACKGROUNDS) >= 4
    for rgb in BACKGROUNDS.values():
        assert max(rgb) - min(rgb) < 60, "backgrounds must stay unsaturated"


@pytest.mark.parametrize("image_size", [32, 48])
def test_render_size_dtype_and_determinism(image_size):
    scene = random_scene(np.random.default_rng(0), two_shape_prob=1.0)
    first = render(scene, image_size, np.random.default_rng(1))
    again = render(scene, image_size, np.random.default_rng(1))
    other = render(scene, image_size, np.random.default_rng(2))
    assert first.shape == (image_size, image_size, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(render(scene, image_size), render(scene, image_size))


def _covered_area(pixels, region, centre):
    """Antialiased area of the shape centred at `centre` that lies inside `region`, in pixels.

    Projects each pixel onto the line from the background colour (border median) to the
    shape's own colour (read at its centre), so colour jitter and noise cancel out.
    """
    pixels = pixels.astype(np.float64)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(ring, axis=0)
    row, col = centre
    shape_colour = pixels[row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3).mean(axis=0)
    direction = shape_colour - background
    rows, cols = region
    projected = (pixels[rows, cols] - background) @ direction / (direction @ direction)
    return float(projected.sum())


def test_shapes_stay_inside_and_never_overlap():
    # Each corner shape must lie wholly inside its own quadrant of the image: then its full area
    # is found there only if it is neither clipped by the border nor reaching its neighbour.
    # The 10% tolerance covers PIL snapping the 4x canvas box to whole pixels.
    image_size, size = 32, 0.42
    half = image_size // 2
    quadrants = {
        "top left": (slice(0, half), slice(0, half)),
        "top right": (slice(0, half), slice(half, None)),
        "bottom left": (slice(half, None), slice(0, half)),
        "bottom right": (slice(half, None), slice(half, None)),
        "center": (slice(None), slice(None)),
    }
    expected = (size * image_size) ** 2
    corners = list(quadrants)[:4]
    for trial in range(30):
        rng = np.random.default_rng(trial)
        first, second = (str(p) for p in rng.choice(corners, size=2, replace=False))
        for positions in ([first, second], ["center"]):
            specs = tuple(
                ShapeSpec(colour, "square", position, size)
                for colour, position in zip(("red", "blue"), positions, strict=False)
            )
            pixels = render(Scene(specs, "grey"), image_size, rng)
            for position in positions:
                fx, fy = POSITIONS[position]
                centre = (round(fy * image_size), round(fx * image_size))
                area = _covered_area(pixels, quadrants[position], centre)
                assert area == pytest.approx(expected, rel=0.1), (trial, positions, position)


def test_random_scenes_use_only_allowed_values():
    rng = np.random.default_rng(0)
    held_out = set(DEFAULT_HELD_OUT)
    two_shape = 0
    for _ in range(500):
        scene = random_scene(rng, two_shape_prob=0.3)
        assert scene.background in BACKGROUNDS
        positions = [spec.position for spec in scene.shapes]
        assert len(set(positions)) == len(positions)
        two_shape += len(scene.shapes) == 2
        for spec in scene.shapes:
            assert (spec.colour, spec.shape) not in held_out
            assert spec.position in POSITIONS and 0.28 <= spec.size <= 0.42
    assert 100 < two_shape < 200


def test_bad_held_out_is_rejected():
    with pytest.raises(ValueError, match="magenta"):
        random_scene(np.random.default_rng(0), held_out=(("magenta", "circle"),))
    every_circle = tuple((colour, "circle") for colour in COLOURS)
    with pytest.raises(ValueError, match="circle"):
        all_combinations(every_circle)


def test_single_scene_and_prompts():
    scene = single_scene("blue", "circle", "center", np.random.default_rng(0))
    assert len(scene.shapes) == 1
    assert (scene.shapes[0].colour, scene.shapes[0].shape) == ("blue", "circle")
    assert prompt_for("red", "circle", "top left") == "a red circle in the top left"
    assert prompt_for("red", "circle", "center") == "a red circle in the center"
    with pytest.raises(ValueError):
        single_scene("red", "hexagon", "center", np.random.default_rng(0))


def test_all_combinations_split():
    held_in, held_out = all_combinations()
    assert len(held_in) + len(held_out) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    assert len(held_out) == len(DEFAULT_HELD_OUT) * len(POSITIONS)
    assert not set(held_in) & set(held_out)
    assert {(c, s) for c, s, _ in held_out} == set(DEFAULT_HELD_OUT)
    assert {c for c, _, _ in held_in} == set(COLOURS)
    assert {s for _, s, _ in held_in} == set(SHAPES)


def test_captions_vary_and_name_every_attribute():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        scene = random_scene(rng, two_shape_prob=0.3)
        text = caption(scene, rng)
        seen.add(text.replace(scene.shapes[0].colour, "C"))
        for spec in scene.shapes:
            assert spec.colour in text and spec.shape in text and spec.position in text
    assert len(seen) > 20


def test_shards_are_deterministic_for_a_seed(tmp_path):
    kwargs = dict(num_samples=40, num_shards=2, progress=False)
    first = write_synthetic_shards(tmp_path / "a", seed=1, **kwargs)
    again = write_synthetic_shards(tmp_path / "b", seed=1, **kwargs)
    other = write_synthetic_shards(tmp_path / "c", seed=2, **kwargs)
    assert [os.path.basename(p) for p in first] == ["shard-00000.tar", "shard-00001.tar"]
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)


def test_parallel_writers_give_the_same_shards(tmp_path):
    kwargs = dict(num_samples=60, num_shards=3, seed=3, progress=False)
    serial = write_synthetic_shards(tmp_path / "serial", num_workers=1, **kwargs)
    parallel = write_synthetic_shards(tmp_path / "parallel", num_workers=2, **kwargs)
    assert [os.path.basename(p) for p in parallel] == [os.path.basename(p) for p in serial]
    assert _digest(parallel) == _digest(serial)
    with pytest.raises(ValueError, match="num_workers"):
        write_synthetic_shards(tmp_path / "bad", num_workers=0, **kwargs)


def test_shard_contents(shard_dir):
    samples = _samples(shard_dir)
    assert len(samples) == 600
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(600)]
    info = json.loads((shard_dir / "dataset_info.json").read_text())
    assert info["num_samples"] == 600 and info["image_size"] == 32 and info["seed"] == 7
    assert [tuple(pair) for pair in info["held_out"]] == list(DEFAULT_HELD_OUT)

    held_out = set(DEFAULT_HELD_OUT)
    colours, shapes = set(), set()
    for sample in samples:
        metadata = json.loads(sample["json"])
        text = sample["txt"].decode()
        assert metadata["caption"] == text and metadata["key"] == sample["__key__"]
        assert (metadata["width"], metadata["height"]) == (32, 32)
        assert 1 <= len(metadata["shapes"]) <= 2
        for spec in metadata["shapes"]:
            assert (spec["colour"], spec["shape"]) not in held_out
            assert spec["colour"] in text and spec["shape"] in text
            assert spec["position"] in text
            colours.add(spec["colour"])
            shapes.add(spec["shape"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (32, 32) and image.mode == "RGB"
    assert colours == set(COLOURS) and shapes == set(SHAPES)


def test_max_caption_bytes_bounds_every_caption():
    from data_pipeline.synthetic import caption, max_caption_bytes, random_scene

    rng = np.random.default_rng(5)
    lengths = [len(caption(random_scene(rng, two_shape_prob=0.5), rng).encode())
               for _ in range(3000)]
    assert max(lengths) <= max_caption_bytes()
    # The bound is tight enough to size a tokenizer by: real captions come close to it.
    assert max(lengths) >= max_caption_bytes() - 12
