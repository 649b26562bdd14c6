"""Image bytes -> uint8 RGB arrays of a fixed size: the one decoder used by training, `prepare`
and the benchmarks.

Images that cannot make a training example raise `ImageRejected` with a `reason` from
`REJECT_REASONS`, so callers can count skips by reason without parsing messages.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# The one list of rejection reasons; counters elsewhere are named skipped_<reason>.
REJECT_REASONS = ("empty", "decode", "too_small", "aspect_ratio", "too_large")

# An image whose shorter side is under this many pixels is noise at any training size (1x1
# tracking pixels, icons); an explicit `min_side` raises the bar.
DEFAULT_MIN_SIDE = 8
# The centre crop keeps 1/ratio of the image: at 10:1 a caption mostly describes what was cut.
DEFAULT_MAX_ASPECT_RATIO = 10.0
# PIL's own decompression-bomb threshold (about 89 M pixels), checked from the header before
# any pixel is decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# File extension to write for each PIL format (what readers pick the image member by).
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                     "TIFF": "tiff", "MPO": "jpg"}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageRejected(ValueError):
    """An image that cannot become a training example; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    extension: str  # from FORMAT_EXTENSIONS, or the PIL format name lower-cased
    width: int  # as displayed, i.e. after EXIF orientation
    height: int


def decode_image(
    data: bytes,
    image_size: int,
    *,
    random_crop: bool = False,
    flip: bool = False,
    rng: np.random.Generator | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode to uint8 [image_size, image_size, 3]: shorter side resized, then a square crop.

    The crop is centred unless `random_crop`; `flip` mirrors the result horizontally with
    probability 1/2 (off by default: captions say "left" and "right"). Both draw from `rng`,
    crop offset first, so the same generator state gives the same output.
    Raises ImageRejected for empty, undecodable, too small, too elongated or too large images.
    """
    if (random_crop or flip) and rng is None:
        raise ValueError("random_crop and flip draw from `rng`; pass a numpy Generator")
    rgb = _open_rgb(data, image_size, min_side, max_aspect_ratio, max_pixels)
    width, height = rgb.size
    side = min(width, height)
    left = top = 0.0
    if random_crop:
        # Whole-pixel offsets along the longer axis; the scale stays "shorter side = size".
        offset = float(rng.integers(0, max(width, height) - side + 1))
        left, top = (offset, 0.0) if width > height else (0.0, offset)
    else:
        left, top = (width - side) / 2, (height - side) / 2
    if (width, height) != (image_size, image_size):
        # Cropping via `box` resamples only the chosen square, in one pass; PIL's bicubic filter
        # widens with the scale factor, so large downscales are area-averaged, not aliased.
        rgb = rgb.resize(
            (image_size, image_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
    array = np.asarray(rgb, dtype=np.uint8)
    if flip and rng.random() < 0.5:
        array = np.ascontiguousarray(array[:, ::-1])
    return array


def inspect_image(
    data: bytes,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    validate_size: int = 32,
) -> ImageInfo:
    """Format and displayed size of an image, after decoding it the way training will.

    Runs `decode_image` (at a small `validate_size`, so JPEGs decode in draft mode) and
    raises ImageRejected for exactly the images training would skip.
    """
    decode_image(data, validate_size, min_side=min_side, max_aspect_ratio=max_aspect_ratio,
                 max_pixels=max_pixels)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if _exif_orientation(image) in (5, 6, 7, 8):
            width, height = height, width
        pil_format = image.format or ""
    return ImageInfo(FORMAT_EXTENSIONS.get(pil_format, pil_format.lower()), width, height)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not cost the picture
        return 1


def _open_rgb(data: bytes, image_size: int, min_side: int, max_aspect_ratio: float,
              max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Size limits are checked below from the header; PIL's own warning would only
            # duplicate that as noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                _check_size(width, height, min_side, max_aspect_ratio, max_pixels)
                if image.format == "JPEG":
                    # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays large
                    # enough (3-4x faster). The target is square, so EXIF rotation below cannot
                    # make a side too short.
                    image.draft("RGB", (image_size, image_size))
                image.load()
                orientation = _exif_orientation(image)
                if orientation != 1:
                    image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected("too_large", str(error)) from error
    except Exception as error:  # PIL raises many types for bad bytes; all mean "decode"
        raise ImageRejected("decode", f"{type(error).__name__}: {error}") from error


def _check_size(width: int, height: int, min_side: int, max_aspect_ratio: float,
                max_pixels: int) -> None:
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}, shorter side under {min_side}")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageRejected(
            "aspect_ratio", f"{width}x{height}, longer side over {max_aspect_ratio:g}x the shorter"
        )
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} is over {max_pixels} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _high_depth_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        # CMYK: PIL undoes Adobe's inverted CMYK JPEGs itself; no ICC colour management.
        return image.convert("RGB")
    # Transparent pixels carry arbitrary colour; compositing on white is what viewers show.
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale, which PIL's convert("RGB") clips to 255 (white)."""
    values = np.asarray(image)
    if image.mode == "F":
        # Float images are stored either in [0, 1] or in 8-bit units.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        grey = np.nan_to_num(values.astype(np.float32) * scale)
    else:
        # 16-bit full range maps onto 8-bit full range: 65535 / 257 = 255.
        grey = values.astype(np.float32) / 257.0
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
