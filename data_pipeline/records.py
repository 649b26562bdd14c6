"""One captioned image as one ArrayRecord record (what `prepare` writes, what the arrayrecord
source reads).

Layout: 4-byte little-endian header length, a UTF-8 JSON header, then the encoded image bytes
exactly as they were on disk (no re-encoding, so nothing is lost to a second JPEG pass):

    header = {"key": str, "image_ext": "jpg"|"png"|..., "captions": [str, ...], "meta": {...}}

`decode_record` returns the same dict shape a tar sample has ({"__key__", ext: bytes, "json":
bytes}), so caption choice and decoding are shared by every source.
"""

from __future__ import annotations

import json
import struct

_HEADER_LEN = struct.Struct("<I")
FORMAT_VERSION = 1


class RecordFormatError(ValueError):
    """Bytes that are not a record of this format."""


def encode_record(key: str, image_bytes: bytes, image_ext: str, captions: list[str],
                  meta: dict | None = None) -> bytes:
    if not key:
        raise ValueError("record key must be non-empty")
    header = json.dumps(
        {"v": FORMAT_VERSION, "key": key, "image_ext": image_ext.lower().lstrip("."),
         "captions": list(captions), "meta": meta or {}},
        ensure_ascii=False, separators=(",", ":"),
    ).encode("utf-8")
    return _HEADER_LEN.pack(len(header)) + header + image_bytes


def decode_record(record: bytes) -> dict:
    """{"__key__": key, <image_ext>: image bytes, "json": b'{"captions": [...], ...}'}."""
    if len(record) < _HEADER_LEN.size:
        raise RecordFormatError(f"record of {len(record)} bytes is shorter than its header")
    (length,) = _HEADER_LEN.unpack_from(record)
    end = _HEADER_LEN.size + length
    if end > len(record):
        raise RecordFormatError(f"record header claims {length} bytes, record has {len(record)}")
    try:
        header = json.loads(record[_HEADER_LEN.size:end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RecordFormatError(f"record header is not JSON: {error}") from error
    if not isinstance(header, dict) or "key" not in header or "image_ext" not in header:
        raise RecordFormatError("record header lacks 'key' or 'image_ext'")
    metadata = dict(header.get("meta") or {})
    metadata["captions"] = header.get("captions") or []
    return {
        "__key__": header["key"],
        header["image_ext"]: bytes(record[end:]),
        "json": json.dumps(metadata, ensure_ascii=False).encode("utf-8"),
    }
