"""RandAugment(N, M) over the ten ops BLIP pretrains with, as ALBEF/BLIP's ``RandomAugment``.

The reference (``transform/randaugment.py`` in BLIP, numpy + OpenCV) draws N ops with
replacement, applies each with probability 0.5, and maps level M (out of 10) to arguments:

============  ==============================================  ===========================
op            argument at level M                             at M = 5
============  ==============================================  ===========================
Identity      -                                               -
AutoContrast  - (per channel min/max stretch, no cut-off)     -
Equalize      - (per channel histogram equalisation)          -
Brightness    factor (M / 10) * 1.8 + 0.1                     1.0 (no-op)
Sharpness     factor (M / 10) * 1.8 + 0.1                     1.0 (no-op)
ShearX/Y      +-(M / 10) * 0.3, random sign                   +-0.15
TranslateX/Y  +-(M / 10) * 10 px, random sign                 +-5 px
Rotate        +-(M / 10) * 30 degrees, random sign            +-15 degrees
============  ==============================================  ===========================

Geometric ops fill with (128, 128, 128) and interpolate bilinearly (OpenCV's ``warpAffine``
default). Definitions, with ``out(x, y)`` the output pixel and ``in`` the input:
ShearX ``out(x, y) = in(x - s*y, y)``; ShearY ``out(x, y) = in(x, y - s*x)``;
TranslateX ``out(x, y) = in(x + t, y)``; TranslateY ``out(x, y) = in(x, y + t)``;
Rotate: counter-clockwise by the angle about the image centre (``(w/2, h/2)``).
Here the ops are written with Pillow, whose ``ImageOps.autocontrast``/``equalize`` compute the
same lookup tables as the reference's numpy versions. All randomness comes from the ``rng``
argument, so an augmentation is a pure function of its seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_CONST = 10
BLIP_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def identity(img: Image.Image) -> Image.Image:
    return img


def autocontrast(img: Image.Image) -> Image.Image:
    """Stretch each channel's [min, max] to [0, 255] (constant channels unchanged)."""
    return ImageOps.autocontrast(img, cutoff=0)


def equalize(img: Image.Image) -> Image.Image:
    """Per-channel histogram equalisation (the reference's lookup table)."""
    return ImageOps.equalize(img)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Scale pixel values by ``factor`` (1.0 is the identity)."""
    if factor == 1.0:
        return img
    return img.point([min(255, max(0, int(i * factor))) for i in range(256)] * len(img.getbands()))


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with a smoothed copy (1.0 is the identity)."""
    if factor == 1.0:
        return img
    return ImageEnhance.Sharpness(img).enhance(factor)


def _affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
    return img.transform(
        img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=FILL
    )


def _shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    out = Image.new(img.mode, img.size, FILL)
    out.paste(img, (-dx, -dy))
    return out


def shear_x(img: Image.Image, factor: float) -> Image.Image:
    """``out(x, y) = in(x - factor * y, y)`` (OpenCV forward matrix ``[[1, f, 0], [0, 1, 0]]``)."""
    return _affine(img, (1.0, -factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: Image.Image, factor: float) -> Image.Image:
    """``out(x, y) = in(x, y - factor * x)`` (OpenCV forward matrix ``[[1, 0, 0], [f, 1, 0]]``)."""
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.0))


def translate_x(img: Image.Image, offset: float) -> Image.Image:
    """``out(x, y) = in(x + offset, y)``: content moves left by ``offset`` pixels."""
    if float(offset).is_integer():  # exact shift: a paste is 20x cheaper than an affine warp
        return _shift(img, int(offset), 0)
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def translate_y(img: Image.Image, offset: float) -> Image.Image:
    """``out(x, y) = in(x, y + offset)``: content moves up by ``offset`` pixels."""
    if float(offset).is_integer():
        return _shift(img, 0, int(offset))
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate counter-clockwise by ``degrees`` about the centre, same size, grey fill."""
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=FILL)


OPS: dict[str, Callable[..., Image.Image]] = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


def op_arguments(name: str, level: float, rng: random.Random) -> tuple[float, ...]:
    """The reference's level -> argument mapping (signs drawn from ``rng`` as it does)."""
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        magnitude = (level / MAX_LEVEL) * 0.3
    elif name in ("TranslateX", "TranslateY"):
        magnitude = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
    elif name == "Rotate":
        magnitude = (level / MAX_LEVEL) * 30.0
    else:
        raise KeyError(f"unknown RandAugment op '{name}'")
    return (-magnitude if rng.random() > 0.5 else magnitude,)


class RandAugment:
    """Apply ``n`` ops drawn with replacement from ``ops``, each with probability 0.5, at level ``m``.

    Args:
        n: number of ops drawn per image (2 in BLIP).
        m: magnitude level out of 10 (5 in BLIP).
        ops: op names (BLIP's ten by default).
    """

    def __init__(self, n: int = 2, m: float = 5, ops: tuple[str, ...] = BLIP_OPS) -> None:
        unknown = set(ops) - set(OPS)
        if unknown:
            raise KeyError(f"unknown RandAugment ops {sorted(unknown)}; known: {sorted(OPS)}")
        self.n, self.m, self.ops = n, m, tuple(ops)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        chosen = [rng.choice(self.ops) for _ in range(self.n)]
        for name in chosen:
            if rng.random() > 0.5:
                continue
            img = OPS[name](img, *op_arguments(name, self.m, rng))
        return img
