"""Tar shards in the img2dataset / WebDataset layout: naming, streaming reads, writing.

A shard is a tar file (optionally gzip/bz2/xz compressed) whose members are grouped into
samples by key: `000000123.png`, `000000123.txt` and `000000123.json` form one sample with key
`000000123`. Reads are strictly sequential, so a shard is never held in memory and remote shards
need no seeking or Range requests.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from typing import IO

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
    return bool(_URL_RE.match(path))


def expand_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Tar shard paths or URLs of a spec: see sources.expand_paths (directories list *.tar).
    Raises FileNotFoundError naming the part that matches nothing."""
    from data_pipeline.sources import expand_paths

    return expand_paths(spec, patterns=("*.tar",))


def open_stream(url_or_path: str, storage_options: dict | None = None) -> IO[bytes]:
    """Open a shard for sequential reading: local path, http(s), or any fsspec URL (gs://, s3://).

    `storage_options` go to the fsspec filesystem (e.g. {"endpoint_url": ...} for s3fs)."""
    if not is_url(url_or_path) or url_or_path.startswith("file://"):
        path = url_or_path.removeprefix("file://")
        return open(path, "rb")
    scheme = url_or_path.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        fsspec = None
    if fsspec is not None:
        try:
            # block_size=0 asks fsspec for a plain stream: no Range requests, no size probe,
            # so servers without Range support (and chunked responses) work too.
            options = {"block_size": 0} if scheme in ("http", "https") else {}
            options.update(storage_options or {})
            return fsspec.open(url_or_path, "rb", **options).open()
        except ImportError:
            # fsspec's http backend needs aiohttp; urllib below needs nothing extra.
            if scheme not in ("http", "https"):
                raise
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url_or_path, timeout=60)
    raise ValueError(
        f"cannot open {url_or_path!r}: scheme {scheme!r} needs fsspec (and its backend, "
        "e.g. gcsfs or s3fs) installed"
    )


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset rule: key = path up to the first '.' of the basename, extension = the rest."""
    directory, basename = os.path.split(name)
    stem, dot, extension = basename.partition(".")
    if not stem or not dot:
        return None  # no extension, or a dot-file: not part of any sample
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _require_end_of_archive(archive: tarfile.TarFile, url_or_path: str) -> None:
    """Raise unless tarfile stopped at the end-of-archive marker.

    tarfile ends iteration just as quietly where the stream stops (between members or inside a
    header) or where a header does not parse. The first leaves the last sample short of members,
    the second drops the rest of the shard without a trace; both count as damage here.
    """
    stream = archive.fileobj
    if stream.tell() - archive.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"{url_or_path}: ends at byte {stream.tell()} without the end-of-archive marker"
        )
    # The marker is zero blocks, and only zero padding may follow it.
    while chunk := stream.read(1 << 16):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(
                f"{url_or_path}: unreadable tar header at byte {archive.offset}"
            )


def iter_tar_members(
    url_or_path: str, storage_options: dict | None = None
) -> Iterator[tuple[str, bytes]]:
    """Stream (member name, payload) for the regular files of a tar (optionally gzip/bz2/xz).

    Damage raises tarfile.ReadError (or OSError from the transport), including a stream cut
    exactly between members.
    """
    # "r|" is tarfile's forward-only mode: no seeking, so remote shards are read as they arrive.
    with (
        open_stream(url_or_path, storage_options) as raw,
        tarfile.open(fileobj=raw, mode="r|*") as archive,
    ):
        while (info := archive.next()) is not None:
            # tarfile keeps every header it has read, for random access a stream never makes;
            # dropping them keeps memory flat however many members a shard holds.
            archive.members.clear()
            if info.isreg():
                yield info.name, archive.extractfile(info).read()
        _require_end_of_archive(archive, url_or_path)


def iter_tar_samples(url_or_path: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Stream the samples of one shard as dicts {"__key__", "__url__", ext: bytes}.

    Consecutive members with the same key form one sample. A truncated or corrupt shard raises
    tarfile.ReadError (or OSError from the transport) after yielding the complete samples
    before the damage; the sample at the point of damage is never yielded.
    """
    current: dict | None = None
    for name, payload in iter_tar_members(url_or_path, storage_options):
        parsed = split_member_name(name)
        if parsed is None:
            continue
        key, ext = parsed
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url_or_path}
        current[ext] = payload
    if current is not None:
        yield current


class TarShardWriter:
    """Writes one shard; the file appears under its final name only once it is complete.

    Headers carry fixed mtime/owner so the same samples give byte-identical shards.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._tmp_path = self.path + ".incomplete"
        self._file = open(self._tmp_path, "wb")
        self._archive = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0
        self._closed = False

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._closed:
            raise ValueError(f"shard {self.path} is already closed")
        if not key or "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} must be non-empty with no '.' in its basename")
        for ext, payload in fields.items():
            if not ext or ext.startswith("."):
                raise ValueError(f"extension {ext!r} for key {key!r} must be non-empty, no '.'")
            if isinstance(payload, str):
                payload = payload.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._archive.addfile(info, io.BytesIO(payload))
        self.num_samples += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._archive.close()
        self._file.close()
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Drop a partly written shard, leaving no file that looks complete."""
        if self._closed:
            return
        self._closed = True
        self._archive.close()
        self._file.close()
        os.remove(self._tmp_path)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
