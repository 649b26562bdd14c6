"""The training input pipeline: tar shards -> shuffled, decoded, tokenized host batches.

Everything here runs on the host (numpy and PIL); the train loop puts batches on devices.
The batch sequence is a function of (shards, seed, process_index, process_count) alone, so a
rerun with the same inputs sees the same data in the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from data_pipeline.images import IMAGE_EXTENSIONS, decode_image
from data_pipeline.shards import expand_shards, iter_tar_samples

logger = logging.getLogger(__name__)

# What a damaged, truncated or unreachable shard raises while being streamed.
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclasses.dataclass
class PipelineStats:
    """Counters of this host's pipeline; updated by the producer, so ahead of the consumer.

    skipped_other counts samples with no image member and shards that could not be read to the
    end (truncated, corrupt or unreachable); samples before the damage are still used.
    """

    samples_read: int = 0
    samples_yielded: int = 0
    skipped_decode: int = 0
    skipped_no_caption: int = 0
    skipped_other: int = 0
    shards_opened: int = 0
    epochs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _pick_text(value, rng: np.random.Generator) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        texts = [item.strip() for item in value if isinstance(item, str) and item.strip()]
        if texts:
            return texts[int(rng.integers(len(texts)))]
    return None


def choose_caption(
    sample: dict, caption_keys: Sequence[str], rng: np.random.Generator
) -> str | None:
    """The first usable caption among caption_keys; json members give "caption" or "captions"."""
    for key in caption_keys:
        payload = sample.get(key)
        if payload is None:
            continue
        if key.endswith("json"):
            try:
                metadata = json.loads(payload)
            except ValueError:
                continue
            if isinstance(metadata, dict):
                for field in ("caption", "captions"):
                    text = _pick_text(metadata.get(field), rng)
                    if text:
                        return text
            continue
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if text:
            return text
    return None


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TrainIterator:
    """Infinite iterator of batches {"images", "input_ids", "captions"} for this host.

    Use as a context manager (or call close()) so the prefetch thread and open shards are
    released.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        batch_size: int,
        image_size: int,
        tokenizer: Callable[[list[str]], np.ndarray],
        seed: int,
        shuffle_buffer: int = 1000,
        process_index: int = 0,
        process_count: int = 1,
        caption_keys: Sequence[str] = ("txt", "caption", "json"),
        prefetch: int = 2,
    ):
        if batch_size < 1 or image_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and image_size ({image_size}) must be >= 1"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index ({process_index}) must be in [0, process_count={process_count})"
            )
        if len(shards) < process_count:
            raise ValueError(
                f"{len(shards)} shard(s) for {process_count} hosts: host {process_index} would get "
                "no shards; write at least one shard per host"
            )
        self.shards = list(shards)
        self.batch_size = batch_size
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.process_index = process_index
        self.process_count = process_count
        self.caption_keys = tuple(caption_keys)
        self.stats = PipelineStats()
        self._warned_shards: set[str] = set()
        self._batches = self._generate_batches()
        self._closed = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(
                target=self._produce, name="train-data-prefetch", daemon=True
            )
            self._thread.start()

    def host_shards(self, epoch: int) -> list[str]:
        """This host's shards for an epoch, in reading order.

        All hosts shuffle the full list with the same (seed, epoch), then take every
        process_count-th shard, so within an epoch the hosts' shards are disjoint and cover all.
        """
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.process_index :: self.process_count]]

    def _read_shard(self, shard: str) -> Iterator[dict]:
        self.stats.shards_opened += 1
        samples = iter_tar_samples(shard)
        try:
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    return
                except _SHARD_ERRORS as error:
                    self.stats.skipped_other += 1
                    if shard not in self._warned_shards:
                        self._warned_shards.add(shard)
                        logger.warning("skipping the rest of shard %s: %r", shard, error)
                    return
                self.stats.samples_read += 1
                yield sample
        finally:
            samples.close()

    def _prepare(self, sample: dict, rng: np.random.Generator) -> tuple[np.ndarray, str] | None:
        text = choose_caption(sample, self.caption_keys, rng)
        if text is None:
            self.stats.skipped_no_caption += 1
            return None
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            self.stats.skipped_other += 1
            return None
        try:
            image = decode_image(data, self.image_size)
        except Exception:  # PIL raises many types for bad bytes; all mean "skip"
            self.stats.skipped_decode += 1
            return None
        return image, text

    def _examples(self) -> Iterator[tuple[np.ndarray, str]]:
        """Decoded (image, caption) pairs through a shuffle buffer, epoch after epoch.

        The buffer holds decoded images (shuffle_buffer x H x W x 3 bytes), so every skip is
        counted when read and an epoch with nothing usable is detected exactly.
        """
        buffer: list[tuple[np.ndarray, str]] = []
        seen_full_epoch = False
        for epoch in itertools.count():
            rng = np.random.default_rng((self.seed, self.process_index, epoch))
            usable = 0
            for shard in self.host_shards(epoch):
                for sample in self._read_shard(shard):
                    example = self._prepare(sample, rng)
                    if example is None:
                        continue
                    usable += 1
                    if self.shuffle_buffer <= 1:
                        yield example
                    elif len(buffer) >= self.shuffle_buffer or (seen_full_epoch and buffer):
                        # A host with less data than the buffer starts yielding after one epoch
                        # instead of re-reading its shards until the buffer fills.
                        index = int(rng.integers(len(buffer)))
                        buffer[index], example = example, buffer[index]
                        yield example
                    else:
                        buffer.append(example)
            self.stats.epochs += 1
            if usable == 0:
                raise RuntimeError(
                    f"host {self.process_index}: a full pass over its shards "
                    f"{self.host_shards(epoch)} gave no usable sample; stats: "
                    f"{self.stats.as_dict()}"
                )
            seen_full_epoch = True

    def _generate_batches(self) -> Iterator[dict]:
        examples = self._examples()
        try:
            while True:
                chunk = list(itertools.islice(examples, self.batch_size))
                captions = [text for _, text in chunk]
                input_ids = np.asarray(self.tokenizer(captions), dtype=np.int32)
                if input_ids.ndim != 2 or input_ids.shape[0] != len(captions):
                    raise ValueError(
                        f"tokenizer returned shape {input_ids.shape} for {len(captions)} captions; "
                        "expected [num_captions, max_length]"
                    )
                self.stats.samples_yielded += len(chunk)
                yield {
                    "images": np.stack([image for image, _ in chunk]),
                    "input_ids": input_ids,
                    "captions": captions,
                }
        finally:
            examples.close()

    def _produce(self) -> None:
        try:
            for batch in self._batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer to re-raise
            self._queue.put(_Failure(error))
        finally:
            self._batches.close()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        if self._queue is None:
            return next(self._batches)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            # Drain so a producer blocked on a full queue sees the stop flag.
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        else:
            self._batches.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def make_train_iterator(
    shards: str | os.PathLike | Sequence[str],
    *,
    batch_size: int,
    image_size: int,
    tokenizer: Callable[[list[str]], np.ndarray],
    seed: int,
    shuffle_buffer: int = 1000,
    process_index: int = 0,
    process_count: int = 1,
    caption_keys: Sequence[str] = ("txt", "caption", "json"),
    prefetch: int = 2,
) -> TrainIterator:
    """Batches {"images": uint8 [B,H,W,3], "input_ids": int32 [B,L], "captions": list[str]}.

    `shards` is anything expand_shards accepts. `tokenizer(list_of_str)` returns int [N, L].
    prefetch > 0 decodes that many batches ahead on a background thread.
    """
    return TrainIterator(
        expand_shards(shards),
        batch_size=batch_size,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        process_index=process_index,
        process_count=process_count,
        caption_keys=caption_keys,
        prefetch=prefetch,
    )


def read_captions(
    shards: Sequence[str], limit: int, *, caption_keys: Sequence[str] = ("txt", "caption", "json"),
    seed: int = 0,
) -> list[str]:
    """Up to `limit` captions from the shards in the given order (what a tokenizer is trained
    on). Samples without a usable caption are passed over; a damaged shard ends its part of
    the read, as in training."""
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    for shard in shards:
        try:
            for sample in iter_tar_samples(shard):
                text = choose_caption(sample, caption_keys, rng)
                if text is not None:
                    captions.append(text)
                    if len(captions) >= limit:
                        return captions
        except _SHARD_ERRORS as error:
            logging.warning("reading captions from %s stopped early: %s", shard, error)
    return captions
