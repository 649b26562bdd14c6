"""Where samples come from: path specs, random-access sources (ArrayRecord, TFDS) and the
sequential, checkpointable tar-shard stream.

Every source yields the same sample shape: a dict {"__key__": unique key, <image ext>: bytes,
"txt" / "json": caption bytes, ...}, or {"__key__", "__skip__": reason} for a record that could
not be read, so that the skip is counted where the consumer sees it.
"""

from __future__ import annotations

import bisect
import glob
import logging
import os
import tarfile
import time
import zlib
from collections.abc import Iterator, Sequence

import braceexpand
import grain
import numpy as np

from data_pipeline.records import RecordFormatError, decode_record
from data_pipeline.shards import is_url, iter_tar_samples

logger = logging.getLogger(__name__)

TAR_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")
ARRAY_RECORD_PATTERNS = ("*.array_record", "*.array_record-*", "*.arrayrecord")

# Reasons a whole shard, or the rest of it, is skipped.
TRUNCATED_SHARD = "truncated_shard"
UNREADABLE_SHARD = "unreadable_shard"
BAD_RECORD = "bad_record"


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas outside braces, so `a-{0,1}.tar,b.tar` keeps its brace list intact."""
    parts, depth, current = [], 0, []
    for char in spec:
        depth += (char == "{") - (char == "}" and depth > 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def expand_paths(
    spec: str | os.PathLike | Sequence[str],
    *,
    patterns: Sequence[str],
    storage_options: dict | None = None,
) -> list[str]:
    """Turn a path spec into a list of files or URLs, in the order given.

    Accepts local files, directories (their files matching `patterns`, sorted), globs, brace
    ranges and lists (`shard-{00000..00099}.tar`, via braceexpand), comma-separated lists of
    these, a sequence of them, and URLs (`http(s)://`, `gs://`, `s3://`, anything fsspec opens;
    globs in gs:// and s3:// URLs are listed through fsspec). Raises FileNotFoundError naming
    the part that matches nothing.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    parts = _split_top_level_commas(spec) if isinstance(spec, str) else [
        os.fspath(item) for item in spec
    ]
    if not parts:
        raise FileNotFoundError(f"data.paths {spec!r} names no files")
    paths: list[str] = []
    for part in parts:
        for candidate in braceexpand.braceexpand(part):
            paths.extend(_expand_one(candidate, part, patterns, storage_options or {}))
    return paths


def _expand_one(candidate: str, part: str, patterns: Sequence[str],
                storage_options: dict) -> list[str]:
    where = f"data.paths part {part!r}" if part != candidate else "data.paths"
    if is_url(candidate) and not candidate.startswith("file://"):
        if not glob.has_magic(candidate) or candidate.startswith(("http://", "https://")):
            return [candidate]
        import fsspec

        filesystem, _, _ = fsspec.get_fs_token_paths(candidate, storage_options=storage_options)
        protocol = candidate.split("://", 1)[0]
        found = sorted(f"{protocol}://{path}" for path in filesystem.glob(candidate))
        if not found:
            raise FileNotFoundError(f"{where}: pattern {candidate!r} matches no files")
        return found
    candidate = candidate.removeprefix("file://")
    if os.path.isdir(candidate):
        found = sorted({
            path
            for pattern in patterns
            for path in glob.glob(os.path.join(glob.escape(candidate), pattern))
            if not path.endswith(".incomplete")
        })
        if not found:
            raise FileNotFoundError(
                f"{where}: directory {candidate!r} holds no {' / '.join(patterns)} files"
            )
        return found
    if glob.has_magic(candidate):
        found = sorted(path for path in glob.glob(candidate) if os.path.isfile(path))
        if not found:
            raise FileNotFoundError(f"{where}: pattern {candidate!r} matches no files")
        return found
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"{where}: no such file {candidate!r}")
    return [candidate]


def check_remote_exists(url: str, storage_options: dict | None = None) -> None:
    """FileNotFoundError naming `url` when it cannot be found (one request)."""
    import fsspec

    filesystem, _, (path,) = fsspec.get_fs_token_paths(url, storage_options=storage_options or {})
    if not filesystem.exists(path):
        raise FileNotFoundError(f"data.paths: {url!r} does not exist")


class ArrayRecordSource:
    """Random access to the records of ArrayRecord files, decoded to sample dicts.

    Keys are "<file name>/<record key>". A record that does not parse becomes a skip marker.
    """

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = list(paths)
        self._files = [ArrayRecordDataSource([path]) for path in self.paths]
        self._starts = np.cumsum([0] + [len(f) for f in self._files]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict:
        file_index = bisect.bisect_right(self._starts, index) - 1
        name = os.path.basename(self.paths[file_index])
        record = self._files[file_index][index - self._starts[file_index]]
        try:
            sample = decode_record(record)
        except RecordFormatError as error:
            logger.warning("record %d of %s is damaged: %s", index, name, error)
            return {"__key__": f"{name}/#{index}", "__skip__": BAD_RECORD}
        sample["__key__"] = f"{name}/{sample['__key__']}"
        return sample

    def fingerprint(self) -> list:
        return [[os.path.basename(path), len(f)]
                for path, f in zip(self.paths, self._files, strict=True)]


class TfdsSource:
    """Random access to a TFDS dataset through `tfds.data_source` (no TensorFlow needed).

    The image feature is read undecoded (its encoded bytes), so it goes through the same
    decode_image as every other source; the text feature becomes the sample's caption.
    """

    def __init__(self, name: str, *, split: str, data_dir: str | None, image_feature: str,
                 caption_feature: str):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except Exception as error:  # tfds raises several types; its message lists every name
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"data.tfds_name={name!r}: no such TFDS dataset in "
                             f"{data_dir or 'the default data dir'} ({first_line})") from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; "
                "build it first (no download happens at training time)"
            )
        features = builder.info.features
        for field, feature in (("image_feature", image_feature),
                               ("caption_feature", caption_feature)):
            if feature not in features:
                raise ValueError(f"data.{field}={feature!r} is not a feature of TFDS dataset "
                                 f"{name!r}; it has {sorted(features)}")
        # "train[:10%]+validation" style specs name their splits before any slice.
        named = [part.split("[", 1)[0].strip() for part in split.split("+")]
        if any(part not in builder.info.splits for part in named):
            raise ValueError(f"data.tfds_split={split!r}: TFDS dataset {name!r} has splits "
                             f"{sorted(builder.info.splits)}")
        self.name, self.split = name, split
        self._image_feature, self._caption_feature = image_feature, caption_feature
        self._source = builder.as_data_source(
            split=split, decoders={image_feature: tfds.decode.SkipDecoding()}
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        element = self._source[index]
        image = element[self._image_feature]
        text = element[self._caption_feature]
        return {
            "__key__": f"{self.name}/{self.split}/{index}",
            "img": bytes(image) if not isinstance(image, bytes) else image,
            "caption": text.item() if hasattr(text, "item") else text,
        }

    def fingerprint(self) -> list:
        return [self.name, self.split, len(self)]


# --- tar shards: a sequential, checkpointable Grain IterDataset ---------------------------


def read_shard(url: str, *, retries: int, backoff_s: float,
                storage_options: dict | None) -> Iterator[dict]:
    """Samples of one shard; damage or a failed read ends it with one skip marker.

    Remote reads are retried from the start (skipping samples already given) with exponential
    backoff; local damage is not retried, since reading the same bytes again cannot help.
    """
    remote = is_url(url) and not url.startswith("file://")
    given, attempt = 0, 0
    name = os.path.basename(url)
    while True:
        try:
            for index, sample in enumerate(iter_tar_samples(url, storage_options)):
                if index >= given:
                    given += 1
                    sample["__key__"] = f"{name}/{sample['__key__']}"
                    yield sample
            return
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            if remote and attempt < retries:
                delay = backoff_s * 2**attempt
                attempt += 1
                logger.warning("reading %s failed (%r); retry %d/%d in %.1fs",
                               url, error, attempt, retries, delay)
                time.sleep(delay)
                continue
            damaged = isinstance(error, tarfile.TarError | EOFError | zlib.error) and not remote
            reason = TRUNCATED_SHARD if damaged else UNREADABLE_SHARD
            logger.warning("skipping the rest of shard %s after %d samples: %r",
                           url, given, error)
            yield {"__key__": f"{name}/#{given}", "__skip__": reason}
            return


class TarStream(grain.IterDataset):
    """This host's samples of tar shards, epoch after epoch, through a shuffle window.

    Epoch e: all hosts permute the shard list with (seed, e) and host p takes every
    process_count-th shard. Its shards are read in groups of `cycle_length`, interleaved sample
    by sample into a shuffle window of `shuffle_buffer` samples that is drained at the end of
    the group. The position after an element is (epoch, group, elements given in the group), a
    replayable description: restoring it re-reads the group's shards (raw bytes, no decoding)
    up to that point, so a resume costs at most one group of shards, not an epoch.
    """

    def __init__(self, shards: Sequence[str], *, seed: int, process_index: int,
                 process_count: int, shuffle_buffer: int, cycle_length: int = 4,
                 retries: int = 3, backoff_s: float = 1.0, storage_options: dict | None = None,
                 start: dict | None = None):
        super().__init__()
        if len(shards) < process_count:
            raise ValueError(
                f"{len(shards)} tar shard(s) for {process_count} hosts: host {process_index} would "
                "get none; write at least one shard per host"
            )
        self.shards = list(shards)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.shuffle_buffer, self.cycle_length = shuffle_buffer, max(cycle_length, 1)
        self.read_options = dict(retries=retries, backoff_s=backoff_s,
                                 storage_options=storage_options)
        self.start = dict(start or {"epoch": 0, "group": 0, "given": 0})

    def host_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.process_index :: self.process_count]]

    def _group(self, epoch: int, group: int) -> Iterator[dict]:
        shards = self.host_shards(epoch)[group * self.cycle_length:(group + 1) * self.cycle_length]
        readers = [read_shard(url, **self.read_options) for url in shards]
        rng = np.random.default_rng((self.seed, self.process_index, epoch, group))
        window: list[dict] = []
        while readers:
            for reader in list(readers):
                sample = next(reader, None)
                if sample is None:
                    readers.remove(reader)
                elif "__skip__" in sample or self.shuffle_buffer <= 1:
                    yield sample
                elif len(window) < self.shuffle_buffer:
                    window.append(sample)
                else:
                    index = int(rng.integers(len(window)))
                    window[index], sample = sample, window[index]
                    yield sample
        for index in rng.permutation(len(window)):
            yield window[index]

    def _elements(self) -> Iterator[dict]:
        epoch, group, skip = self.start["epoch"], self.start["group"], self.start["given"]
        num_groups = -(-len(self.host_shards(0)) // self.cycle_length)
        while True:
            any_sample = False
            while group < num_groups:
                given = 0
                for sample in self._group(epoch, group):
                    given += 1
                    if given <= skip:
                        continue
                    any_sample = any_sample or "__skip__" not in sample
                    yield {"sample": sample, "epoch": epoch,
                           "position": {"epoch": epoch, "group": group, "given": given}}
                group, skip = group + 1, 0
            if not any_sample and self.start["epoch"] < epoch:
                raise RuntimeError(
                    f"host {self.process_index}: epoch {epoch} of its tar shards "
                    f"{self.host_shards(epoch)} held no readable sample"
                )
            epoch, group = epoch + 1, 0

    def __iter__(self) -> _TarStreamIterator:
        return _TarStreamIterator(self)


class _TarStreamIterator(grain.DatasetIterator):
    def __init__(self, dataset: TarStream):
        super().__init__()
        self._dataset = dataset
        self._position = dict(dataset.start)
        self._elements = dataset._elements()

    def __next__(self) -> dict:
        element = next(self._elements)
        self._position = element["position"]
        return element

    def get_state(self) -> dict:
        return dict(self._position)

    def set_state(self, state: dict) -> None:
        self._elements.close()
        self._dataset = TarStream(
            self._dataset.shards, seed=self._dataset.seed,
            process_index=self._dataset.process_index,
            process_count=self._dataset.process_count,
            shuffle_buffer=self._dataset.shuffle_buffer,
            cycle_length=self._dataset.cycle_length, **self._dataset.read_options, start=state,
        )
        self._position = dict(state)
        self._elements = self._dataset._elements()

    def close(self) -> None:
        self._elements.close()
