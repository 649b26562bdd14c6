"""Host input-pipeline throughput against a webdataset + PIL baseline, as one JSON line.

    python bench/data_pipeline.py [--num_images 640] [--batches 12] [--image_size 256]

Writes JPEG tar shards of twice `image_size` (512px by default; and the same images as
ArrayRecord) to a temporary directory, then times batches of `image_size` crops, shuffle +
caption choice + tokenization + batching included:

- ours: data_pipeline.input_pipeline on the tar shards with 1 and 2 decode workers;
- baseline: the same shards through the `webdataset` library (shuffle buffer, PIL decode,
  resize and centre crop, batching, the same tokenizer), in the main process for 1 worker and in
  a torch DataLoader with 2 worker processes for 2 (webdataset's own way to parallelise);
- ratio = ours / baseline at each worker count;
- ArrayRecord: raw record reads/s, and the pipeline with decode threads versus Grain worker
  processes (what data.decode_workers chooses between).

Timings skip the first batch (start-up, shuffle-buffer fill). Needs the `bench` extra
(webdataset) and torch for the 2-worker baseline.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH_SIZE = 32
NUM_SHARDS = 4
SHUFFLE_BUFFER = 256
MAX_LENGTH = 32


def _jpeg(index, rng, source_size):
    """A 512px photo-like JPEG: smooth colour fields plus light noise, about 40 KB at quality
    90 (the size of a typical 512px web photo)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:source_size, 0:source_size] / source_size
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [127 + 100 * np.sin(6 * x * (c + 1) + 4 * y + phase[c]) for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 3, size=(source_size, source_size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_data(out_dir, num_images, source_size):
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipeline.records import encode_record
    from data_pipeline.shards import TarShardWriter

    rng = np.random.default_rng(0)
    images = [_jpeg(i, rng, source_size) for i in range(num_images)]
    captions = [f"photo number {i} of a textured {('red', 'green', 'blue')[i % 3]} field"
                for i in range(num_images)]
    bounds = np.linspace(0, num_images, NUM_SHARDS + 1).astype(int)
    tars, records = [], []
    for shard in range(NUM_SHARDS):
        tar = os.path.join(out_dir, f"photos-{shard:05d}.tar")
        record = os.path.join(out_dir, f"photos-{shard:05d}.array_record")
        writer = ArrayRecordWriter(record, "group_size:1")
        with TarShardWriter(tar) as tar_writer:
            for i in range(bounds[shard], bounds[shard + 1]):
                tar_writer.write(f"{i:06d}", {"jpg": images[i], "txt": captions[i]})
                writer.write(encode_record(f"{i:06d}", images[i], "jpg", [captions[i]]))
        writer.close()
        tars.append(tar)
        records.append(record)
    return tars, records, sum(len(image) for image in images)


def _time_batches(iterator, batches):
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH_SIZE / (time.perf_counter() - start)


def ours(paths, source, tokenizer, workers, batches, image_size, decode_workers="threads"):
    import ml_collections

    from data_pipeline.input_pipeline import make_train_iterator

    config = ml_collections.ConfigDict({
        "source": source, "paths": ",".join(paths), "image_size": image_size,
        "shuffle_buffer": SHUFFLE_BUFFER, "prefetch": 2, "num_workers": workers,
        "decode_workers": decode_workers, "caption_json_field": "caption",
        "empty_captions": "drop", "tar_cycle_length": NUM_SHARDS, "read_retries": 0,
        "read_backoff_s": 0.0, "storage_options": "",
    })
    with make_train_iterator(config, workdir="", tokenizer=tokenizer, batch_size=BATCH_SIZE,
                             seed=0) as iterator:
        return _time_batches(iterator, batches)


class _PilCrop:
    """webdataset's "pil" decode (a full-size decode), then shorter side resized + centre crop."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, sample):
        import numpy as np
        from PIL import Image

        size, image = self.image_size, sample["jpg"]
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((round(width * scale), round(height * scale)),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        crop = image.crop((left, top, left + size, top + size))
        return np.asarray(crop.convert("RGB")), sample["txt"]


class _Tokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        images, captions = batch
        return images, self.tokenizer(list(captions)), captions


def baseline(paths, tokenizer, workers, batches, image_size):
    import webdataset as wds

    pipeline = (
        wds.WebDataset(paths, shardshuffle=False, empty_check=False,
                       nodesplitter=None, workersplitter=wds.split_by_worker)
        .repeat()
        .shuffle(SHUFFLE_BUFFER)
        .decode("pil")
        .map(_PilCrop(image_size))
        .batched(BATCH_SIZE)
        .map(_Tokenize(tokenizer))
    )
    if workers == 1:
        return _time_batches(iter(pipeline), batches)
    import torch.utils.data

    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                         prefetch_factor=2)
    iterator = iter(loader)
    try:
        return _time_batches(iterator, batches)
    finally:
        del iterator


def array_record_reads(paths, seconds=2.0):
    import numpy as np

    from data_pipeline.sources import ArrayRecordSource

    source = ArrayRecordSource(paths)
    order = np.random.default_rng(0).permutation(len(source))
    count, read_bytes, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sample = source[int(order[count % len(order)])]
        read_bytes += len(sample["jpg"])
        count += 1
    elapsed = time.perf_counter() - start
    return count / elapsed, read_bytes / elapsed / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_images", type=int, default=640)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()
    from models.text_encoder import train_bpe_tokenizer

    # The demo's tokenizer kind: a byte-level BPE (Hugging Face fast tokenizer) trained on the
    # captions, as training does when it starts.
    tokenizer = train_bpe_tokenizer(
        [f"photo number {i} of a textured {c} field" for i in range(500)
         for c in ("red", "green", "blue")], 512, MAX_LENGTH)
    figures = {"bench": "data_pipeline", "num_images": args.num_images,
               "source_size": 2 * args.image_size, "image_size": args.image_size,
               "batch_size": BATCH_SIZE,
               "shuffle_buffer": SHUFFLE_BUFFER, "batches_timed": args.batches,
               "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as out_dir:
        tars, records, jpeg_bytes = write_data(out_dir, args.num_images, 2 * args.image_size)
        figures["mean_jpeg_kb"] = round(jpeg_bytes / args.num_images / 1e3, 1)
        for workers in (1, 2):
            mine = ours(tars, "tar", tokenizer, workers, args.batches, args.image_size)
            base = baseline(tars, tokenizer, workers, args.batches, args.image_size)
            figures[f"images_per_s_{workers}w"] = round(mine, 1)
            figures[f"baseline_images_per_s_{workers}w"] = round(base, 1)
            figures[f"ratio_{workers}w"] = round(mine / base, 2)
        figures["images_per_s"] = figures["images_per_s_1w"]
        figures["baseline_images_per_s"] = figures["baseline_images_per_s_1w"]
        figures["ratio"] = figures["ratio_1w"]
        reads, megabytes = array_record_reads(records)
        figures["array_record_random_reads_per_s"] = round(reads, 1)
        figures["array_record_read_mb_per_s"] = round(megabytes, 1)
        for kind in ("threads", "processes"):
            figures[f"array_record_images_per_s_2w_{kind}"] = round(
                ours(records, "arrayrecord", tokenizer, 2, args.batches, args.image_size, kind),
                1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
