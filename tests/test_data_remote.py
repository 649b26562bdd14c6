"""Tar shards streamed from a real HTTP server and a real S3 API (moto in server mode), both on
127.0.0.1; a shard that keeps failing is retried, then skipped and counted."""

import functools
import http.server
import io
import json
import logging
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipeline import input_pipeline
from data_pipeline.input_pipeline import make_train_iterator
from data_pipeline.shards import TarShardWriter

NUM_SHARDS, PER_SHARD = 3, 4


def _tokenizer(captions):
    return np.zeros((len(captions), 4), np.int32)


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("remote_shards")
    for shard in range(NUM_SHARDS):
        with TarShardWriter(directory / f"shard-{shard:05d}.tar") as writer:
            for item in range(PER_SHARD):
                index = shard * PER_SHARD + item
                writer.write(f"{index:05d}", {"png": _png(index), "txt": f"caption {index}"})
    return directory


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard directory; "broken" paths always fail, "flaky" ones fail once."""

    failures: dict = {}

    def do_GET(self):
        if "broken" in self.path:
            self.send_error(503, "always down")
            return
        if "flaky" in self.path:
            seen = self.failures.get(self.path, 0)
            self.failures[self.path] = seen + 1
            if seen == 0:
                self.send_error(503, "down once")
                return
            self.path = self.path.replace("flaky-", "")
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(shard_dir):
    handler = functools.partial(_Handler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _config(paths, **overrides):
    config = ml_collections.ConfigDict({
        "source": "tar", "paths": paths, "image_size": 8, "shuffle_buffer": 3, "prefetch": 2,
        "num_workers": 2, "decode_workers": "threads", "caption_json_field": "caption",
        "empty_captions": "drop", "tar_cycle_length": 2, "read_retries": 2,
        "read_backoff_s": 0.01, "storage_options": "",
    })
    config.update(overrides)
    return config


def _keys(config, batches=6):
    with make_train_iterator(config, workdir="", tokenizer=_tokenizer, batch_size=4,
                             seed=1) as iterator:
        keys = [next(iterator)["keys"] for _ in range(batches)]
        return keys, iterator.counters()


def test_http_shards_give_the_same_batches_as_local_ones(shard_dir, http_root):
    local, _ = _keys(_config(str(shard_dir)))
    remote, counters = _keys(_config(f"{http_root}/shard-{{00000..00002}}.tar"))
    assert remote == local
    assert not any(name.startswith("skipped") for name in counters)


def test_a_failing_http_shard_is_retried_then_skipped_and_counted(shard_dir, http_root,
                                                                   caplog):
    paths = (f"{http_root}/shard-00000.tar,{http_root}/broken-00001.tar,"
             f"{http_root}/flaky-shard-00002.tar")
    with caplog.at_level(logging.WARNING):
        keys, counters = _keys(_config(paths), batches=4)
    shards = {key.split("/")[0] for batch in keys for key in batch}
    # The flaky shard came back on retry; the broken one was skipped once per epoch.
    assert shards == {"shard-00000.tar", "flaky-shard-00002.tar"}
    assert counters["skipped_unreadable_shard"] >= 1
    assert "broken-00001.tar" in caplog.text and "retry 2/2" in caplog.text


def test_read_captions_over_http(http_root):
    config = _config(f"{http_root}/shard-00001.tar")
    assert input_pipeline.read_captions(config, 3) == [f"caption {i}" for i in (4, 5, 6)]


@pytest.fixture(scope="module")
def s3_endpoint(shard_dir):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="captioned")
    for path in sorted(shard_dir.glob("*.tar")):
        client.upload_file(str(path), "captioned", f"shards/{path.name}")
    yield endpoint
    server.stop()


def test_s3_shards_are_globbed_and_give_the_same_batches_as_local_ones(shard_dir,
                                                                        s3_endpoint):
    options = json.dumps({"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"})
    config = _config("s3://captioned/shards/*.tar", storage_options=options)
    assert input_pipeline.resolve_paths(config, "") == [
        f"s3://captioned/shards/shard-{i:05d}.tar" for i in range(NUM_SHARDS)]
    remote, counters = _keys(config)
    local, _ = _keys(_config(str(shard_dir)))
    assert remote == local and counters["examples"] == 24
    input_pipeline.check_data_exists(config, "")
    missing = _config("s3://captioned/shards/nothing-*.tar", storage_options=options)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        input_pipeline.resolve_paths(missing, "")
