"""Bad input: every damaged record is skipped and counted by reason where the consumer sees it;
paths that match nothing are immediate errors naming them."""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipeline import input_pipeline
from data_pipeline.input_pipeline import make_train_iterator
from data_pipeline.records import encode_record
from data_pipeline.shards import TarShardWriter
from data_pipeline.sources import TAR_PATTERNS, expand_paths


def _png(value=90, size=(12, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 3, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(source, paths, **overrides):
    config = ml_collections.ConfigDict({
        "source": source, "paths": str(paths), "image_size": 8, "shuffle_buffer": 0,
        "prefetch": 3, "num_workers": 2, "decode_workers": "threads",
        "caption_json_field": "caption", "empty_captions": "drop", "tar_cycle_length": 1,
        "read_retries": 0, "read_backoff_s": 0.0, "storage_options": "",
    })
    config.update(overrides)
    return config


def _tokenizer(max_length=24):
    from models.text_encoder import byte_tokenizer

    return byte_tokenizer(max_length)


# One shard holding one sample of each kind of damage, in this order; the last one is good so
# that consuming every good example also consumes every bad one.
BAD_SAMPLES = [
    ("good0", {"png": _png(10), "txt": b"a red circle"}),
    ("corrupt", {"png": b"\x89PNG\r\n\x1a\n not really", "txt": b"corrupt bytes"}),
    ("zero", {"png": b"", "txt": b"zero-byte image"}),
    ("tiny", {"png": _png(5, size=(1, 1)), "txt": b"a tracking pixel"}),
    ("elongated", {"png": _png(5, size=(400, 10)), "txt": b"a banner"}),
    ("nocaption", {"png": _png(20)}),
    ("badutf8", {"png": _png(30), "txt": b"\xff\xfe\xfa caption"}),
    ("empty", {"png": _png(40), "txt": b"   "}),
    ("long", {"png": _png(50), "txt": ("a very long caption " * 5).encode()}),
    ("noimage", {"txt": b"a caption without its image"}),
    ("jsononly", {"png": _png(60), "json": b'{"captions": ["from json"]}'}),
    ("good1", {"png": _png(70), "txt": b"a blue square"}),
]


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "bad-00000.tar"
    with TarShardWriter(path) as writer:
        for key, fields in BAD_SAMPLES:
            writer.write(key, fields)
    return path


@pytest.mark.parametrize("policy", ["drop", "unconditional"])
def test_each_kind_of_bad_sample_is_skipped_and_counted(bad_shard, policy):
    config = _config("tar", bad_shard, empty_captions=policy)
    num_good = 5 if policy == "drop" else 7
    with make_train_iterator(config, workdir="", tokenizer=_tokenizer(), batch_size=1,
                             seed=0) as iterator:
        batches = [next(iterator) for _ in range(num_good)]
        counters = iterator.counters()
    keys = [key.split("/")[1] for batch in batches for key in batch["keys"]]
    expected = {"skipped_decode": 1, "skipped_empty": 1, "skipped_too_small": 1,
                "skipped_aspect_ratio": 1,
                "skipped_bad_caption_bytes": 1, "skipped_no_image": 1,
                "truncated_captions": 1, "examples": num_good}
    if policy == "drop":
        assert keys == ["good0", "long", "jsononly", "good1", "good0"]
        expected.update(skipped_no_caption=1, skipped_empty_caption=1)
    else:
        assert keys == ["good0", "nocaption", "empty", "long", "jsononly", "good1", "good0"]
        assert [b["captions"][0] for b in batches[1:3]] == ["", ""]
        expected.update(unconditional_no_caption=1, unconditional_empty_caption=1)
    # The epoch-1 "good0" pulls the next epoch's first sample only: nothing after it counted.
    expected["epochs"] = 1
    assert counters == expected
    assert batches[keys.index("jsononly")]["captions"] == ["from json"]


def test_counters_are_the_consumers_not_the_prefetchers(bad_shard):
    def run(prefetch):
        config = _config("tar", bad_shard, prefetch=prefetch)
        with make_train_iterator(config, workdir="", tokenizer=_tokenizer(), batch_size=1,
                                 seed=0) as iterator:
            return [(next(iterator)["keys"], iterator.counters()) for _ in range(4)]

    assert run(prefetch=4) == run(prefetch=0)


def _truncated_copy(source, target, keep_bytes):
    with open(source, "rb") as handle:
        data = handle.read()
    with open(target, "wb") as handle:
        handle.write(data[:keep_bytes])


def test_truncated_and_zero_byte_shards_are_skipped_and_counted(tmp_path):
    with TarShardWriter(tmp_path / "whole.tar") as writer:
        for index in range(6):
            writer.write(f"w{index}", {"png": _png(index), "txt": f"whole {index}".encode()})
    with TarShardWriter(tmp_path / "full.tar") as writer:
        for index in range(6):
            writer.write(f"c{index}", {"png": _png(index), "txt": f"cut {index}".encode()})
    size = os.path.getsize(tmp_path / "full.tar")
    _truncated_copy(tmp_path / "full.tar", tmp_path / "cut.tar", size // 2)
    os.remove(tmp_path / "full.tar")
    (tmp_path / "zero.tar").write_bytes(b"")
    config = _config("tar", tmp_path)
    with make_train_iterator(config, workdir="", tokenizer=_tokenizer(), batch_size=2,
                             seed=0) as iterator:
        keys = [k.split("/")[0] for _ in range(12) for k in next(iterator)["keys"]]
        counters = iterator.counters()
    assert {"whole.tar", "cut.tar"} == set(keys)
    # Two or more epochs consumed: every shard's damage of the first epoch is counted.
    assert counters["skipped_truncated_shard"] >= 2 and counters["epochs"] >= 1
    per_epoch = keys.count("cut.tar") / max(counters["epochs"], 1)
    assert 0 < per_epoch < 6


def test_a_damaged_array_record_is_skipped_and_counted(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "data.array_record"), "group_size:1")
    for index in range(4):
        writer.write(encode_record(f"k{index}", _png(index), "png", [f"caption {index}"]))
    writer.write(b"\x05\x00\x00\x00{bad")
    writer.close()
    config = _config("arrayrecord", tmp_path / "data.array_record")
    with make_train_iterator(config, workdir="", tokenizer=_tokenizer(), batch_size=4,
                             seed=0) as iterator:
        batches = [next(iterator) for _ in range(3)]
        counters = iterator.counters()
    assert counters["skipped_bad_record"] >= 2 and counters["examples"] == 12
    assert all(len(set(batch["keys"])) == 4 for batch in batches)


def test_data_with_nothing_usable_raises_instead_of_spinning(tmp_path):
    with TarShardWriter(tmp_path / "bad.tar") as writer:
        for index in range(3):
            writer.write(f"k{index}", {"png": b"garbage", "txt": b"caption"})
    config = _config("tar", tmp_path)
    with make_train_iterator(config, workdir="", tokenizer=_tokenizer(), batch_size=2,
                             seed=0) as iterator, pytest.raises(RuntimeError, match="no usable"):
        next(iterator)


def test_paths_that_match_nothing_are_errors_naming_them(tmp_path):
    (tmp_path / "a-00000.tar").write_bytes(b"")
    (tmp_path / "a-00001.tar").write_bytes(b"")
    assert expand_paths(str(tmp_path / "a-{00000..00001}.tar"), patterns=TAR_PATTERNS) == [
        str(tmp_path / "a-00000.tar"), str(tmp_path / "a-00001.tar")]
    assert len(expand_paths(f"{tmp_path}/*.tar,{tmp_path}", patterns=TAR_PATTERNS)) == 4
    for spec, named in [(tmp_path / "missing.tar", "missing.tar"),
                        (f"{tmp_path}/*.nothing", "*.nothing"),
                        (f"{tmp_path}/a-{{00000..00002}}.tar", "a-00002.tar")]:
        with pytest.raises(FileNotFoundError, match=named.replace("*", r"\*")):
            expand_paths(str(spec), patterns=TAR_PATTERNS)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    config = _config("arrayrecord", empty_dir)
    with pytest.raises(FileNotFoundError, match="empty"):
        input_pipeline.check_data_exists(config, "")
    with pytest.raises(ValueError, match="data.paths is empty"):
        input_pipeline.check_data_exists(_config("tar", ""), "")


def test_long_captions_fit_the_tokenizer_and_are_counted(bad_shard):
    tokenizer = _tokenizer(max_length=8)
    config = _config("tar", bad_shard)
    with make_train_iterator(config, workdir="", tokenizer=tokenizer, batch_size=5,
                             seed=0) as iterator:
        batch = next(iterator)
        counters = iterator.counters()
    assert batch["input_ids"].shape == (5, 8)
    np.testing.assert_array_equal(batch["input_ids"], tokenizer(batch["captions"]))
    # "a red circle", "a very long ...", "from json", "a blue square" exceed 8 byte tokens.
    assert counters["truncated_captions"] == sum(len(c.encode()) > 7 for c in batch["captions"])
