"""Photo-like JPEGs for data-path benchmarks: they decode and augment like photographs.

Flat or few-colour synthetic images compress to a few kilobytes and decode several times faster
than photos, so a loader benchmark on them flatters the data path. These images are a smooth
colour field (bicubic upsampling of a 16x12 random grid), 20 filled discs and per-pixel Gaussian
noise (sigma 10), saved at JPEG quality 90: about 0.8 bits per pixel, like web photos
pre-resized to a 384 px short side (a 512x384 image is 25-35 KB).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def photo_like_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB image of ``size = (width, height)``, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(5, 60)
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 10, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def photo_like_jpeg(seed: int, size: tuple[int, int], quality: int = 90) -> bytes:
    """:func:`photo_like_image` encoded as a baseline JPEG."""
    buf = io.BytesIO()
    photo_like_image(seed, size).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_like_size(index: int, short_side: int) -> tuple[int, int]:
    """(width, height) of image ``index``: 4:3, three landscape for every portrait."""
    long_side = short_side * 4 // 3
    return (long_side, short_side) if index % 4 else (short_side, long_side)
