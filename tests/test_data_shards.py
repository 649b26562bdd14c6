import functools
import gzip
import http.server
import io
import os
import tarfile
import threading

import pytest

from data_pipeline import shards as shards_module
from data_pipeline.shards import TarShardWriter, expand_shards, iter_tar_samples


def _write_shard(path, num_samples, start=0):
    with TarShardWriter(path) as writer:
        for index in range(start, start + num_samples):
            writer.write(
                f"{index:09d}",
                {"png": bytes([index % 256]) * (100 + index), "txt": f"caption {index}".encode()},
            )
    return str(path)


def _strip_url(samples):
    return [{k: v for k, v in sample.items() if k != "__url__"} for sample in samples]


@pytest.fixture
def shard_dir(tmp_path):
    for shard in range(4):
        _write_shard(tmp_path / f"shard-{shard:05d}.tar", 5, start=shard * 5)
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_write_and_read_back(tmp_path):
    path = _write_shard(tmp_path / "one.tar", 7)
    samples = list(iter_tar_samples(path))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert samples[3]["png"] == bytes([3]) * 103
    assert samples[3]["txt"] == b"caption 3"
    assert samples[3]["__url__"] == path
    assert set(samples[0]) == {"__key__", "__url__", "png", "txt"}


def test_writer_output_is_byte_identical_and_tar_compatible(tmp_path):
    first = _write_shard(tmp_path / "a.tar", 3)
    second = _write_shard(tmp_path / "b.tar", 3)
    assert open(first, "rb").read() == open(second, "rb").read()
    with tarfile.open(first) as archive:
        assert archive.getnames()[:2] == ["000000000.png", "000000000.txt"]


def test_failed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with TarShardWriter(tmp_path / "broken.tar") as writer:
            writer.write("000000000", {"txt": b"x"})
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="key"):
        with TarShardWriter(tmp_path / "bad.tar") as writer:
            writer.write("has.dot", {"txt": b"x"})


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_reads_tars_written_by_other_tools(tmp_path, fmt, compression):
    # Long names (GNU long-name and pax records), directories, keys with folders, a multi-dot
    # extension, a member without extension: grouping must match the WebDataset rules.
    long_dir = "d" * 120
    members = [
        ("folder/", None),
        ("folder/a.jpg", b"A" * 700),
        ("folder/a.json", b"{}"),
        (f"{long_dir}/b.seg.png", b"B" * 513),
        (f"{long_dir}/b.txt", "caption é".encode()),
        ("README", b"no extension"),
        ("c.TXT", b"upper"),
    ]
    path = tmp_path / f"other.tar{'.' + compression if compression else ''}"
    with tarfile.open(path, f"w:{compression}", format=fmt) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    samples = list(iter_tar_samples(str(path)))
    assert [s["__key__"] for s in samples] == ["folder/a", f"{long_dir}/b", "c"]
    assert samples[0]["jpg"] == b"A" * 700 and samples[0]["json"] == b"{}"
    assert samples[1]["seg.png"] == b"B" * 513
    assert samples[1]["txt"].decode() == "caption é"
    assert samples[2]["txt"] == b"upper"


def _keys_read_before_error(path, match):
    got = []
    with pytest.raises(tarfile.ReadError, match=match):
        for sample in iter_tar_samples(str(path)):
            got.append(sample)
    assert all(set(s) == {"__key__", "__url__", "png", "txt"} for s in got)
    return [s["__key__"] for s in got]


# In these shards every member is a 512-byte header and one 512-byte payload block: sample i
# starts at byte i * 2048 and its caption member at i * 2048 + 1024.
@pytest.mark.parametrize(
    "cut, match, num_complete",
    [
        (5 * 2048 + 1536 + 4, "unexpected end of data", 5),  # in sample 5's caption payload
        (5 * 2048 + 1024 + 100, "end-of-archive", 5),  # in the caption's header
        (5 * 2048 + 1024, "end-of-archive", 5),  # between sample 5's image and caption
        # In sample 5's image payload: sample 4 is known complete only once a member with
        # another key has been read whole.
        (5 * 2048 + 512 + 50, "unexpected end of data", 4),
    ],
)
def test_truncated_shard_yields_complete_samples_then_raises(tmp_path, cut, match, num_complete):
    data = open(_write_shard(tmp_path / "full.tar", 10), "rb").read()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    keys = _keys_read_before_error(path, match)
    assert keys == [f"{i:09d}" for i in range(num_complete)]


def test_truncated_compressed_shard_raises(tmp_path):
    data = open(_write_shard(tmp_path / "full.tar", 10), "rb").read()
    gz_path = tmp_path / "cut.tar.gz"
    gz_path.write_bytes(gzip.compress(data[: 5 * 2048 + 1024]))
    assert _keys_read_before_error(gz_path, "end-of-archive") == [f"{i:09d}" for i in range(5)]
    gz_path.write_bytes(gzip.compress(data)[:-200])
    with pytest.raises((tarfile.ReadError, EOFError, OSError)):
        list(iter_tar_samples(str(gz_path)))


def test_corrupt_header_raises_instead_of_ending_the_shard(tmp_path):
    # tarfile alone stops at a header with a bad checksum as if the archive ended there.
    data = bytearray(open(_write_shard(tmp_path / "full.tar", 10), "rb").read())
    data[5 * 2048 + 1024] ^= 0xFF
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(data))
    assert _keys_read_before_error(path, "unreadable tar header") == [f"{i:09d}" for i in range(5)]


def test_end_of_archive_with_trailing_padding_is_a_normal_end(tmp_path):
    data = open(_write_shard(tmp_path / "full.tar", 3), "rb").read()
    path = tmp_path / "padded.tar"
    # One end-of-archive block is enough for GNU tar, and writers pad to records of any size.
    path.write_bytes(data[: 3 * 2048 + 512])
    assert len(list(iter_tar_samples(str(path)))) == 3
    path.write_bytes(data + bytes(50_000))
    assert len(list(iter_tar_samples(str(path)))) == 3


def test_expand_shards(shard_dir):
    names = [f"shard-{i:05d}.tar" for i in range(4)]
    full = [str(shard_dir / name) for name in names]
    assert expand_shards(str(shard_dir)) == full
    assert expand_shards(str(shard_dir / "shard-*.tar")) == full
    assert expand_shards(str(shard_dir / "shard-{00001..00003}.tar")) == full[1:]
    assert expand_shards(str(shard_dir / "shard-0000{0,2}.tar")) == [full[0], full[2]]
    assert expand_shards(f"{full[3]},{full[0]}") == [full[3], full[0]]
    assert expand_shards([full[1], str(shard_dir / "shard-0000[23].tar")]) == full[1:]
    assert expand_shards(shard_dir) == full
    assert expand_shards("https://host/data/shard-{000..002}.tar") == [
        "https://host/data/shard-000.tar",
        "https://host/data/shard-001.tar",
        "https://host/data/shard-002.tar",
    ]
    assert expand_shards("gs://bucket/x.tar") == ["gs://bucket/x.tar"]


def test_expand_shards_errors_name_the_spec(shard_dir, tmp_path_factory):
    spec = str(shard_dir / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(spec)
    with pytest.raises(FileNotFoundError, match="00009"):
        expand_shards(str(shard_dir / "shard-{00000..00009}.tar"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="no"):
        expand_shards(str(empty))
    with pytest.raises(FileNotFoundError):
        expand_shards([])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(shard_dir):
    handler = functools.partial(_QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_streaming_over_http_matches_local(shard_dir, http_root):
    urls = expand_shards(f"{http_root}/shard-{{00000..00003}}.tar")
    local = expand_shards(str(shard_dir))
    for url, path in zip(urls, local, strict=True):
        remote_samples = list(iter_tar_samples(url))
        assert remote_samples[0]["__url__"] == url
        assert _strip_url(remote_samples) == _strip_url(iter_tar_samples(path))


def test_http_without_fsspec_uses_urllib(shard_dir, http_root, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fsspec(name, *args, **kwargs):
        if name == "fsspec":
            raise ImportError("no fsspec here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    samples = list(iter_tar_samples(f"{http_root}/shard-00002.tar"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(10, 15)]


def test_missing_http_shard_raises_oserror(http_root):
    with pytest.raises(OSError):
        list(iter_tar_samples(f"{http_root}/missing.tar"))


def test_unknown_scheme_without_backend_is_a_clear_error():
    with pytest.raises((ValueError, ImportError)):
        shards_module.open_stream("nosuchscheme://bucket/x.tar")
