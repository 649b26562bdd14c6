import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from data_pipeline import prepare as prepare_module
from data_pipeline.captions import caption_candidates, json_fields
from data_pipeline.prepare import UsageError, prepare
from data_pipeline.records import decode_record
from data_pipeline.shards import iter_tar_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_bytes(size=(24, 16), format="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _write(path, payload) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(payload, bytes) else "w"
    with open(path, mode) as file:
        file.write(payload)


def _read_samples(output_dir: str, output_format: str) -> list[dict]:
    """Every sample of the shards in name order, as {"key", "captions", ext: bytes, "meta"}."""
    info = json.load(open(os.path.join(output_dir, "dataset_info.json")))
    samples = []
    for name in info["shards"]:
        path = os.path.join(output_dir, name)
        if output_format == "arrayrecord":
            reader = ArrayRecordReader(path)
            records = reader.read_all()
            reader.close()
            for record in records:
                sample = decode_record(record)
                candidates, _ = caption_candidates(sample, json_fields("caption"))
                meta = json.loads(sample.pop("json"))
                assert candidates == meta["captions"]
                samples.append({"key": sample.pop("__key__"),
                                "captions": meta.pop("captions"), "meta": meta, **sample})
        else:
            for sample in iter_tar_samples(path):
                meta = json.loads(sample["json"])
                if len(meta["captions"]) == 1:
                    assert sample["txt"].decode() == meta.pop("caption") == meta["captions"][0]
                else:
                    assert "txt" not in sample and "caption" not in meta
                # What training will choose from, through the pipeline's own caption reader.
                candidates, _ = caption_candidates(sample, json_fields("caption"))
                assert candidates == meta["captions"]
                for member in ("json", "txt", "__url__"):
                    sample.pop(member, None)
                samples.append({"key": sample.pop("__key__"),
                                "captions": meta.pop("captions"), "meta": meta, **sample})
    return samples


@pytest.fixture
def sidecar_folder(tmp_path):
    """Two good captioned images, and one of each way an input is left out."""
    root = tmp_path / "images"
    good = {"a.jpg": _image_bytes(seed=1), "sub/b.png": _image_bytes(format="PNG", seed=2)}
    for name, data in good.items():
        _write(str(root / name), data)
    _write(str(root / "a.txt"), "  a red square\n")
    _write(str(root / "sub/b.txt"), "a blue circle")
    _write(str(root / "nocap.jpg"), _image_bytes(seed=3))
    _write(str(root / "broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg")
    _write(str(root / "broken.txt"), "broken")
    _write(str(root / "tiny.png"), _image_bytes((4, 4), "PNG"))
    _write(str(root / "tiny.txt"), "tiny")
    _write(str(root / "small.png"), _image_bytes((20, 12), "PNG"))
    _write(str(root / "small.txt"), "small")
    _write(str(root / "latin1.png"), _image_bytes(format="PNG"))
    _write(str(root / "latin1.txt"), "caf\xe9".encode("latin-1"))
    _write(str(root / "empty.jpg"), b"")
    _write(str(root / "empty.txt"), "empty")
    _write(str(root / "notes.md"), "not an image")
    return root, good


@pytest.mark.parametrize("output_format", ["arrayrecord", "tar"])
def test_sidecar_folder(sidecar_folder, tmp_path, output_format):
    root, good = sidecar_folder
    out = tmp_path / "out"
    summary = prepare(str(root), str(out), output_format=output_format, samples_per_shard=1,
                      min_size=14, progress=False)
    samples = _read_samples(str(out), output_format)
    by_source = {sample["meta"]["source"]: sample for sample in samples}
    assert sorted(by_source) == ["a.jpg", "sub/b.png"]
    assert by_source["a.jpg"]["jpg"] == good["a.jpg"]  # stored as on disk, not re-encoded
    assert by_source["sub/b.png"]["png"] == good["sub/b.png"]
    assert by_source["a.jpg"]["captions"] == ["a red square"]
    assert by_source["sub/b.png"]["captions"] == ["a blue circle"]
    assert by_source["a.jpg"]["meta"]["width"] == 24
    assert len({sample["key"] for sample in samples}) == 2

    assert summary["written"] == 2 and summary["num_shards"] == 2
    assert summary["skipped"] == {"caption_encoding": 1, "decode": 1, "empty": 1,
                                  "no_caption": 1, "too_small": 2}
    on_disk = json.load(open(out / "prepare_summary.json"))
    assert on_disk["skipped"] == summary["skipped"] and on_disk["input_kind"] == "sidecar"
    assert on_disk["bytes"] == sum(os.path.getsize(out / shard["name"])
                                   for shard in on_disk["shards"])
    skipped = [json.loads(line) for line in open(out / "prepare_skipped.jsonl")]
    assert {(line["source"], line["reason"]) for line in skipped} == {
        ("broken.jpg", "decode"), ("empty.jpg", "empty"), ("nocap.jpg", "no_caption"),
        ("tiny.png", "too_small"), ("small.png", "too_small"),
        ("latin1.png", "caption_encoding")}
    assert not [name for name in os.listdir(out) if name.endswith(".incomplete")]


def test_keep_uncaptioned_stores_an_empty_caption_list(sidecar_folder, tmp_path):
    root, _ = sidecar_folder
    prepare(str(root), str(tmp_path / "out"), keep_uncaptioned=True, progress=False)
    samples = _read_samples(str(tmp_path / "out"), "arrayrecord")
    by_source = {sample["meta"]["source"]: sample for sample in samples}
    assert by_source["nocap.jpg"]["captions"] == []
    assert "small.png" in by_source  # no --min_size: only the decoder's own minimum applies


@pytest.mark.parametrize("output_format", ["arrayrecord", "tar"])
def test_metadata_jsonl_with_caption_lists(tmp_path, output_format):
    root = tmp_path / "folder"
    images = {f"train/{i}.jpg": _image_bytes(seed=i) for i in range(3)}
    for name, data in images.items():
        _write(str(root / name), data)
    rows = [{"file_name": "train/0.jpg", "text": ["first", " second ", ""]},
            {"file_name": "train/1.jpg", "text": "only one"},
            {"file_name": "train/2.jpg"},
            {"file_name": "train/gone.jpg", "text": "listed but missing"}]
    _write(str(root / "metadata.jsonl"), "\n".join(json.dumps(row) for row in rows) + "\n")
    _write(str(root / "train/0.txt"), "sidecars are ignored when metadata exists")
    out = tmp_path / "out"
    summary = prepare(str(root), str(out), output_format=output_format, progress=False)
    samples = _read_samples(str(out), output_format)
    assert [(s["meta"]["source"], s["captions"]) for s in samples] == [
        ("train/0.jpg", ["first", "second"]), ("train/1.jpg", ["only one"])]
    assert samples[0]["jpg"] == images["train/0.jpg"]
    assert summary["skipped"] == {"missing_file": 1, "no_caption": 1}
    assert summary["input_kind"] == "metadata"


def test_metadata_csv_in_a_subfolder_with_a_named_column(tmp_path):
    root = tmp_path / "folder"
    _write(str(root / "part1/x.png"), _image_bytes(format="PNG", seed=4))
    _write(str(root / "part1/metadata.csv"), 'file_name,caption\nx.png,"a cat, sitting"\n')
    prepare(str(root), str(tmp_path / "out"), caption_column="caption", progress=False)
    samples = _read_samples(str(tmp_path / "out"), "arrayrecord")
    assert [(s["meta"]["source"], s["captions"]) for s in samples] == [
        ("part1/x.png", ["a cat, sitting"])]
    with pytest.raises(UsageError, match="no column 'text'.*caption, file_name"):
        prepare(str(root), str(tmp_path / "out2"), progress=False)


@pytest.mark.parametrize("output_format", ["arrayrecord", "tar"])
def test_saved_huggingface_dataset(tmp_path, output_format):
    datasets = pytest.importorskip("datasets")
    jpeg = _image_bytes(seed=5)
    png = _image_bytes(format="PNG", seed=6)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": jpeg, "path": None}, {"bytes": png, "path": None},
                   {"bytes": b"junk", "path": None}],
         "text": ["a dog", "a boat", "junk"]},
        features=features,
    )
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    summary = prepare(str(tmp_path / "hf"), str(out), output_format=output_format,
                      progress=False)
    samples = _read_samples(str(out), output_format)
    assert [(s["meta"]["source"], s["captions"]) for s in samples] == [
        ("row 0", ["a dog"]), ("row 1", ["a boat"])]
    assert samples[0]["jpg"] == jpeg and samples[1]["png"] == png
    assert summary["skipped"] == {"decode": 1} and summary["input_kind"] == "hf_dataset"
    with pytest.raises(UsageError, match="no column 'caption'.*image, text"):
        prepare(str(tmp_path / "hf"), str(tmp_path / "o2"), caption_column="caption",
                progress=False)


def test_huggingface_array_images_are_stored_losslessly(tmp_path):
    datasets = pytest.importorskip("datasets")
    array = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    features = datasets.Features({"pixels": datasets.Array3D((10, 12, 3), "uint8"),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"pixels": [array], "caption": ["noise"]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    prepare(str(tmp_path / "hf"), str(tmp_path / "out"), image_column="pixels",
            caption_column="caption", progress=False)
    (sample,) = _read_samples(str(tmp_path / "out"), "arrayrecord")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), array)


def _digests(directory) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory)) if name.startswith("shard-")}


def test_reruns_are_byte_identical_and_shards_keep_to_their_size(tmp_path):
    root = tmp_path / "images"
    for i in range(12):
        _write(str(root / f"{i:02d}.png"), _image_bytes((64, 64), "PNG", seed=i))
        _write(str(root / f"{i:02d}.txt"), f"noise {i}")
    image_bytes = os.path.getsize(root / "00.png")
    target_mb = 3.5 * image_bytes / 2**20
    first = prepare(str(root), str(tmp_path / "a"), shard_size_mb=target_mb, progress=False)
    prepare(str(root), str(tmp_path / "b"), shard_size_mb=target_mb, progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    # Records carry a small header on top of the image, so 3 fit under 3.5 images' worth.
    assert [shard["samples"] for shard in first["shards"]] == [3, 3, 3, 3]
    with pytest.raises(UsageError, match="already holds shard-00000.array_record.*--overwrite"):
        prepare(str(root), str(tmp_path / "a"), progress=False)
    prepare(str(root), str(tmp_path / "a"), samples_per_shard=12, overwrite=True,
            progress=False)
    assert list(_digests(tmp_path / "a")) == ["shard-00000.array_record"]


def test_worker_threads_and_processes_write_the_same_shards(tmp_path, monkeypatch):
    root = tmp_path / "images"
    for i in range(20):
        _write(str(root / f"{i:02d}.jpg"), _image_bytes(seed=i) if i != 7 else b"bad")
        _write(str(root / f"{i:02d}.txt"), f"image {i}")
    prepare(str(root), str(tmp_path / "one"), samples_per_shard=6, progress=False)
    threads = prepare(str(root), str(tmp_path / "threads"), samples_per_shard=6, num_workers=3,
                      progress=False)
    assert threads["workers"] == 3 and threads["skipped"] == {"decode": 1}
    monkeypatch.setattr(prepare_module, "MIN_ITEMS_FOR_PROCESSES", 0)
    processes = prepare(str(root), str(tmp_path / "processes"), samples_per_shard=6,
                        num_workers=2, worker_kind="processes", progress=False)
    assert processes["workers"] == 2 and processes["skipped"] == {"decode": 1}
    assert len(_digests(tmp_path / "one")) == 4
    assert (_digests(tmp_path / "one") == _digests(tmp_path / "threads")
            == _digests(tmp_path / "processes"))


def test_an_interrupted_run_leaves_no_shard_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "images"
    for i in range(5):
        _write(str(root / f"{i}.jpg"), _image_bytes(seed=i))
        _write(str(root / f"{i}.txt"), f"image {i}")
    real_check = prepare_module.check_item

    def interrupted(index, item, options):
        if index == 3:
            raise KeyboardInterrupt
        return real_check(index, item, options)

    monkeypatch.setattr(prepare_module, "check_item", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), str(out), samples_per_shard=2, progress=False)
    # Shard 0 (images 0, 1) was finished; shard 1 had image 2 when the run stopped.
    assert sorted(os.listdir(out)) == ["prepare_skipped.jsonl.incomplete",
                                       "shard-00000.array_record"]
    monkeypatch.setattr(prepare_module, "check_item", real_check)
    prepare(str(root), str(out), samples_per_shard=2, overwrite=True, progress=False)
    assert len(_read_samples(str(out), "arrayrecord")) == 5


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    images = tmp_path / "images"
    _write(str(images / "a.jpg"), _image_bytes())
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["--input", str(tmp_path / "nowhere"), "--output", out], "does not exist"),
        (["--input", str(tmp_path / "empty"), "--output", out], "holds no images"),
        (["--input", str(images), "--output", out], "no captions in"),
        (["--input", str(images), "--output", out, "--format", "parquet"], "invalid choice"),
        (["--input", str(images), "--output", out, "--shard_size_mb", "1",
          "--samples_per_shard", "2"], "not allowed with"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
def test_cli_writes_shards_and_prints_the_summary(sidecar_folder, tmp_path):
    root, _ = sidecar_folder
    result = _cli("--input", str(root), "--output", str(tmp_path / "out"), "--format", "tar",
                  "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 of 8 images into 1 tar shards" in result.stdout
    assert "skipped broken.jpg: decode" in result.stderr
    assert len(_read_samples(str(tmp_path / "out"), "tar")) == 3


def test_nothing_usable_is_an_error_and_output_inside_input_is_not_read(tmp_path):
    root = tmp_path / "images"
    _write(str(root / "a.jpg"), b"junk")
    _write(str(root / "a.txt"), "a caption")
    with pytest.raises(UsageError, match=r"no usable images .*all 1 skipped \(decode 1\)"):
        prepare(str(root), str(tmp_path / "out"), progress=False)
    _write(str(root / "b.png"), _image_bytes(format="PNG"))
    _write(str(root / "b.txt"), "b caption")
    inside = root / "shards"
    prepare(str(root), str(inside), output_format="tar", progress=False)
    # A second run must not take the first run's output folder for input.
    _write(str(inside / "stray.png"), _image_bytes(format="PNG"))
    _write(str(inside / "stray.txt"), "would be read if the output were walked")
    summary = prepare(str(root), str(inside), output_format="tar", overwrite=True,
                      progress=False)
    assert summary["inputs"] == 2 and summary["written"] == 1
