"""The training input pipeline on Grain: source -> host part -> shuffle -> decode + caption
choice -> tokenize -> batch -> prefetch, with an exact, checkpointable position.

Random-access sources ("synthetic", "arrayrecord", "tfds") are permuted globally, afresh every
epoch, and global batch k is the same examples in the same order whatever the process count:
host p reads the p-th contiguous slice of every global batch. "tar" shards are streamed: each
epoch the shard list is permuted and split over hosts, and each host shuffles within a window
(sources.TarStream).

Skipped records travel down the pipeline as markers and are counted by the batcher, so the
counters in a batch describe exactly the records consumed up to it; the iterator's state is the
position after the last batch handed out, whatever has been prefetched beyond it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence

import grain
import numpy as np

from data_pipeline import sources
from data_pipeline.captions import (
    BAD_CAPTION,
    EMPTY_CAPTION_POLICIES,
    choose_caption,
    json_fields,
)
from data_pipeline.images import IMAGE_EXTENSIONS, decode_image

logger = logging.getLogger(__name__)

DATA_SOURCES = ("synthetic", "tar", "arrayrecord", "tfds")
RANDOM_ACCESS_SOURCES = ("synthetic", "arrayrecord", "tfds")
# Where decoding runs: a thread pool in the training process, or Grain worker processes
# (random-access sources only: a tar stream cannot be split between workers).
DECODE_WORKER_KINDS = ("threads", "processes")
SYNTHETIC_DIR = "data"
STATE_VERSION = 1
_IMAGE_MEMBERS = (*IMAGE_EXTENSIONS, "img", "image")


def storage_options(data_config) -> dict:
    """data.storage_options (a JSON object string) as fsspec keyword arguments."""
    text = data_config.get("storage_options", "") or ""
    try:
        options = json.loads(text) if text else {}
    except ValueError as error:
        raise ValueError(f"config.data.storage_options is not a JSON object: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"config.data.storage_options={text!r} must be a JSON object")
    return options


def resolve_paths(data_config, workdir: str) -> list[str]:
    """The files a file source reads; FileNotFoundError names a part that matches nothing."""
    if data_config.source == "synthetic":
        return sources.expand_paths(os.path.join(workdir, SYNTHETIC_DIR),
                                    patterns=sources.ARRAY_RECORD_PATTERNS)
    if not data_config.paths:
        raise ValueError(f"config.data.paths is empty; data.source={data_config.source!r} "
                         "needs files, globs or URLs")
    patterns = (sources.TAR_PATTERNS if data_config.source == "tar"
                else sources.ARRAY_RECORD_PATTERNS)
    return sources.expand_paths(data_config.paths, patterns=patterns,
                                storage_options=storage_options(data_config))


def open_random_access(data_config, workdir: str):
    """The ArrayRecord or TFDS source of a random-access config."""
    if data_config.source == "tfds":
        return sources.TfdsSource(
            data_config.tfds_name, split=data_config.tfds_split,
            data_dir=data_config.tfds_data_dir or None,
            image_feature=data_config.image_feature, caption_feature=data_config.caption_feature,
        )
    return sources.ArrayRecordSource(resolve_paths(data_config, workdir))


class Decoder:
    """Raw sample -> decoded example, or a skip marker naming the reason (picklable, so Grain
    worker processes can run it)."""

    def __init__(self, *, image_size: int, caption_json_field: str, empty_captions: str,
                 seed: int, random_crop: bool = False, flip: bool = False):
        if empty_captions not in EMPTY_CAPTION_POLICIES:
            raise ValueError(f"data.empty_captions={empty_captions!r} must be one of "
                             f"{EMPTY_CAPTION_POLICIES}")
        self.image_size = image_size
        self.json_fields = json_fields(caption_json_field)
        self.empty_captions = empty_captions
        self.seed = seed
        self.random_crop, self.flip = random_crop, flip

    def __call__(self, element: dict) -> dict:
        sample = element["sample"]
        out = {"key": sample["__key__"], "epoch": element["epoch"],
               "position": element["position"], "skip": None, "note": None}
        if "__skip__" in sample:
            out["skip"] = sample["__skip__"]
            return out
        # Caption, crop and flip draws depend on the example and its epoch only, so they are the
        # same on a rerun, after a resume and whatever the process count.
        rng = np.random.default_rng((self.seed, zlib.crc32(out["key"].encode()), out["epoch"]))
        text, reason = choose_caption(sample, self.json_fields, rng)
        if text is None:
            # Undecodable caption bytes are damage, not a missing caption: always skipped.
            if self.empty_captions == "drop" or reason == BAD_CAPTION:
                out["skip"] = reason
                return out
            text, out["note"] = "", f"unconditional_{reason}"
        data = next((sample[ext] for ext in _IMAGE_MEMBERS if ext in sample), None)
        if data is None:
            out["skip"] = "no_image"
            return out
        try:
            out["image"] = decode_image(data, self.image_size, random_crop=self.random_crop,
                                        flip=self.flip, rng=rng)
        except Exception as error:  # ImageRejected names its reason; anything else is damage
            out["skip"] = getattr(error, "reason", None) or "decode"
            return out
        out["caption"] = text
        return out


class _HostElements(grain.MapDataset):
    """Element j of this host is position j % B of its slice of global batch j // B.

    `ordered` is the global order (all epochs); B is this host's batch size, so host p of P
    reads global positions [k*B*P + p*B, k*B*P + (p+1)*B) for its batch k.
    """

    def __init__(self, ordered: grain.MapDataset, *, num_records: int, batch_size: int,
                 process_index: int, process_count: int):
        super().__init__(ordered)
        self._num_records = num_records
        self._batch_size = batch_size
        self._offset = process_index * batch_size
        self._stride = batch_size * process_count

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, within = divmod(index, self._batch_size)
        position = batch * self._stride + self._offset + within
        return {"sample": self._parent[position], "epoch": position // self._num_records,
                "position": {"element": index + 1}}


class _Batcher(grain.IterDataset):
    """Decoded examples -> batches; counts every skip and note it consumes."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, tokenizer,
                 decoder: Decoder | None, num_threads: int):
        super().__init__(parent)
        self.batch_size, self.tokenizer = batch_size, tokenizer
        self.decoder, self.num_threads = decoder, num_threads

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self)


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: _Batcher):
        super().__init__(parent)
        self._config = config
        self._pool = None
        if config.decoder is not None and config.num_threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                config.num_threads, thread_name_prefix="decode")
        self._last_good_epoch: int | None = None

    def _pull(self, count: int) -> list[dict]:
        raw = [next(self._parent) for _ in range(count)]
        decoder = self._config.decoder
        if decoder is None:
            return raw
        if self._pool is None:
            return [decoder(element) for element in raw]
        return list(self._pool.map(decoder, raw))

    def __next__(self) -> dict:
        batch_size = self._config.batch_size
        good: list[dict] = []
        counters: collections.Counter = collections.Counter()
        position = epoch = None
        while len(good) < batch_size:
            for example in self._pull(batch_size - len(good)):
                position, epoch = example["position"], example["epoch"]
                if self._last_good_epoch is None:
                    self._last_good_epoch = epoch - 1
                if example["skip"]:
                    counters[f"skipped_{example['skip']}"] += 1
                    if epoch >= self._last_good_epoch + 2:
                        raise RuntimeError(
                            f"a full epoch of data gave no usable example (epoch {epoch}); "
                            f"skipped so far in this batch: {dict(counters)}"
                        )
                    continue
                self._last_good_epoch = epoch
                if example["note"]:
                    counters[example["note"]] += 1
                good.append(example)
        captions = [example["caption"] for example in good]
        input_ids = np.asarray(self._config.tokenizer(captions), dtype=np.int32)
        if input_ids.ndim != 2 or input_ids.shape[0] != len(captions):
            raise ValueError(f"tokenizer returned shape {input_ids.shape} for {len(captions)} "
                             "captions; expected [num_captions, max_length]")
        counters["truncated_captions"] += _count_truncated(self._config.tokenizer, captions)
        counters["examples"] += len(good)
        return {
            "images": np.stack([example["image"] for example in good]),
            "input_ids": input_ids,
            "keys": [example["key"] for example in good],
            "captions": captions,
            "counters": dict(counters),
            "position": position,
            "epoch": epoch,
        }

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        super().close()


def _count_truncated(tokenizer, captions: Sequence[str]) -> int:
    """Captions the tokenizer cuts; only those longer in bytes than max_length are checked, since
    a byte-level tokenizer gives at most one token per byte (plus its special tokens)."""
    truncated = getattr(tokenizer, "truncated", None)
    max_length = getattr(tokenizer, "max_length", None)
    if truncated is None or max_length is None:
        return 0
    long = [text for text in captions if len(text.encode("utf-8")) > max_length - 2]
    return len(truncated(long)) if long else 0


class TrainIterator:
    """Batches {"images", "input_ids", "keys", "captions"} with an exact, saveable position.

    get_state() is the position after the last batch __next__ returned (plus the counters up
    to it), as UTF-8 JSON; set_state() before the first __next__ continues from such a state.
    The pipeline is built lazily, at the first __next__ or start_prefetch(), so a set_state
    right after construction starts no work that would be thrown away.
    """

    def __init__(self, *, build: Callable[[dict | None], grain.IterDataset], identity: dict,
                 process_index: int, process_count: int, batch_size: int):
        self._build = build
        self._identity = identity
        self._process_index, self._process_count = process_index, process_count
        self._batch_size = batch_size
        self._position: dict | None = None
        self._batches = 0
        self._counters: collections.Counter = collections.Counter()
        self._iterator = None
        self._closed = False

    def start_prefetch(self) -> None:
        if self._iterator is None and not self._closed:
            self._iterator = iter(self._build(self._position))
            self._iterator.start_prefetch()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        self.start_prefetch()
        batch = next(self._iterator)
        self._counters.update(batch.pop("counters"))
        self._counters["epochs"] = batch.pop("epoch")
        self._position = batch.pop("position")
        self._batches += 1
        return batch

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def get_state(self) -> bytes:
        return json.dumps({
            "version": STATE_VERSION,
            **self._identity,
            "process_index": self._process_index,
            "process_count": self._process_count,
            "batch_size": self._batch_size,
            "batches": self._batches,
            "position": self._position,
            "counters": dict(self._counters),
        }, sort_keys=True).encode("utf-8")

    def set_state(self, state: bytes | str) -> None:
        if self._iterator is not None:
            raise ValueError("set_state must come before the first batch is drawn")
        saved = json.loads(state)
        if saved.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {saved.get('version')!r} is not "
                             f"{STATE_VERSION}; it was written by other code")
        for field, value in self._identity.items():
            if saved.get(field) != value:
                raise ValueError(
                    f"the saved data iterator state does not match this run's data: its {field} "
                    f"is {saved.get(field)!r}, this run's is {value!r}"
                )
        self._position = self._resume_position(saved)
        self._batches = saved["batches"]
        self._counters = collections.Counter(saved["counters"])

    def _resume_position(self, saved: dict) -> dict | None:
        if saved["position"] is None:
            return None
        same_hosts = (saved["process_count"] == self._process_count
                      and saved["process_index"] == self._process_index)
        if self._identity["source"] == "tar":
            if not same_hosts:
                raise ValueError(
                    f"tar shards are split over hosts, so a data state saved by process "
                    f"{saved['process_index']} of {saved['process_count']} cannot be resumed by "
                    f"process {self._process_index} of {self._process_count}; resume with "
                    f"{saved['process_count']} processes"
                )
            return saved["position"]  # a stream position: any batch size continues from it
        if same_hosts and saved["batch_size"] == self._batch_size:
            return saved["position"]
        saved_global = saved["batch_size"] * saved["process_count"]
        if saved_global != self._batch_size * self._process_count:
            raise ValueError(
                f"the data state was saved with a global batch of {saved_global} examples, this "
                f"run's is {self._batch_size * self._process_count}; the position in batches "
                "cannot be carried over"
            )
        # Random access: the position is global batch `batches`, whatever the layout. Records
        # skipped before it pulled this host's reads further ahead than its slices; those extra
        # examples are read again by the new layout.
        aligned = saved["batches"] * saved["batch_size"]
        if saved["position"]["element"] != aligned:
            logger.warning(
                "resuming with %d processes from a state of %d: this host had read %d examples "
                "beyond its batches (replacing skipped records); they may be seen again",
                self._process_count, saved["process_count"],
                saved["position"]["element"] - aligned,
            )
        return {"element": saved["batches"] * self._batch_size}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._iterator is not None:
            self._iterator.close()
            # Dropped now: Grain's iterators close again when collected, which fails if that
            # happens during interpreter shutdown.
            self._iterator = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _tokenizer_copy(tokenizer):
    """A private copy: Hugging Face fast tokenizers must not be called from two threads at once,
    and the batcher's thread runs beside the loop's own tokenizer calls."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # a tokenizer that cannot be copied is used as is
        return tokenizer


def make_train_iterator(data_config, *, workdir: str, tokenizer, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """This host's batches; batch_size is its share of the global batch.

    `tokenizer(list_of_str)` returns int [N, L]. The data order is a function of the config,
    the seed and (for tar) the process layout alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in "
                         f"[0, process_count={process_count})")
    decoder = Decoder(
        image_size=data_config.image_size,
        caption_json_field=data_config.get("caption_json_field", "caption"),
        empty_captions=data_config.get("empty_captions", "drop"),
        seed=seed,
        random_crop=data_config.get("random_crop", False),
        flip=data_config.get("random_flip", False),
    )
    tokenizer = _tokenizer_copy(tokenizer)
    num_workers = max(int(data_config.get("num_workers", 1)), 1)
    worker_kind = data_config.get("decode_workers", "threads")
    if worker_kind not in DECODE_WORKER_KINDS:
        raise ValueError(f"data.decode_workers={worker_kind!r} must be one of "
                         f"{DECODE_WORKER_KINDS}")
    prefetch = int(data_config.get("prefetch", 2))

    if data_config.source == "tar":
        shards = resolve_paths(data_config, workdir)
        stream_options = dict(
            seed=seed, process_index=process_index, process_count=process_count,
            shuffle_buffer=data_config.shuffle_buffer,
            cycle_length=data_config.get("tar_cycle_length", 4),
            retries=data_config.get("read_retries", 3),
            backoff_s=data_config.get("read_backoff_s", 1.0),
            storage_options=storage_options(data_config),
        )
        sources.TarStream(shards, **stream_options)  # checks the shard count up front
        identity = {"source": "tar", "data": _fingerprint(shards), "seed": seed}

        def build(position):
            stream = sources.TarStream(shards, **stream_options, start=position)
            batches = _Batcher(stream, batch_size=batch_size, tokenizer=tokenizer,
                               decoder=decoder, num_threads=num_workers)
            return _prefetched(batches, prefetch)
    elif data_config.source in RANDOM_ACCESS_SOURCES:
        source = open_random_access(data_config, workdir)
        if len(source) == 0:
            raise ValueError(f"data.source={data_config.source!r} holds no records")
        identity = {"source": data_config.source, "data": _fingerprint(source.fingerprint()),
                    "seed": seed}
        # Grain reshuffles each epoch with seed + epoch; seeds must fit in 32 bits.
        ordered = grain.MapDataset.source(source).shuffle(seed % 2**32).repeat()
        host = _HostElements(ordered, num_records=len(source), batch_size=batch_size,
                             process_index=process_index, process_count=process_count)

        def build(position):
            start = position["element"] if position else 0
            elements = host[start:].map(decoder)
            if worker_kind == "processes" and num_workers > 1:
                _allow_grain_flags()
                decoded = elements.to_iter_dataset().mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=num_workers,
                                                 per_worker_buffer_size=batch_size))
            else:
                decoded = elements.to_iter_dataset(grain.ReadOptions(
                    num_threads=num_workers, prefetch_buffer_size=2 * batch_size))
            batches = _Batcher(decoded, batch_size=batch_size, tokenizer=tokenizer,
                               decoder=None, num_threads=0)
            return _prefetched(batches, prefetch)
    else:
        raise ValueError(f"config.data.source={data_config.source!r} must be one of "
                         f"{DATA_SOURCES}")
    return TrainIterator(build=build, identity=identity, process_index=process_index,
                         process_count=process_count, batch_size=batch_size)


def _allow_grain_flags() -> None:
    """Grain's worker processes read its absl flags; outside an absl app (tests, notebooks)
    they are unparsed, and their defaults are what is wanted."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _fingerprint(description) -> str:
    """A short digest of what the data is, so a state is never applied to other data."""
    return hashlib.sha1(json.dumps(description).encode()).hexdigest()[:16]


def _prefetched(batches: grain.IterDataset, prefetch: int) -> grain.IterDataset:
    if prefetch <= 0:
        return batches
    # Grain's prefetch keeps the state of the element it hands out, not of what it read ahead.
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)


# --- captions for the tokenizer, and what a run needs on disk --------------------------------


def read_captions(data_config, limit: int, *, workdir: str = "", seed: int = 0) -> list[str]:
    """Up to `limit` captions in the source's stored order (what a BPE tokenizer is trained on).

    Samples without a usable caption are passed over; a damaged tar shard ends its part.
    """
    fields = json_fields(data_config.get("caption_json_field", "caption"))
    rng = np.random.default_rng(seed)
    captions: list[str] = []

    def take(sample) -> bool:
        if "__skip__" not in sample:
            text, _ = choose_caption(sample, fields, rng)
            if text is not None:
                captions.append(text)
        return len(captions) >= limit

    if limit <= 0:
        return captions
    if data_config.source == "tar":
        options = storage_options(data_config)
        for url in resolve_paths(data_config, workdir):
            for sample in sources.read_shard(url, retries=0, backoff_s=0.0,
                                              storage_options=options):
                if take(sample):
                    return captions
        return captions
    source = open_random_access(data_config, workdir)
    for index in range(len(source)):
        if take(source[index]):
            break
    return captions


def held_out_combinations(data_config) -> tuple[tuple[str, str], ...]:
    """data.synthetic_held_out ("red triangle", ...) as (colour, shape) pairs."""
    return tuple(tuple(item.split()) for item in data_config.synthetic_held_out)


def write_synthetic_data(config, workdir: str) -> list[str]:
    """The demo dataset as ArrayRecord files in <workdir>/data, written once (this process)."""
    from data_pipeline.synthetic import write_synthetic_shards

    data_dir = os.path.join(workdir, SYNTHETIC_DIR)
    info_path = os.path.join(data_dir, "dataset_info.json")
    if os.path.exists(info_path):
        with open(info_path) as handle:
            if json.load(handle).get("format") == "array_record":
                return resolve_paths(config.data, workdir)
    logger.info("writing the synthetic demo dataset to %s", data_dir)
    data = config.data
    return write_synthetic_shards(
        data_dir, num_samples=data.synthetic_num_samples, num_shards=data.synthetic_num_shards,
        image_size=data.image_size, seed=config.seed,
        two_shape_prob=data.synthetic_two_shape_prob, held_out=held_out_combinations(data),
        file_format="array_record",
    )


def check_data_exists(data_config, workdir: str) -> None:
    """FileNotFoundError / ValueError naming data.paths or data.tfds_name when they match
    nothing (the first remote URL is checked with one request)."""
    if data_config.source == "tfds":
        open_random_access(data_config, workdir)
        return
    paths = resolve_paths(data_config, workdir)
    first = paths[0]
    if sources.is_url(first) and not first.startswith("file://"):
        sources.check_remote_exists(first, storage_options(data_config))


def prepare_tokenizer(config, workdir: str) -> None:
    """For the demo encoder's "bpe" tokenizer: train it on the first captions of the data and
    save it in the workdir, once. A resumed run (or the sampler) reads the saved one, so token
    ids never change under a checkpoint."""
    from models.text_encoder import (
        TOKENIZER_FILE,
        save_bpe_tokenizer,
        train_bpe_tokenizer,
        uses_bpe_tokenizer,
    )

    text = config.model.text_encoder
    if not uses_bpe_tokenizer(text) or os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
        return
    start = time.time()
    captions = read_captions(config.data, text.bpe_train_captions, workdir=workdir,
                             seed=config.seed)
    if not captions:
        raise ValueError(f"no captions in the data (data.source={config.data.source!r}) to "
                         "train the BPE tokenizer on")
    tokenizer = train_bpe_tokenizer(captions, text.bpe_vocab_size, text.max_length)
    lengths = np.array([len(ids) for ids in tokenizer.tokenizer(captions)["input_ids"]])
    too_long = int((lengths > text.max_length).sum())
    logger.info(
        "trained a byte-level BPE tokenizer on %d captions in %.1fs: %d tokens, captions "
        "%d-%d tokens (mean %.1f) with the end token; max_length %d",
        len(captions), time.time() - start, tokenizer.vocab_size, lengths.min(),
        lengths.max(), lengths.mean(), text.max_length,
    )
    if too_long and config.data.source == "synthetic":
        raise ValueError(
            f"config.model.text_encoder.max_length={text.max_length} would truncate "
            f"{too_long} of {len(captions)} synthetic captions (the longest is "
            f"{lengths.max()} BPE tokens with the end token)"
        )
    if too_long:
        logger.warning("%d of %d captions (%.1f%%) are longer than max_length=%d tokens and "
                       "will be truncated", too_long, len(captions),
                       100 * too_long / len(captions), text.max_length)
    save_bpe_tokenizer(tokenizer, workdir)


def prepare_inputs(config, workdir: str) -> None:
    """What a run needs on disk before its iterator starts, done by process 0, then a barrier:
    the synthetic demo data, the BPE tokenizer; checks that data.paths / data.tfds_name exist."""
    import jax

    if jax.process_index() == 0:
        if config.data.source == "synthetic":
            write_synthetic_data(config, workdir)
        check_data_exists(config.data, workdir)
        prepare_tokenizer(config, workdir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("data_inputs_prepared")


def synthetic_tokenizer_workdir(config, num_captions: int = 5000) -> str:
    """A scratch workdir with the BPE tokenizer a training run on the synthetic data would write
    (trained on `num_captions` generated captions): for benchmarks and tests that build the demo
    encoder without a training run. Nothing is written for other tokenizers."""
    from data_pipeline.synthetic import sample_captions
    from models.text_encoder import save_bpe_tokenizer, train_bpe_tokenizer, uses_bpe_tokenizer

    workdir = tempfile.mkdtemp(prefix="t2i_tokenizer_")
    text = config.model.text_encoder
    if uses_bpe_tokenizer(text):
        captions = sample_captions(num_captions, seed=config.seed,
                                   two_shape_prob=config.data.synthetic_two_shape_prob,
                                   held_out=held_out_combinations(config.data))
        save_bpe_tokenizer(train_bpe_tokenizer(captions, text.bpe_vocab_size, text.max_length),
                           workdir)
    return workdir
