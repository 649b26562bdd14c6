"""Image bytes -> uint8 RGB arrays of a fixed size: the one decoder used by training, `prepare`
and the benchmarks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode to uint8 [image_size, image_size, 3]: shorter side resized, then centre-cropped."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays large enough.
            image.draft("RGB", (image_size, image_size))
        image.load()
        rgb = _to_rgb(image)
    width, height = rgb.size
    if (width, height) != (image_size, image_size):
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Cropping via `box` resamples only the centre square, in one pass; PIL's bicubic filter
        # widens with the scale factor, so large downscales are area-averaged, not aliased.
        rgb = rgb.resize(
            (image_size, image_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    # Transparent pixels carry arbitrary colour; compositing on white is what viewers show.
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
