"""Host input-pipeline throughput on this machine, as one JSON line.

    python bench/data_pipeline.py [--num_samples 4000] [--batches 50]

Writes synthetic demo shards to a temporary directory, then times three stages: writing them,
streaming their raw samples (tar reading alone), and the full training iterator (tar reading,
PNG decoding, shuffling, tokenizing, batching) with the demo config's tokenizer. Prefetch is off
so the figure is the pipeline's own single-thread speed, not overlap with a consumer.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH_SIZE = 64
IMAGE_SIZE = 32
NUM_SHARDS = 8
SHUFFLE_BUFFER = 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_samples", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    # Imported here, not at the top: the parallel shard writer's worker processes import this
    # script's module, and should not pay for JAX.
    from configs import demo
    from data_pipeline.pipeline import make_train_iterator
    from data_pipeline.shards import iter_tar_samples
    from data_pipeline.synthetic import write_synthetic_shards
    from models.text_encoder import build_tokenizer
    from train.loop import prepare_tokenizer

    config = demo.get_config()
    workers = min(os.cpu_count() or 1, NUM_SHARDS)

    with tempfile.TemporaryDirectory() as out_dir:
        write_seconds = {}
        for count in (workers, 1):  # the one-process write last, so its shards are read below
            start = time.perf_counter()
            shards = write_synthetic_shards(
                out_dir,
                num_samples=args.num_samples,
                num_shards=NUM_SHARDS,
                image_size=IMAGE_SIZE,
                seed=0,
                progress=False,
                num_workers=count,
            )
            write_seconds[count] = time.perf_counter() - start
        shard_bytes = sum(os.path.getsize(path) for path in shards)
        # The demo config's tokenizer; a BPE one is trained on the shards' captions, as
        # training does when it starts.
        prepare_tokenizer(config, out_dir, shards)
        tokenizer = build_tokenizer(config.model.text_encoder, out_dir)

        start = time.perf_counter()
        samples_read = sum(1 for shard in shards for _ in iter_tar_samples(shard))
        read_seconds = time.perf_counter() - start

        with make_train_iterator(
            shards,
            batch_size=BATCH_SIZE,
            image_size=IMAGE_SIZE,
            tokenizer=tokenizer,
            seed=0,
            shuffle_buffer=SHUFFLE_BUFFER,
            prefetch=0,
        ) as iterator:
            # The first batch also fills the shuffle buffer, so it is timed apart.
            start = time.perf_counter()
            next(iterator)
            first_batch_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.batches):
                next(iterator)
            pipeline_seconds = time.perf_counter() - start
            stats = iterator.stats.as_dict()

    print(
        json.dumps(
            {
                "bench": "data_pipeline",
                "num_samples": args.num_samples,
                "num_shards": NUM_SHARDS,
                "image_size": IMAGE_SIZE,
                "shard_mb": round(shard_bytes / 1e6, 2),
                "write_images_per_sec": round(args.num_samples / write_seconds[1], 1),
                "write_workers": workers,
                "write_images_per_sec_parallel": round(
                    args.num_samples / write_seconds[workers], 1
                ),
                "read_samples_per_sec": round(samples_read / read_seconds, 1),
                "samples_read": samples_read,
                "batch_size": BATCH_SIZE,
                "shuffle_buffer": SHUFFLE_BUFFER,
                "batches": args.batches,
                "first_batch_seconds": round(first_batch_seconds, 3),
                "pipeline_images_per_sec": round(args.batches * BATCH_SIZE / pipeline_seconds, 1),
                "pipeline_stats": stats,
            }
        )
    )


if __name__ == "__main__":
    main()
