"""TFDS through tfds.data_source (no TensorFlow): a tiny dataset built on disk by the test."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipeline import input_pipeline  # noqa: E402
from data_pipeline.input_pipeline import make_train_iterator  # noqa: E402

NUM_EXAMPLES = 24


class TinyCaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Images stored as PNG bytes (encoding arrays would need TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "text": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(NUM_EXAMPLES):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 10), (index * 10, 0, 0)).save(buffer, format="PNG")
            buffer.seek(0)
            yield f"{index:03d}", {"picture": buffer, "text": f"shape number {index}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    TinyCaptionedShapes(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def _config(data_dir, **overrides):
    config = ml_collections.ConfigDict({
        "source": "tfds", "paths": "", "tfds_name": "tiny_captioned_shapes",
        "tfds_split": "train", "tfds_data_dir": data_dir, "image_feature": "picture",
        "caption_feature": "text", "image_size": 8, "prefetch": 2, "num_workers": 2,
        "decode_workers": "threads", "caption_json_field": "caption", "empty_captions": "drop",
    })
    config.update(overrides)
    return config


def _tokenizer(captions):
    return np.zeros((len(captions), 4), np.int32)


def _iterator(config):
    return make_train_iterator(config, workdir="", tokenizer=_tokenizer, batch_size=8, seed=5)


def test_tfds_examples_decode_with_their_captions(data_dir):
    with _iterator(_config(data_dir)) as iterator:
        batches = [next(iterator) for _ in range(3)]
    keys = [key for batch in batches for key in batch["keys"]]
    assert sorted(int(key.rsplit("/", 1)[1]) for key in keys) == list(range(NUM_EXAMPLES))
    for batch in batches:
        for caption, image in zip(batch["captions"], batch["images"], strict=True):
            number = int(caption.rsplit(" ", 1)[1])
            assert abs(int(image[4, 4, 0]) - number * 10) <= 1


@pytest.mark.parametrize("stop_after", [2, 3, 4])  # mid-epoch, at the epoch end, after it
def test_tfds_resume_continues_exactly(data_dir, stop_after):
    config = _config(data_dir)
    with _iterator(config) as iterator:
        expected = [next(iterator)["keys"] for _ in range(7)]
    with _iterator(config) as iterator:
        for _ in range(stop_after):
            next(iterator)
        state = iterator.get_state()
    with _iterator(config) as resumed:
        resumed.set_state(state)
        assert [next(resumed)["keys"] for _ in range(7 - stop_after)] == expected[stop_after:]


def test_tfds_captions_for_the_tokenizer(data_dir):
    captions = input_pipeline.read_captions(_config(data_dir), 5)
    assert len(captions) == 5 and all(c.startswith("shape number ") for c in captions)


def test_unknown_tfds_names_features_and_splits_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="'no_such_captions'"):
        input_pipeline.check_data_exists(_config(data_dir, tfds_name="no_such_captions"), "")
    with pytest.raises(ValueError, match="image_feature='image'"):
        input_pipeline.check_data_exists(_config(data_dir, image_feature="image"), "")
    with pytest.raises(ValueError, match="tfds_split='test'"):
        input_pipeline.check_data_exists(_config(data_dir, tfds_split="test"), "")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        input_pipeline.check_data_exists(_config(str(tmp_path)), "")
