"""`python -m data_pipeline.prepare`: a folder of captioned images -> training shards.

Inputs (detected in this order):
  (c) a Hugging Face `datasets` dataset saved with `save_to_disk` (image + text column);
  (b) a folder with `metadata.jsonl` / `metadata.csv` (`file_name` + a caption column, the
      Hugging Face imagefolder convention; a metadata file describes the files below its folder);
  (a) a folder of images with sidecar captions (`a.jpg` + `a.txt`), searched recursively.

Every image is decoded once, the way training decodes it; images training would skip are
reported and left out. Image bytes are stored as they were on disk (no re-encoding). Output is
sorted by source path (row order for datasets), so a rerun writes byte-identical shards. A shard
is written under a temporary name and renamed when complete; `prepare_summary.json` is written
last, so its presence means the run finished.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import io
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from data_pipeline.images import (
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    REJECT_REASONS,
    ImageRejected,
    inspect_image,
)
from data_pipeline.records import FORMAT_VERSION, encode_record

FORMATS = ("arrayrecord", "tar")
SHARD_SUFFIX = {"arrayrecord": ".array_record", "tar": ".tar"}
SHARD_PREFIX = "shard-"
# Reasons an input is left out: the decoder's, plus caption and file problems found here.
SKIP_REASONS = REJECT_REASONS + ("no_caption", "caption_encoding", "missing_file", "read_error")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SUMMARY_FILE = "prepare_summary.json"
INFO_FILE = "dataset_info.json"
SKIPPED_FILE = "prepare_skipped.jsonl"
DEFAULT_SHARD_SIZE_MB = 256
# Each image is stored as its own ArrayRecord chunk, so a random read touches one image;
# images are already compressed, so a second compression would only cost time.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
# Spawned worker processes pay a start-up (imports) that only pays off on larger inputs.
MIN_ITEMS_FOR_PROCESSES = 2000
WORKER_KINDS = ("threads", "processes")
_PRINTED_SKIPS = 20


class UsageError(Exception):
    """A problem with the command line or the input: one line, exit status 2."""


@dataclass(frozen=True)
class Item:
    """One input example before validation."""

    source: str  # path relative to the input folder, or "row N" for datasets
    path: str | None = None  # image file to read, or
    data: bytes | None = None  # image bytes already in memory (datasets)
    captions: tuple[str, ...] = ()
    caption_path: str | None = None  # sidecar .txt read by the worker


@dataclass(frozen=True)
class Checked:
    index: int
    source: str
    skip_reason: str | None = None
    detail: str = ""
    data: bytes = b""
    extension: str = ""
    width: int = 0
    height: int = 0
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckOptions:
    min_side: int
    keep_uncaptioned: bool


# ---------------------------------------------------------------------------------------------
# Input discovery


def _normalise_captions(value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(text.strip() for text in value if isinstance(text, str) and text.strip())


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


def _walk(root: str, skip_dir: str | None) -> Iterator[tuple[str, list[str]]]:
    """(directory, sorted file names) below root, in sorted order; hidden entries skipped."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(
            name for name in dirs
            if not name.startswith(".")
            and os.path.realpath(os.path.join(directory, name)) != skip_dir
        )
        yield directory, sorted(name for name in files if not name.startswith("."))


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def sidecar_items(root: str, skip_dir: str | None = None) -> list[Item]:
    """Images with `stem.txt` beside them; images without one are kept (as no_caption)."""
    items = []
    for directory, files in _walk(root, skip_dir):
        names = set(files)
        for name in files:
            if not _is_image(name):
                continue
            caption_name = os.path.splitext(name)[0] + ".txt"
            caption_path = os.path.join(directory, caption_name) if caption_name in names else None
            path = os.path.join(directory, name)
            items.append(Item(_relative(path, root), path=path, caption_path=caption_path))
    items.sort(key=lambda item: item.source)
    if not items:
        raise UsageError(f"input folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if not any(item.caption_path for item in items):
        raise UsageError(
            f"no captions in {root}: none of its {len(items)} images has a sidecar .txt "
            f"(a.jpg + a.txt) and there is no {' or '.join(METADATA_FILES)}"
        )
    return items


def _metadata_rows(path: str) -> Iterator[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise UsageError(f"{path}:{line_number}: not JSON ({error})") from error
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{line_number}: a row must be a JSON object")
                yield row
    else:
        with open(path, encoding="utf-8", newline="") as file:
            yield from csv.DictReader(file)


def metadata_items(root: str, metadata_paths: list[str], caption_column: str) -> list[Item]:
    items = []
    columns_seen: set[str] = set()
    for metadata_path in metadata_paths:
        base = os.path.dirname(metadata_path)
        for row in _metadata_rows(metadata_path):
            columns_seen.update(row)
            file_name = row.get("file_name")
            if not file_name or not isinstance(file_name, str):
                raise UsageError(f"{metadata_path}: a row has no 'file_name': {row!r}"[:300])
            path = os.path.normpath(os.path.join(base, file_name))
            items.append(Item(_relative(path, root), path=path,
                              captions=_normalise_captions(row.get(caption_column))))
    items.sort(key=lambda item: item.source)
    if not items:
        raise UsageError(f"{', '.join(metadata_paths)}: no rows")
    if caption_column not in columns_seen:
        raise UsageError(
            f"no captions: metadata has no column {caption_column!r} (columns: "
            f"{', '.join(sorted(columns_seen))}); pick one with --caption_column"
        )
    return items


def find_metadata(root: str, skip_dir: str | None = None) -> list[str]:
    found = []
    for directory, files in _walk(root, skip_dir):
        present = [name for name in METADATA_FILES if name in files]
        if len(present) > 1:
            raise UsageError(f"{directory} holds both {' and '.join(present)}; keep one")
        found.extend(os.path.join(directory, name) for name in present)
    return found


def is_saved_dataset(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(root, "state.json"))
        and os.path.isfile(os.path.join(root, "dataset_info.json"))
    )


def dataset_items(root: str, image_column: str, caption_column: str,
                  split: str | None) -> tuple[Iterator[Item], int]:
    """Rows of a `save_to_disk` dataset, in row order, with the image's original bytes."""
    try:
        import datasets
    except ImportError as error:
        raise UsageError(
            f"{root} is a Hugging Face dataset; reading it needs `pip install 't2i-jax[hf]'`"
        ) from error
    dataset = datasets.load_from_disk(root)
    if isinstance(dataset, datasets.DatasetDict):
        splits = sorted(dataset)
        chosen = split or ("train" if "train" in dataset else splits[0] if len(splits) == 1
                           else None)
        if chosen not in dataset:
            raise UsageError(f"{root}: choose a split with --split (splits: {', '.join(splits)})")
        dataset = dataset[chosen]
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise UsageError(f"{root}: no column {column!r} (columns: "
                             f"{', '.join(dataset.column_names)}); pick one with {flag}")
    if isinstance(dataset.features[image_column], datasets.Image):
        # Undecoded, the column yields {"bytes", "path"}: the file as it was, not a re-encode.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_column, caption_column])

    def rows() -> Iterator[Item]:
        for index, row in enumerate(dataset):
            yield Item(f"row {index}", data=_dataset_image_bytes(row[image_column]),
                       captions=_normalise_captions(row[caption_column]))

    return rows(), len(dataset)


def _dataset_image_bytes(value) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as file:
                return file.read()
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    # A decoded picture or an array (nested lists without a dataset format): PNG is lossless.
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        array = np.asarray(value)
        if array.dtype != np.uint8:
            if array.dtype.kind == "f" and array.size and array.max() <= 1.0:
                array = array * 255.0
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def discover(input_dir: str, caption_column: str, image_column: str, split: str | None,
             skip_dir: str | None) -> tuple[str, Iterable[Item], int]:
    """(kind, items in output order, item count) for an input folder."""
    if not os.path.isdir(input_dir):
        raise UsageError(f"input folder {input_dir} does not exist" if not os.path.exists(
            input_dir) else f"input {input_dir} is not a folder")
    if is_saved_dataset(input_dir):
        items, count = dataset_items(input_dir, image_column, caption_column, split)
        return "hf_dataset", items, count
    metadata_paths = find_metadata(input_dir, skip_dir)
    if metadata_paths:
        items = metadata_items(input_dir, metadata_paths, caption_column)
        return "metadata", items, len(items)
    items = sidecar_items(input_dir, skip_dir)
    return "sidecar", items, len(items)


# ---------------------------------------------------------------------------------------------
# Validation (runs in worker processes when there are enough items)


def check_item(index: int, item: Item, options: CheckOptions) -> Checked:
    captions = item.captions
    if item.caption_path is not None:
        try:
            with open(item.caption_path, "rb") as file:
                captions = _normalise_captions(file.read().decode("utf-8"))
        except UnicodeDecodeError as error:
            return Checked(index, item.source, "caption_encoding", f"{item.caption_path}: {error}")
        except OSError as error:
            return Checked(index, item.source, "read_error", str(error))
    if not captions and not options.keep_uncaptioned:
        return Checked(index, item.source, "no_caption", "no caption text")
    data = item.data
    if item.path is not None:
        try:
            with open(item.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return Checked(index, item.source, "missing_file", item.path)
        except OSError as error:
            return Checked(index, item.source, "read_error", str(error))
    try:
        info = inspect_image(data or b"", min_side=options.min_side)
    except ImageRejected as rejected:
        return Checked(index, item.source, rejected.reason, rejected.detail)
    return Checked(index, item.source, data=data, extension=info.extension, width=info.width,
                   height=info.height, captions=captions)


def _check_batch(batch: list[tuple[int, Item]], options: CheckOptions) -> list[Checked]:
    return [check_item(index, item, options) for index, item in batch]


def checked_in_order(items: Iterable[Item], options: CheckOptions, num_workers: int,
                     worker_kind: str = "threads") -> Iterator[Checked]:
    """check_item over items, results in input order, at most a few batches in flight."""
    numbered = enumerate(items)
    if num_workers <= 1:
        for index, item in numbered:
            yield check_item(index, item, options)
        return
    if worker_kind == "threads":
        pool = concurrent.futures.ThreadPoolExecutor(num_workers)
    elif worker_kind == "processes":
        # Spawn, not fork: the caller may have threads (JAX, tqdm's monitor) fork would copy.
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        raise ValueError(f"unknown worker kind {worker_kind!r}; one of {WORKER_KINDS}")
    batch_size = 64
    with pool:
        pending: collections.deque = collections.deque()
        while batch := list(itertools.islice(numbered, batch_size)):
            pending.append(pool.submit(_check_batch, batch, options))
            if len(pending) >= 4 * num_workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Shard writing


class _ArrayRecordShard:
    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self._tmp_path = path + ".incomplete"
        self._writer = ArrayRecordWriter(self._tmp_path, ARRAY_RECORD_OPTIONS)

    def write(self, key: str, example: Checked, meta: dict) -> int:
        record = encode_record(key, example.data, example.extension, list(example.captions), meta)
        self._writer.write(record)
        return len(record)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        self._writer.close()
        os.remove(self._tmp_path)


class _TarShard:
    def __init__(self, path: str):
        from data_pipeline.shards import TarShardWriter

        self.path = path
        self._writer = TarShardWriter(path)

    def write(self, key: str, example: Checked, meta: dict) -> int:
        metadata = {"captions": list(example.captions), **meta}
        fields = {example.extension: example.data}
        if len(example.captions) == 1:
            # The img2dataset layout. With several captions there is no .txt and no "caption":
            # readers try those first and would never pick from the list.
            (metadata["caption"],) = example.captions
            fields["txt"] = example.captions[0].encode("utf-8")
        fields["json"] = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
        self._writer.write(key, fields)
        return sum(len(payload) for payload in fields.values())

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


_SHARD_CLASSES = {"arrayrecord": _ArrayRecordShard, "tar": _TarShard}


class ShardSink:
    """Cuts the example stream into shards of at most shard_bytes or samples_per_shard."""

    def __init__(self, output_dir: str, output_format: str, shard_bytes: int | None,
                 samples_per_shard: int | None):
        self.output_dir = output_dir
        self.output_format = output_format
        self.shard_bytes = shard_bytes
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._current = None

    def _open(self) -> None:
        name = f"{SHARD_PREFIX}{len(self.shards):05d}{SHARD_SUFFIX[self.output_format]}"
        self._current = _SHARD_CLASSES[self.output_format](os.path.join(self.output_dir, name))
        self.shards.append({"name": name, "samples": 0, "bytes": 0})

    def write(self, key: str, example: Checked, meta: dict) -> None:
        stats = self.shards[-1] if self._current is not None else None
        size = len(example.data)
        if stats is not None and stats["samples"] and (
            (self.samples_per_shard and stats["samples"] >= self.samples_per_shard)
            or (self.shard_bytes and stats["bytes"] + size > self.shard_bytes)
        ):
            self._close_current()
            stats = None
        if stats is None:
            self._open()
            stats = self.shards[-1]
        stats["bytes"] += self._current.write(key, example, meta)
        stats["samples"] += 1

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self.shards[-1]["bytes"] = os.path.getsize(self._current.path)
            self._current = None

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
            self.shards.pop()


# ---------------------------------------------------------------------------------------------
# Entry point


def _prepare_output(output_dir: str, overwrite: bool) -> None:
    os.makedirs(output_dir, exist_ok=True)
    ours = [name for name in os.listdir(output_dir)
            if name.startswith(SHARD_PREFIX) or name in (SUMMARY_FILE, INFO_FILE, SKIPPED_FILE)]
    complete = sorted(name for name in ours if not name.endswith(".incomplete"))
    if complete and not overwrite:
        # Shard names sort after the summary files; name a shard if there is one.
        shown = next((name for name in complete if name.startswith(SHARD_PREFIX)), complete[0])
        raise UsageError(f"output {output_dir} already holds {shown} and {len(complete) - 1} "
                         "more files of an earlier prepare; pass --overwrite to replace them")
    for name in ours:  # leftovers of an interrupted run are never complete shards
        os.remove(os.path.join(output_dir, name))


def prepare(input_dir: str, output_dir: str, *, output_format: str = "arrayrecord",
            shard_size_mb: float | None = None, samples_per_shard: int | None = None,
            min_size: int = 0, caption_column: str = "text", image_column: str = "image",
            split: str | None = None, keep_uncaptioned: bool = False, num_workers: int = 1,
            worker_kind: str = "threads", overwrite: bool = False, progress: bool = True,
            log=sys.stderr) -> dict:
    """Write shards of input_dir's captioned images into output_dir; returns the summary."""
    if output_format not in FORMATS:
        raise UsageError(f"unknown format {output_format!r}; one of {', '.join(FORMATS)}")
    if worker_kind not in WORKER_KINDS:
        raise UsageError(f"unknown worker kind {worker_kind!r}; one of {', '.join(WORKER_KINDS)}")
    if shard_size_mb is not None and samples_per_shard is not None:
        raise UsageError("pass --shard_size_mb or --samples_per_shard, not both")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UsageError(f"--samples_per_shard must be at least 1, got {samples_per_shard}")
    if shard_size_mb is not None and shard_size_mb <= 0:
        raise UsageError(f"--shard_size_mb must be positive, got {shard_size_mb}")
    if samples_per_shard is None and shard_size_mb is None:
        shard_size_mb = DEFAULT_SHARD_SIZE_MB
    input_dir, output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
    kind, items, count = discover(input_dir, caption_column, image_column, split,
                                  skip_dir=os.path.realpath(output_dir))
    _prepare_output(output_dir, overwrite)
    small = worker_kind == "processes" and count < MIN_ITEMS_FOR_PROCESSES
    workers = 1 if small else max(num_workers, 1)
    options = CheckOptions(min_side=max(min_size, DEFAULT_MIN_SIDE),
                           keep_uncaptioned=keep_uncaptioned)
    sink = ShardSink(output_dir, output_format,
                     int(shard_size_mb * 2**20) if shard_size_mb else None, samples_per_shard)
    skipped: collections.Counter = collections.Counter()
    extensions: collections.Counter = collections.Counter()
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=count, unit="img", desc="prepare", disable=not progress, file=log)
    skipped_log = open(os.path.join(output_dir, SKIPPED_FILE + ".incomplete"), "w",
                       encoding="utf-8")
    try:
        for example in checked_in_order(items, options, workers, worker_kind):
            bar.update(1)
            if example.skip_reason is not None:
                skipped[example.skip_reason] += 1
                line = {"source": example.source, "reason": example.skip_reason,
                        "detail": example.detail}
                skipped_log.write(json.dumps(line, ensure_ascii=False) + "\n")
                if sum(skipped.values()) <= _PRINTED_SKIPS:
                    bar.write(f"skipped {example.source}: {example.skip_reason} "
                              f"({example.detail})", file=log)
                continue
            # Keys number the inputs in sorted order: stable across reruns and free of the
            # dots and collisions file names can have; the source path travels in the meta.
            key = f"{example.index:09d}"
            meta = {"source": example.source, "width": example.width, "height": example.height}
            sink.write(key, example, meta)
            extensions[example.extension] += 1
        sink.close()
    except BaseException:
        sink.abort()
        skipped_log.close()
        raise
    finally:
        bar.close()
    skipped_log.close()
    os.replace(skipped_log.name, os.path.join(output_dir, SKIPPED_FILE))
    seconds = time.perf_counter() - start
    written = sum(shard["samples"] for shard in sink.shards)
    if not written:
        raise UsageError(
            f"no usable images in {input_dir}: all {count} skipped ("
            + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
            + f"); see {os.path.join(output_dir, SKIPPED_FILE)}"
        )
    summary = {
        "input": input_dir,
        "input_kind": kind,
        "output": output_dir,
        "format": output_format,
        "inputs": count,
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "num_shards": len(sink.shards),
        "bytes": sum(shard["bytes"] for shard in sink.shards),
        "shards": sink.shards,
        "image_formats": dict(sorted(extensions.items())),
        "workers": workers,
        "worker_kind": worker_kind,
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 1) if seconds > 0 else None,
    }
    info = {
        "created_by": "data_pipeline.prepare",
        "format": output_format,
        "record_format_version": FORMAT_VERSION if output_format == "arrayrecord" else None,
        "num_samples": written,
        "shards": [shard["name"] for shard in sink.shards],
        # Tar: "txt" and json "caption" when a sample has one caption, json "captions" always.
        "caption_fields": (["captions"] if output_format == "arrayrecord"
                           else ["txt", "json:caption", "json:captions"]),
        "min_size": options.min_side,
    }
    _write_json(os.path.join(output_dir, INFO_FILE), info)
    _write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
    return summary


def _write_json(path: str, value: dict) -> None:
    with open(path + ".incomplete", "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")
    os.replace(path + ".incomplete", path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="folder of images + captions, or a "
                        "datasets folder written by save_to_disk")
    parser.add_argument("--output", required=True, help="folder for the shards")
    parser.add_argument("--format", default="arrayrecord", choices=FORMATS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard_size_mb", type=float,
                      help=f"target shard size (default {DEFAULT_SHARD_SIZE_MB})")
    size.add_argument("--samples_per_shard", type=int)
    parser.add_argument("--min_size", type=int, default=0,
                        help="skip images whose shorter side is under this many pixels")
    parser.add_argument("--caption_column", default="text",
                        help="caption column of metadata files / datasets (may hold a list)")
    parser.add_argument("--image_column", default="image", help="image column of a dataset")
    parser.add_argument("--split", help="split of a saved DatasetDict (default train)")
    parser.add_argument("--keep_uncaptioned", action="store_true",
                        help="keep images without a caption (empty caption list)")
    # One by default: on the 2-core machine this was measured on, parallel workers were slower
    # (docs/prepare.md); on idle cores, threads overlap decoding (PIL drops the GIL).
    parser.add_argument("--num_workers", type=int, default=1,
                        help="parallel validation workers (processes: one below "
                        f"{MIN_ITEMS_FOR_PROCESSES} images)")
    parser.add_argument("--worker_kind", default="threads", choices=WORKER_KINDS)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards a previous run left in --output")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        summary = prepare(
            os.path.expanduser(args.input), os.path.expanduser(args.output),
            output_format=args.format, shard_size_mb=args.shard_size_mb,
            samples_per_shard=args.samples_per_shard, min_size=args.min_size,
            caption_column=args.caption_column, image_column=args.image_column,
            split=args.split, keep_uncaptioned=args.keep_uncaptioned,
            num_workers=args.num_workers, worker_kind=args.worker_kind,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except UsageError as error:
        print(f"prepare: error: {error}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()) or "none"
    print(f"wrote {summary['written']} of {summary['inputs']} images into "
          f"{summary['num_shards']} {summary['format']} shards ({summary['bytes'] / 2**20:.1f} "
          f"MiB) in {summary['output']}; skipped: {skipped}; {summary['seconds']:.1f} s "
          f"({summary['images_per_s']} images/s)")
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
