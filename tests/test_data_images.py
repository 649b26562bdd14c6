import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import (
    REJECT_REASONS,
    ImageRejected,
    decode_image,
    inspect_image,
)


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _stripes(width: int, height: int) -> np.ndarray:
    """Blue image, red columns in the middle fifth: where the crop lands is visible."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, :, 2] = 255
    array[:, width * 2 // 5 : width * 3 // 5] = (255, 0, 0)
    return array


def test_resizes_shorter_side_and_centre_crops():
    # 80x40 -> the centre 40x40 square (columns 20..60) at 16x16; red only in columns 32..48.
    data = _encode(Image.fromarray(_stripes(80, 40)), "JPEG", quality=95)
    out = decode_image(data, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 6:10, 0].min() > 200 and out[:, 6:10, 2].max() < 60
    assert out[:, :2, 2].min() > 200 and out[:, -2:, 2].min() > 200


def test_sixteen_bit_mid_grey_stays_mid_grey():
    grey16 = Image.fromarray(np.full((12, 12), 32768, np.uint16))
    data = _encode(grey16, "PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I;16"  # the case PIL's convert("RGB") clips to white
    out = decode_image(data, 8)
    np.testing.assert_array_equal(out, np.full((8, 8, 3), 128, np.uint8))
    # Full 16-bit range maps onto full 8-bit range.
    ramp = Image.fromarray(np.array([[0] * 12, [65535] * 12] * 6, np.uint16))
    out = decode_image(_encode(ramp, "TIFF"), 12)
    assert out.min() == 0 and out.max() == 255


def test_cmyk_jpeg_decodes_to_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = decode_image(_encode(cyan, "JPEG", quality=95), 8).astype(int)
    assert out[..., 0].max() < 30 and out[..., 1].min() > 225 and out[..., 2].min() > 225


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG"), 8), np.full((8, 8, 3), 255))
    # Palette image: index 0 transparent (black), index 1 opaque red.
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 4))
    out = decode_image(_encode(palette, "PNG", transparency=0), 8)
    np.testing.assert_array_equal(out[:4], np.broadcast_to([255, 0, 0], (4, 8, 3)))
    np.testing.assert_array_equal(out[4:], np.full((4, 8, 3), 255))
    # Greyscale with alpha.
    la = Image.new("LA", (8, 8), (0, 0))
    np.testing.assert_array_equal(decode_image(_encode(la, "PNG"), 8), np.full((8, 8, 3), 255))


def test_greyscale_becomes_three_equal_channels():
    grey = Image.new("L", (8, 8), 77)
    out = decode_image(_encode(grey, "PNG"), 8)
    np.testing.assert_array_equal(out, np.full((8, 8, 3), 77))


def test_exif_orientation_is_applied():
    # Stored landscape 32x16, left half red; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the displayed image is portrait with red on top.
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, 16).astype(int)
    # Portrait 16x32 display, centre crop rows 8..24: top half red, bottom half blue.
    assert out[:6, :, 0].min() > 200 and out[:6, :, 2].max() < 60
    assert out[-6:, :, 2].min() > 200 and out[-6:, :, 0].max() < 60
    info = inspect_image(data)
    assert (info.extension, info.width, info.height) == ("jpg", 16, 32)


def test_random_crop_is_reproducible_and_moves():
    data = _encode(Image.fromarray(_stripes(120, 20)), "PNG")
    centre = decode_image(data, 20)
    crops = [decode_image(data, 20, random_crop=True, rng=np.random.default_rng(seed))
             for seed in range(12)]
    again = [decode_image(data, 20, random_crop=True, rng=np.random.default_rng(seed))
             for seed in range(12)]
    for first, second in zip(crops, again, strict=True):
        np.testing.assert_array_equal(first, second)
    assert len({crop.tobytes() for crop in crops}) > 3
    # Every crop is a 20x20 window of the image at its own scale.
    array = _stripes(120, 20)
    windows = {array[:, x : x + 20].tobytes() for x in range(101)}
    assert all(crop.tobytes() in windows for crop in crops)
    assert not all(np.array_equal(crop, centre) for crop in crops)
    with pytest.raises(ValueError, match="rng"):
        decode_image(data, 20, random_crop=True)


def test_flip_mirrors_half_of_the_time_and_is_off_by_default():
    array = np.zeros((8, 8, 3), np.uint8)
    array[:, :4] = (255, 0, 0)
    data = _encode(Image.fromarray(array), "PNG")
    plain = decode_image(data, 8)
    np.testing.assert_array_equal(plain, array)
    rng = np.random.default_rng(0)
    outs = [decode_image(data, 8, flip=True, rng=rng) for _ in range(40)]
    flipped = sum(np.array_equal(out, array[:, ::-1]) for out in outs)
    unflipped = sum(np.array_equal(out, array) for out in outs)
    assert flipped + unflipped == 40 and 8 <= flipped <= 32
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(5):
        np.testing.assert_array_equal(decode_image(data, 8, flip=True, rng=rng_a),
                                      decode_image(data, 8, flip=True, rng=rng_b))


@pytest.mark.parametrize(
    ("size", "reason"),
    [((1, 1), "too_small"), ((10000, 10), "aspect_ratio"), ((10, 10000), "aspect_ratio"),
     ((5, 40), "too_small")],
)
def test_absurd_sizes_are_rejected_with_a_reason(size, reason):
    data = _encode(Image.new("RGB", size, (10, 20, 30)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, 8)
    assert caught.value.reason == reason


def test_limits_are_options():
    data = _encode(Image.new("RGB", (40, 20)), "PNG")
    assert decode_image(data, 8).shape == (8, 8, 3)
    with pytest.raises(ImageRejected, match="too_small"):
        decode_image(data, 8, min_side=21)
    with pytest.raises(ImageRejected, match="aspect_ratio"):
        decode_image(data, 8, max_aspect_ratio=1.5)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over one row of data: only a header check
    can reject it cheaply."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 20_000])  # over PIL's warning, over its error limit
def test_decompression_bomb_is_rejected_from_the_header(side):
    with pytest.raises(ImageRejected) as caught:
        decode_image(_png_claiming(side, side), 8)
    assert caught.value.reason == "too_large"
    with pytest.raises(ImageRejected, match="too_large"):
        decode_image(_encode(Image.new("RGB", (64, 64)), "PNG"), 8, max_pixels=1000)


def test_empty_and_corrupt_bytes_are_rejected():
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"", 8)
    assert caught.value.reason == "empty"
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"nonsense", 8)
    assert caught.value.reason == "decode"
    jpeg = _encode(Image.fromarray(_stripes(64, 64)), "JPEG")
    with pytest.raises(ImageRejected) as caught:
        decode_image(jpeg[: len(jpeg) // 2], 8)
    assert caught.value.reason == "decode"
    assert set(REJECT_REASONS) >= {"empty", "decode", "too_small", "aspect_ratio", "too_large"}
    with pytest.raises(ValueError, match="unknown rejection reason"):
        ImageRejected("bogus")


def test_inspect_reports_format_and_size():
    info = inspect_image(_encode(Image.new("RGB", (30, 20)), "WEBP"))
    assert (info.extension, info.width, info.height) == ("webp", 30, 20)
    with pytest.raises(ImageRejected, match="too_small"):
        inspect_image(_encode(Image.new("RGB", (30, 20)), "PNG"), min_side=25)
