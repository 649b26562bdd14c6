import numpy as np
import pytest

from data_pipeline.synthetic import COLOURS, all_combinations, render, single_scene
from evaluation.adherence import (
    adherence_scores,
    load_classifier,
    predict,
    save_classifier,
    train_attribute_classifier,
)


@pytest.fixture(scope="module")
def trained():
    # A shorter run than the default (600 steps, 6000 images): enough for >= 0.98 on every
    # seed tried, at about a third of the cost.
    return train_attribute_classifier(num_train=3000, num_test=500, steps=350, seed=0)


def _real_images(triples, seed, image_size=32):
    rng = np.random.default_rng(seed)
    return np.stack([render(single_scene(*t, rng), image_size, rng) for t in triples])


@pytest.fixture(scope="module")
def every_combination():
    held_in, held_out = all_combinations()
    triples = (held_in + held_out) * 2
    return triples, _real_images(triples, seed=123)


def test_classifier_is_accurate_on_real_images(trained):
    _, metrics = trained
    assert metrics["classifier_accuracy"] >= 0.98
    for name in ("colour", "shape", "position"):
        assert metrics[f"{name}_accuracy"] >= metrics["classifier_accuracy"]
    assert metrics["augmented_accuracy"] >= 0.9


def test_predict_names(trained, every_combination):
    classifier, _ = trained
    triples, images = every_combination
    predicted = predict(classifier, images[:5])
    assert set(predicted) == {"colour", "shape", "position"}
    assert all(len(values) == 5 for values in predicted.values())
    assert set(predicted["colour"]) <= set(COLOURS)


def test_scores_for_right_and_wrong_expectations(trained, every_combination):
    classifier, _ = trained
    triples, images = every_combination
    right = adherence_scores(classifier, images, triples)
    assert right["n"] == len(triples)
    assert right["all"] >= 0.97 and min(right["colour"], right["shape"], right["position"]) >= 0.97

    colours = list(COLOURS)
    wrong_colour = [(colours[(colours.index(c) + 1) % 6], s, p) for c, s, p in triples]
    scores = adherence_scores(classifier, images, wrong_colour)
    assert scores["colour"] <= 0.05 and scores["all"] <= 0.05
    assert scores["shape"] >= 0.97 and scores["position"] >= 0.97

    half_wrong = wrong_colour[: len(triples) // 2] + triples[len(triples) // 2 :]
    scores = adherence_scores(classifier, images, half_wrong)
    assert scores["all"] == pytest.approx(0.5, abs=0.05)

    shuffled = [triples[i] for i in np.random.default_rng(0).permutation(len(triples))]
    assert adherence_scores(classifier, images, shuffled)["all"] <= 0.1


def test_other_resolutions_are_resampled(trained):
    classifier, _ = trained
    triples = all_combinations()[0][:30]
    scores = adherence_scores(classifier, _real_images(triples, seed=5, image_size=64), triples)
    assert scores["all"] >= 0.9


def test_bad_inputs_are_rejected(trained, every_combination):
    classifier, _ = trained
    triples, images = every_combination
    with pytest.raises(ValueError, match="expected"):
        adherence_scores(classifier, images[:3], triples[:2])
    with pytest.raises(ValueError, match="magenta"):
        adherence_scores(classifier, images[:1], [("magenta", "circle", "center")])
    with pytest.raises(ValueError, match="uint8"):
        predict(classifier, images.astype(np.float32))


def test_save_and_load_round_trip(trained, every_combination, tmp_path):
    classifier, _ = trained
    _, images = every_combination
    path = tmp_path / "classifier.npz"
    save_classifier(classifier, path)
    restored = load_classifier(path)
    for name, values in predict(classifier, images).items():
        np.testing.assert_array_equal(predict(restored, images)[name], values)
