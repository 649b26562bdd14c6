import io
import json
import logging
import threading

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import decode_image
from data_pipeline.pipeline import (
    PipelineStats,
    choose_caption,
    make_train_iterator,
)
from data_pipeline.shards import TarShardWriter
from data_pipeline.synthetic import write_synthetic_shards

MAX_LENGTH = 24


def byte_tokenizer(captions):
    ids = np.zeros((len(captions), MAX_LENGTH), np.int32)
    for row, text in enumerate(captions):
        encoded = list(text.encode("utf-8"))[:MAX_LENGTH]
        ids[row, : len(encoded)] = encoded
    return ids


def _png(colour, size=(32, 32)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_numbered_shards(directory, num_shards, per_shard):
    """Shards whose captions name each sample, so tests can see exactly what was read."""
    paths = []
    for shard in range(num_shards):
        path = directory / f"shard-{shard:05d}.tar"
        with TarShardWriter(path) as writer:
            for item in range(per_shard):
                index = shard * per_shard + item
                writer.write(
                    f"{index:09d}",
                    {"png": _png((index % 256, 0, 0)), "txt": f"sample {index}".encode()},
                )
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic_shards")
    write_synthetic_shards(out_dir, num_samples=240, num_shards=4, seed=0, progress=False)
    return out_dir


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _iterator(shards, **overrides):
    kwargs = dict(batch_size=8, image_size=32, tokenizer=byte_tokenizer, seed=0, shuffle_buffer=50)
    kwargs.update(overrides)
    return make_train_iterator(shards, **kwargs)


def test_batch_shapes_and_dtypes(synthetic_dir):
    with _iterator(str(synthetic_dir), image_size=16) as iterator:
        batch = next(iterator)
    assert batch["images"].shape == (8, 16, 16, 3) and batch["images"].dtype == np.uint8
    assert batch["input_ids"].shape == (8, MAX_LENGTH) and batch["input_ids"].dtype == np.int32
    assert len(batch["captions"]) == 8 and all(isinstance(c, str) for c in batch["captions"])
    np.testing.assert_array_equal(batch["input_ids"], byte_tokenizer(batch["captions"]))


def test_same_seed_same_batches_with_or_without_prefetch(synthetic_dir):
    # 40 batches of 8 cover more than one epoch of 240 samples.
    with _iterator(str(synthetic_dir), prefetch=0) as plain, _iterator(str(synthetic_dir)) as ahead:
        for first, second in zip(_take(plain, 40), _take(ahead, 40), strict=True):
            np.testing.assert_array_equal(first["images"], second["images"])
            assert first["captions"] == second["captions"]
        assert plain.stats.epochs >= 1


def test_other_seed_other_order(synthetic_dir):
    with _iterator(str(synthetic_dir)) as first, _iterator(str(synthetic_dir), seed=1) as other:
        assert [b["captions"] for b in _take(first, 3)] != [b["captions"] for b in _take(other, 3)]


def test_epochs_reshuffle_and_cover_every_sample(tmp_path):
    shards = _write_numbered_shards(tmp_path, num_shards=3, per_shard=10)
    with _iterator(shards, batch_size=5, shuffle_buffer=8, prefetch=0) as iterator:
        first_epoch = sum((b["captions"] for b in _take(iterator, 6)), [])
        second_epoch = sum((b["captions"] for b in _take(iterator, 6)), [])
    assert first_epoch != second_epoch
    everything = first_epoch + second_epoch
    assert {f"sample {i}" for i in range(30)} <= set(everything)


def test_hosts_read_disjoint_shards_that_cover_all(tmp_path):
    shards = _write_numbered_shards(tmp_path, num_shards=5, per_shard=4)
    seen = []
    for host in range(2):
        with _iterator(
            shards, process_index=host, process_count=2, batch_size=1, shuffle_buffer=0, prefetch=0
        ) as iterator:
            mine = iterator.host_shards(epoch=0)
            captions = [next(iterator)["captions"][0] for _ in range(4 * len(mine))]
            assert iterator.stats.epochs == 0
            seen.append((set(mine), set(captions)))
    (shards_a, captions_a), (shards_b, captions_b) = seen
    assert not shards_a & shards_b and shards_a | shards_b == set(shards)
    assert not captions_a & captions_b
    assert captions_a | captions_b == {f"sample {i}" for i in range(20)}


def test_more_hosts_than_shards_is_an_error(tmp_path):
    shards = _write_numbered_shards(tmp_path, num_shards=2, per_shard=2)
    with pytest.raises(ValueError, match="no shards"):
        _iterator(shards, process_index=2, process_count=3)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.tar"
    with TarShardWriter(path) as writer:
        writer.write("good0", {"png": _png((10, 20, 30)), "txt": b"a good caption"})
        writer.write("corrupt", {"png": b"\x89PNG\r\n\x1a\nnot really", "txt": b"broken image"})
        writer.write("truncpng", {"png": _png((1, 2, 3))[:40], "txt": b"cut image"})
        writer.write("nocaption", {"png": _png((40, 50, 60))})
        writer.write("emptytxt", {"png": _png((40, 50, 60)), "txt": b"  "})
        writer.write("noimage", {"txt": b"caption without image"})
        writer.write(
            "jsononly",
            {"png": _png((70, 80, 90)), "json": json.dumps({"captions": ["x one", "x two"]})},
        )
    with _iterator(str(path), batch_size=2, prefetch=0) as iterator:
        batches = _take(iterator, 3)
        stats = iterator.stats.as_dict()
    captions = {c for b in batches for c in b["captions"]}
    assert captions <= {"a good caption", "x one", "x two"}
    assert stats["samples_read"] >= 7 and stats["epochs"] >= 1
    assert stats["skipped_decode"] >= 2 and stats["skipped_decode"] % 2 == 0
    assert stats["skipped_no_caption"] >= 2 and stats["skipped_no_caption"] % 2 == 0
    assert stats["skipped_other"] >= 1
    assert stats["samples_yielded"] == 6


def test_truncated_shard_is_survived(tmp_path, caplog):
    shards = _write_numbered_shards(tmp_path, num_shards=2, per_shard=10)
    # Each sample is two 1 KiB members; cut inside sample 15's caption member.
    data = open(shards[1], "rb").read()
    with open(shards[1], "wb") as handle:
        handle.write(data[: 5 * 2048 + 1024 + 300])
    with caplog.at_level(logging.WARNING, logger="data_pipeline.pipeline"):
        with _iterator(shards, batch_size=4, prefetch=0) as iterator:
            captions = [c for b in _take(iterator, 12) for c in b["captions"]]
            stats = iterator.stats
    assert stats.skipped_other >= 2 and stats.epochs >= 2
    assert {f"sample {i}" for i in range(10)} <= set(captions)
    assert {f"sample {i}" for i in range(10, 15)} <= set(captions)
    assert not any(f"sample {i}" in captions for i in range(15, 20))
    warnings = [r for r in caplog.records if "shard-00001" in r.getMessage()]
    assert len(warnings) == 1


def test_unusable_data_raises_instead_of_spinning(tmp_path):
    path = tmp_path / "useless.tar"
    with TarShardWriter(path) as writer:
        writer.write("a", {"png": b"garbage", "txt": b"caption"})
        writer.write("b", {"png": _png((1, 2, 3))})
    with _iterator(str(path)) as iterator:
        with pytest.raises(RuntimeError, match="no usable sample"):
            next(iterator)


def test_close_stops_the_prefetch_thread(synthetic_dir):
    before = threading.active_count()
    iterator = _iterator(str(synthetic_dir), prefetch=3)
    next(iterator)
    iterator.close()
    iterator.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(iterator)


def test_decode_image_resizes_shorter_side_and_centre_crops():
    # 80x40 -> the centre 40x40 square (columns 20..60) at 16x16; red only in columns 30..50.
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :, 2] = 255
    wide[:, 30:50] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="JPEG", quality=95)
    out = decode_image(buffer.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 6:10, 0].min() > 200 and out[:, 6:10, 2].max() < 60
    assert out[:, :2, 2].min() > 200 and out[:, -2:, 2].min() > 200

    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), 8), np.full((8, 8, 3), 255))
    with pytest.raises(OSError):
        decode_image(b"nonsense", 8)


def test_choose_caption_order_and_lists():
    rng = np.random.default_rng(0)
    sample = {"txt": b"from txt", "json": json.dumps({"caption": "from json"}).encode()}
    assert choose_caption(sample, ("txt", "json"), rng) == "from txt"
    assert choose_caption(sample, ("json", "txt"), rng) == "from json"
    many = {"json": json.dumps({"captions": ["one", "two", "three"]}).encode()}
    picks = {choose_caption(many, ("json",), rng) for _ in range(40)}
    assert picks == {"one", "two", "three"}
    assert choose_caption({"json": b"{broken"}, ("txt", "json"), rng) is None
    assert PipelineStats().as_dict()["skipped_decode"] == 0
