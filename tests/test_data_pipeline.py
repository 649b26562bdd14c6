"""The Grain input pipeline: batches, global order, hosts, and exact resume for every source."""

import functools
import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipeline import input_pipeline
from data_pipeline.input_pipeline import make_train_iterator
from data_pipeline.records import encode_record
from data_pipeline.shards import TarShardWriter

MAX_LENGTH = 16
NUM_RECORDS = 40  # 5 batches of 8 per epoch


def byte_tokenizer(captions):
    ids = np.zeros((len(captions), MAX_LENGTH), np.int32)
    for row, text in enumerate(captions):
        encoded = list(text.encode("utf-8"))[:MAX_LENGTH]
        ids[row, : len(encoded)] = encoded
    return ids


def _png(index):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (index % 256, 7, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_config(source, paths="", **overrides):
    config = ml_collections.ConfigDict({
        "source": source, "paths": paths, "image_size": 8, "shuffle_buffer": 6,
        "prefetch": 2, "num_workers": 2, "decode_workers": "threads",
        "caption_json_field": "caption", "empty_captions": "drop", "tar_cycle_length": 2,
        "read_retries": 0, "read_backoff_s": 0.0, "storage_options": "",
        "tfds_name": "", "tfds_split": "train", "tfds_data_dir": "", "image_feature": "image",
        "caption_feature": "caption",
    })
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    from array_record.python.array_record_module import ArrayRecordWriter

    directory = tmp_path_factory.mktemp("records")
    for shard in range(2):
        writer = ArrayRecordWriter(str(directory / f"part-{shard}.array_record"), "group_size:1")
        for item in range(NUM_RECORDS // 2):
            index = shard * NUM_RECORDS // 2 + item
            writer.write(encode_record(f"{index:05d}", _png(index), "png",
                                       [f"sample {index}", f"also sample {index}"]))
        writer.close()
    return str(directory)


@pytest.fixture(scope="module")
def tar_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tars")
    for shard in range(4):
        with TarShardWriter(directory / f"shard-{shard:05d}.tar") as writer:
            for item in range(NUM_RECORDS // 4):
                index = shard * NUM_RECORDS // 4 + item
                writer.write(f"{index:05d}", {"png": _png(index),
                                              "txt": f"sample {index}".encode()})
    return str(directory)


@pytest.fixture(scope="module")
def synthetic_workdir(tmp_path_factory):
    from configs import tiny

    config = tiny.get_config()
    config.data.synthetic_num_samples = NUM_RECORDS
    config.data.synthetic_num_shards = 2
    workdir = str(tmp_path_factory.mktemp("synthetic_workdir"))
    input_pipeline.write_synthetic_data(config, workdir)
    return workdir


def _config_for(source, record_dir, tar_dir):
    return _data_config(source, paths=tar_dir if source == "tar" else record_dir)


def _keys(iterator, count):
    return [next(iterator)["keys"] for _ in range(count)]


def _iterator(config, **kwargs):
    options = dict(workdir="", tokenizer=byte_tokenizer, batch_size=8, seed=3)
    options.update(kwargs)
    return make_train_iterator(config, **options)


def test_batches_hold_decoded_images_tokens_and_keys(record_dir):
    with _iterator(_data_config("arrayrecord", record_dir)) as iterator:
        batch = next(iterator)
    assert batch["images"].shape == (8, 8, 8, 3) and batch["images"].dtype == np.uint8
    assert batch["input_ids"].shape == (8, MAX_LENGTH) and batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], byte_tokenizer(batch["captions"]))
    for key, caption, image in zip(batch["keys"], batch["captions"], batch["images"],
                                   strict=True):
        index = int(key.split("/")[1])
        assert key.startswith("part-") and caption.endswith(f"sample {index}")
        assert abs(int(image[4, 4, 0]) - index) <= 1  # the record's own pixels


@pytest.mark.parametrize("source", ["arrayrecord", "tar"])
def test_each_epoch_covers_every_example_once_in_a_new_order(source, record_dir, tar_dir):
    config = _config_for(source, record_dir, tar_dir)
    config.prefetch = 0
    with _iterator(config) as iterator:
        epochs = [sum(_keys(iterator, NUM_RECORDS // 8), []) for _ in range(2)]
        assert iterator.counters()["epochs"] == 1
    for keys in epochs:
        assert sorted(int(key.split("/")[1]) for key in keys) == list(range(NUM_RECORDS))
    assert epochs[0] != epochs[1]


def test_caption_choice_varies_but_is_reproducible(record_dir):
    config = _data_config("arrayrecord", record_dir)
    with _iterator(config) as first, _iterator(config) as second:
        captions = [next(first)["captions"] for _ in range(5)]
        assert captions == [next(second)["captions"] for _ in range(5)]
    flat = sum(captions, [])
    assert any(c.startswith("also") for c in flat) and any(c.startswith("sample") for c in flat)


@pytest.mark.parametrize("source", ["synthetic", "arrayrecord", "tar"])
@pytest.mark.parametrize("stop_after", [3, 5, 7])  # mid-epoch, just after the epoch end, later
def test_resume_continues_exactly(source, stop_after, record_dir, tar_dir, synthetic_workdir):
    config = _config_for(source, record_dir, tar_dir)
    _iterator = functools.partial(globals()["_iterator"], workdir=synthetic_workdir)
    with _iterator(config) as iterator:
        expected = _keys(iterator, 12)
    with _iterator(config) as iterator:
        assert _keys(iterator, stop_after) == expected[:stop_after]
        # Prefetching has read ahead by now; the state must still be the consumer's position.
        state = iterator.get_state()
        counters = iterator.counters()
    assert json.loads(state)["counters"]["examples"] == 8 * stop_after
    with _iterator(config) as resumed:
        resumed.set_state(state)
        resumed.start_prefetch()
        assert resumed.counters() == counters
        assert _keys(resumed, 12 - stop_after) == expected[stop_after:]
        assert resumed.counters()["examples"] == 8 * 12


def test_global_batches_do_not_depend_on_the_process_count(record_dir):
    config = _data_config("arrayrecord", record_dir)
    with _iterator(config) as single:
        expected = _keys(single, 7)
    hosts = [_iterator(config, batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
    try:
        got = [sum((next(host)["keys"] for host in hosts), []) for _ in range(7)]
    finally:
        for host in hosts:
            host.close()
    assert got == expected


def test_random_access_state_resumes_with_another_process_count(record_dir):
    config = _data_config("arrayrecord", record_dir)
    with _iterator(config) as single:
        expected = _keys(single, 9)
    hosts = [_iterator(config, batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(6):
        for host in hosts:
            next(host)
    state = hosts[1].get_state()
    for host in hosts:
        host.close()
    with _iterator(config) as resumed:
        resumed.set_state(state)
        assert _keys(resumed, 3) == expected[6:]
    with _iterator(config, batch_size=4) as other, pytest.raises(ValueError,
                                                                 match="global batch of 8"):
        other.set_state(state)


def test_tar_hosts_read_disjoint_shards_and_refuse_another_process_count(tar_dir):
    config = _data_config("tar", tar_dir)
    hosts = [_iterator(config, batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
    try:
        # One epoch: each host holds 2 of the 4 shards, 20 examples = 5 batches of 4.
        per_host = [sum(_keys(host, 5), []) for host in hosts]
        state = hosts[0].get_state()
    finally:
        for host in hosts:
            host.close()
    shards = [{key.split("/")[0] for key in keys} for keys in per_host]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 4
    assert sorted(per_host[0] + per_host[1]) == sorted(
        f"shard-{i // 10:05d}.tar/{i:05d}" for i in range(NUM_RECORDS))
    with _iterator(config) as single, pytest.raises(ValueError, match="split over hosts"):
        single.set_state(state)


def test_states_of_other_data_or_seeds_are_refused(record_dir, tar_dir):
    with _iterator(_data_config("arrayrecord", record_dir)) as iterator:
        next(iterator)
        state = iterator.get_state()
    with _iterator(_data_config("tar", tar_dir)) as other, pytest.raises(ValueError,
                                                                           match="source"):
        other.set_state(state)
    with _iterator(_data_config("arrayrecord", record_dir), seed=4) as other, pytest.raises(
            ValueError, match="seed"):
        other.set_state(state)


def test_grain_orbax_handler_saves_and_restores_the_position(record_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = _data_config("arrayrecord", record_dir)
    with _iterator(config) as iterator:
        expected = _keys(iterator, 6)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager, _iterator(config) as iterator:
        _keys(iterator, 4)
        manager.save(4, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager, _iterator(config) as resumed:
        manager.restore(4, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(resumed)))
        assert _keys(resumed, 2) == expected[4:]


def test_worker_processes_give_the_same_batches_as_threads(record_dir):
    config = _data_config("arrayrecord", record_dir)
    with _iterator(config) as threads:
        expected = _keys(threads, 3)
    config.decode_workers = "processes"
    with _iterator(config) as processes:
        assert _keys(processes, 3) == expected


def test_synthetic_source_writes_array_records_once_and_reads_them(tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.data.synthetic_num_samples = 24
    config.data.synthetic_num_shards = 2
    paths = input_pipeline.write_synthetic_data(config, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "synthetic-00000-of-00002.array_record", "synthetic-00001-of-00002.array_record"]
    mtimes = [tmp_path.joinpath("data", p.rsplit("/", 1)[1]).stat().st_mtime_ns for p in paths]
    assert input_pipeline.write_synthetic_data(config, str(tmp_path)) == paths
    assert mtimes == [tmp_path.joinpath("data", p.rsplit("/", 1)[1]).stat().st_mtime_ns
                      for p in paths]
    with make_train_iterator(config.data, workdir=str(tmp_path), tokenizer=byte_tokenizer,
                             batch_size=8, seed=0) as iterator:
        keys = sum(_keys(iterator, 3), [])
    assert sorted(int(k.split("/")[1]) for k in keys) == list(range(24))


def test_prepare_inputs_writes_the_demo_data_and_tokenizer_once(tmp_path):
    from configs import tiny
    from models.text_encoder import TOKENIZER_FILE

    config = tiny.get_config()
    config.data.synthetic_num_samples = 48
    config.data.synthetic_num_shards = 2
    input_pipeline.prepare_inputs(config, str(tmp_path))
    written = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert written == ["dataset_info.json", "synthetic-00000-of-00002.array_record",
                       "synthetic-00001-of-00002.array_record"]
    tokenizer = tmp_path / TOKENIZER_FILE
    assert tokenizer.exists()
    stamp = tokenizer.stat().st_mtime_ns
    input_pipeline.prepare_inputs(config, str(tmp_path))
    assert tokenizer.stat().st_mtime_ns == stamp


def test_prepare_inputs_names_paths_that_match_nothing(tmp_path):
    from configs import tiny

    config = tiny.get_config()
    config.data.source = "arrayrecord"
    config.data.paths = str(tmp_path / "nothing-*.array_record")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        input_pipeline.prepare_inputs(config, str(tmp_path))
