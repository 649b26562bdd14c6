import json

import pytest

from data_pipeline.records import RecordFormatError, decode_record, encode_record


def test_record_round_trip_keeps_image_bytes_and_captions():
    image = bytes(range(256)) * 3
    record = encode_record("000042", image, ".PNG", ["a red circle", "rot"], {"width": 32})
    sample = decode_record(record)
    assert sample["__key__"] == "000042"
    assert sample["png"] == image
    meta = json.loads(sample["json"])
    assert meta["captions"] == ["a red circle", "rot"]
    assert meta["width"] == 32


@pytest.mark.parametrize("damage", [b"", b"\x01\x00", b"\xff\xff\x00\x00{}", b"\x02\x00\x00\x00[]"])
def test_damaged_record_is_a_format_error(damage):
    with pytest.raises(RecordFormatError):
        decode_record(damage)
