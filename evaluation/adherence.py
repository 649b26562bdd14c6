"""Prompt adherence for the synthetic shapes demo: does an image show what its prompt asked?

A small CNN reads colour, shape and position off an image. It is a measuring instrument,
trained on real renderings of every colour x shape x position combination (held-out ones
included), with augmentation that mimics what a small diffusion model gets wrong (soft edges,
noise, shifted colours) so generated images are judged on content rather than on style.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from data_pipeline.synthetic import COLOURS, POSITIONS, SHAPES, render, single_scene

ATTRIBUTES = ("colour", "shape", "position")
DEFAULT_WIDTHS = (32, 64, 64)
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
}


def border_colour(images: jax.Array) -> jax.Array:
    """Per-image background estimate: the median colour of the outermost pixel ring."""
    ring = jnp.concatenate(
        [images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )
    return jnp.median(ring, axis=1)[:, None, None, :]


class AttributeClassifier(nnx.Module):
    """Conv features read three ways: pooled (what is there) and coarse-flattened (where).

    The input also carries the difference from the border colour and its magnitude, which
    outline the shape whatever the background; with them and the pooled features, shape is
    learnt in a few hundred steps instead of thousands.
    """

    def __init__(self, image_size: int, *, rngs: nnx.Rngs, widths: Sequence[int] = DEFAULT_WIDTHS):
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.image_size = image_size
        self.widths = tuple(widths)
        first, second, third = self.widths
        self.down1 = nnx.Conv(7, first, (3, 3), strides=2, rngs=rngs)
        self.down2 = nnx.Conv(first, second, (3, 3), strides=2, rngs=rngs)
        self.conv3 = nnx.Conv(second, third, (3, 3), rngs=rngs)
        coarse = image_size // 8
        self.hidden = nnx.Linear(coarse * coarse * third + 2 * third, 128, rngs=rngs)
        self.colour_head = nnx.Linear(128, len(CLASS_NAMES["colour"]), rngs=rngs)
        self.shape_head = nnx.Linear(128, len(CLASS_NAMES["shape"]), rngs=rngs)
        self.position_head = nnx.Linear(128, len(CLASS_NAMES["position"]), rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images: float [N, H, W, 3] in [0, 1]; returns logits per attribute."""
        difference = images - border_colour(images)
        magnitude = jnp.sqrt(jnp.sum(difference**2, axis=-1, keepdims=True) + 1e-6)
        x = jnp.concatenate([images * 2.0 - 1.0, difference * 2.0, magnitude * 2.0], axis=-1)
        for conv in (self.down1, self.down2, self.conv3):
            x = jax.nn.relu(conv(x))
        count, height, width, channels = x.shape
        coarse = x.reshape(count, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
        features = jnp.concatenate(
            [coarse.reshape(count, -1), x.max(axis=(1, 2)), x.mean(axis=(1, 2))], axis=-1
        )
        x = jax.nn.relu(self.hidden(features))
        return {
            "colour": self.colour_head(x),
            "shape": self.shape_head(x),
            "position": self.position_head(x),
        }


def _flat_key(path) -> str:
    return "/".join(map(str, path))


def _classifier_from_arrays(image_size: int, widths: Sequence[int], arrays) -> AttributeClassifier:
    """Build a classifier around given weights without running (and compiling) its initialisers."""
    abstract = nnx.eval_shape(
        lambda: AttributeClassifier(image_size, rngs=nnx.Rngs(0), widths=widths)
    )
    graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    expected = {_flat_key(path): variable.shape for path, variable in flat}
    given = {key: tuple(np.shape(value)) for key, value in arrays.items()}
    if expected != given:
        raise ValueError(f"weights {given} do not fit the classifier, which needs {expected}")
    state = nnx.from_flat_state(
        [(path, variable.replace(jnp.asarray(arrays[_flat_key(path)]))) for path, variable in flat]
    )
    return nnx.merge(graphdef, state)


def _initial_arrays(image_size: int, widths: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """He-normal kernels, zero biases, drawn with numpy: XLA takes seconds to compile jax.random
    initialisers on CPU, longer than the training steps they precede."""
    abstract = nnx.eval_shape(
        lambda: AttributeClassifier(image_size, rngs=nnx.Rngs(0), widths=widths)
    )
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        shape = variable.shape
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            arrays[_flat_key(path)] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            arrays[_flat_key(path)] = np.zeros(shape)
        arrays[_flat_key(path)] = arrays[_flat_key(path)].astype(np.float32)
    return arrays


def render_labelled(num_images: int, image_size: int, rng: np.random.Generator):
    """Real single-shape renderings of uniformly drawn combinations, with integer labels."""
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    labels = {name: np.empty(num_images, np.int32) for name in ATTRIBUTES}
    for index in range(num_images):
        chosen = {name: int(rng.integers(len(CLASS_NAMES[name]))) for name in ATTRIBUTES}
        names = [CLASS_NAMES[name][chosen[name]] for name in ATTRIBUTES]
        images[index] = render(single_scene(*names, rng), image_size, rng)
        for name in ATTRIBUTES:
            labels[name][index] = chosen[name]
    return images, labels


def _blur(images: jax.Array) -> jax.Array:
    """Separable [1, 4, 6, 4, 1] / 16 blur as shifted sums; XLA's CPU depthwise conv is slow."""
    taps = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    rows = sum(tap * padded[:, i : i + height] for i, tap in enumerate(taps))
    return sum(tap * rows[:, :, i : i + width] for i, tap in enumerate(taps))


MAX_SHIFT = 2


def sample_augmentation(rng: np.random.Generator, count: int, image_size: int) -> dict:
    """Random parameters for `augment`, drawn on the host.

    numpy rather than jax.random: XLA compiles threefry slowly on CPU (seconds per program),
    which would cost more than training this classifier.
    """

    def uniform(low, high, shape):
        return rng.uniform(low, high, shape).astype(np.float32)

    return {
        "offsets": rng.integers(0, 2 * MAX_SHIFT + 1, (count, 2)).astype(np.int32),
        "blur": uniform(0.0, 1.0, (count, 1, 1, 1)),
        "saturation": uniform(0.75, 1.2, (count, 1, 1, 1)),
        "gain": uniform(0.9, 1.1, (count, 1, 1, 3)),
        "offset": uniform(-0.06, 0.06, (count, 1, 1, 3)),
        "noise": uniform(0.0, 0.06, (count, 1, 1, 1))
        * rng.standard_normal((count, image_size, image_size, 3), dtype=np.float32),
    }


def augment(images: jax.Array, params: dict) -> jax.Array:
    """Diffusion-like corruption of float [N, H, W, 3] images in [0, 1]: a shift of up to
    MAX_SHIFT pixels, blur, saturation/gain/offset colour changes, and pixel noise.

    Kept mild enough that colour names stay unambiguous: hues move far less than the distance
    between any two demo colours.
    """
    size = images.shape[1]
    # Edge padding rather than wrap-around, so a corner shape never reappears on the far side.
    padded = jnp.pad(images, ((0, 0), (MAX_SHIFT,) * 2, (MAX_SHIFT,) * 2, (0, 0)), mode="edge")
    images = jax.vmap(
        lambda image, offset: jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (size, size, 3)
        )
    )(padded, params["offsets"])
    # Up to one pass of a sigma ~1 px blur: softer than that and a small triangle and circle
    # become the same blob, which no prompt-following model should be blamed for.
    images = images + (_blur(images) - images) * params["blur"]
    grey = images.mean(axis=-1, keepdims=True)
    images = grey + (images - grey) * params["saturation"]
    images = images * params["gain"] + params["offset"] + params["noise"]
    return jnp.clip(images, 0.0, 1.0)


@jax.jit
def _augment_uint8(images_uint8: jax.Array, params: dict) -> jax.Array:
    augmented = augment(images_uint8.astype(jnp.float32) / 255.0, params)
    return jnp.round(augmented * 255.0).astype(jnp.uint8)


def _loss(model: AttributeClassifier, images, labels):
    logits = model(images)
    losses = [
        optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[name]).mean()
        for name in ATTRIBUTES
    ]
    return sum(losses)


@nnx.jit
def _argmax_classes(model: AttributeClassifier, images_uint8: jax.Array) -> dict[str, jax.Array]:
    logits = model(images_uint8.astype(jnp.float32) / 255.0)
    return {name: jnp.argmax(values, axis=-1) for name, values in logits.items()}


def _predict_indices(model: AttributeClassifier, images: np.ndarray) -> dict[str, np.ndarray]:
    images = _as_classifier_input(images, model.image_size)
    count = images.shape[0]
    # Fixed chunk shapes so a stream of odd-sized calls compiles only a few programs.
    chunk = 256 if count >= 256 else max(8, 1 << (count - 1).bit_length())
    outputs = {name: [] for name in ATTRIBUTES}
    for start in range(0, count, chunk):
        block = images[start : start + chunk]
        padded = np.zeros((chunk, *block.shape[1:]), np.uint8)
        padded[: len(block)] = block
        classes = _argmax_classes(model, jnp.asarray(padded))
        for name in ATTRIBUTES:
            outputs[name].append(np.asarray(classes[name])[: len(block)])
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def _as_classifier_input(images, image_size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1:3] == (image_size, image_size):
        return images
    # Other resolutions are judged at the one the classifier learned, resampled the same
    # way the data pipeline resizes.
    return np.stack(
        [
            np.asarray(
                Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
            )
            for image in images
        ]
    )


def _accuracies(predicted: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    correct = {name: predicted[name] == labels[name] for name in ATTRIBUTES}
    all_correct = np.logical_and.reduce([correct[name] for name in ATTRIBUTES])
    result = {"all": float(all_correct.mean())}
    result.update({name: float(correct[name].mean()) for name in ATTRIBUTES})
    return result


def train_attribute_classifier(
    image_size: int = 32,
    *,
    num_train: int = 6000,
    num_test: int = 1000,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> tuple[AttributeClassifier, dict]:
    """Train the classifier on real renderings; test it on fresh ones drawn from another rng.

    metrics: classifier_accuracy (all three attributes right on clean test images), per-attribute
    accuracies, the same on augmented test images, and timings.
    """
    started = time.perf_counter()
    train_rng = np.random.default_rng((seed, 0))
    test_rng = np.random.default_rng((seed, 1))
    train_images, train_labels = render_labelled(num_train, image_size, train_rng)
    test_images, test_labels = render_labelled(num_test, image_size, test_rng)
    render_seconds = time.perf_counter() - started

    model = _classifier_from_arrays(
        image_size, DEFAULT_WIDTHS, _initial_arrays(image_size, DEFAULT_WIDTHS, seed)
    )
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=min(50, steps // 10), decay_steps=steps
    )
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, images_uint8, labels, augmentation):
        images = augment(images_uint8.astype(jnp.float32) / 255.0, augmentation)

        def loss_of(params):
            return _loss(nnx.merge(graphdef, params), images, labels)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch_rng = np.random.default_rng((seed, 2))
    loss = jnp.nan
    for _ in range(steps):
        indices = batch_rng.integers(0, num_train, size=batch_size)
        batch_labels = {name: train_labels[name][indices] for name in ATTRIBUTES}
        augmentation = sample_augmentation(batch_rng, batch_size, image_size)
        params, opt_state, loss = train_step(
            params, opt_state, train_images[indices], batch_labels, augmentation
        )
    model = nnx.merge(graphdef, params)
    train_seconds = time.perf_counter() - started - render_seconds

    clean = _accuracies(_predict_indices(model, test_images), test_labels)
    test_augmentation = sample_augmentation(np.random.default_rng((seed, 3)), num_test, image_size)
    augmented_images = _augment_uint8(jnp.asarray(test_images), test_augmentation)
    augmented = _accuracies(_predict_indices(model, np.asarray(augmented_images)), test_labels)
    metrics = {
        "classifier_accuracy": clean["all"],
        **{f"{name}_accuracy": clean[name] for name in ATTRIBUTES},
        "augmented_accuracy": augmented["all"],
        **{f"augmented_{name}_accuracy": augmented[name] for name in ATTRIBUTES},
        "final_loss": float(loss),
        "num_train": num_train,
        "num_test": num_test,
        "steps": steps,
        "render_seconds": render_seconds,
        "train_seconds": train_seconds,
    }
    return model, metrics


def predict(classifier: AttributeClassifier, images) -> dict[str, np.ndarray]:
    """Attribute names per image: {"colour": [N] str, "shape": ..., "position": ...}."""
    indices = _predict_indices(classifier, images)
    return {name: np.asarray(CLASS_NAMES[name])[indices[name]] for name in ATTRIBUTES}


def adherence_scores(
    classifier: AttributeClassifier, images, expected: Sequence[tuple[str, str, str]]
) -> dict:
    """Fractions of images whose colour / shape / position (and all three) match `expected`."""
    expected = [tuple(triple) for triple in expected]
    images = np.asarray(images)
    if len(expected) != len(images):
        raise ValueError(f"{len(images)} images but {len(expected)} expected triples")
    if not expected:
        raise ValueError("adherence_scores needs at least one image")
    labels = {}
    for position, name in enumerate(ATTRIBUTES):
        lookup = {value: index for index, value in enumerate(CLASS_NAMES[name])}
        unknown = sorted({triple[position] for triple in expected} - set(lookup))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; expected one of {list(lookup)}")
        labels[name] = np.array([lookup[triple[position]] for triple in expected])
    scores = _accuracies(_predict_indices(classifier, images), labels)
    scores["n"] = len(expected)
    return scores


def save_classifier(classifier: AttributeClassifier, path) -> None:
    """Weights and architecture in one .npz, so a demo can skip retraining."""
    arrays = {
        _flat_key(path_parts): np.asarray(variable[...])
        for path_parts, variable in nnx.to_flat_state(nnx.state(classifier))
    }
    config = {
        "image_size": classifier.image_size,
        "widths": list(classifier.widths),
        "class_names": {name: list(CLASS_NAMES[name]) for name in ATTRIBUTES},
    }
    with open(path, "wb") as handle:
        np.savez(handle, __config__=np.array(json.dumps(config)), **arrays)


def load_classifier(path) -> AttributeClassifier:
    with np.load(path) as stored:
        config = json.loads(str(stored["__config__"]))
        arrays = {key: stored[key] for key in stored.files if key != "__config__"}
    saved_names = {name: tuple(values) for name, values in config["class_names"].items()}
    if saved_names != CLASS_NAMES:
        raise ValueError(
            f"{path} was trained for classes {saved_names}, but the demo now uses {CLASS_NAMES}; "
            "retrain it"
        )
    return _classifier_from_arrays(config["image_size"], config["widths"], arrays)
