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
Each op exists twice. The Pillow functions (``OPS``: ``ImageOps.autocontrast``/``equalize`` compute
the same lookup tables as the reference's numpy versions; ``Image.transform``/``rotate`` with
bilinear resampling) are the definitions. The tensor functions (``TENSOR_OPS``, on uint8
``(3, H, W)`` tensors, what the train transform uses) compute the same thing 2-4x faster and skip
the PIL round trip: the lookup-table ops give identical pixels; the affine warps use
``F.grid_sample`` with Pillow's conventions (pixel-corner coordinates sampled at pixel centres,
neighbours clamped at the border, fill where the source point falls outside the image, result
truncated like Pillow's ``(UINT8)`` cast) and match ``Image.transform`` up to float32 rounding:
a value within 1e-3 of an integer can come out 1 higher or lower, about 1 value in 10^3 (Pillow's
own double arithmetic lands 1 below the exact result about as often).
:class:`RandAugment` applies the tensor ops to a tensor and the Pillow ops to a PIL image.

All randomness comes from the ``rng`` argument, so an augmentation is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
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


# --- the same ops on uint8 (3, H, W) tensors ------------------------------------------------


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup: ``out[c] = lut[c][x[c]]`` for uint8 ``x`` (C, H, W), ``lut`` (C, 256)."""
    return torch.gather(lut, 1, x.reshape(x.shape[0], -1).long()).view_as(x)


def _histograms(x: torch.Tensor) -> list[list[int]]:
    """256-bin histogram of each channel (Pillow's C histogram over a zero-copy view)."""
    h, w = x.shape[1:]
    planes = x.contiguous().numpy()
    return [Image.frombuffer("L", (w, h), p, "raw", "L", 0, 1).histogram() for p in planes]


def autocontrast_t(x: torch.Tensor) -> torch.Tensor:
    """:func:`autocontrast` on a tensor (Pillow's lookup table, with its float64 arithmetic)."""
    flat = x.reshape(x.shape[0], -1)
    ramp = np.arange(256, dtype=np.float64)
    luts = []
    for lo, hi in zip(flat.amin(1).tolist(), flat.amax(1).tolist()):
        if hi <= lo:
            luts.append(ramp)
        else:  # Pillow: int(ix * scale + offset), clipped
            scale = 255.0 / (hi - lo)
            luts.append(np.clip(ramp * scale + -lo * scale, 0, 255))
    return _lut(x, torch.from_numpy(np.stack(luts).astype(np.uint8)))


def equalize_t(x: torch.Tensor) -> torch.Tensor:
    """:func:`equalize` on a tensor (Pillow's ``ImageOps.equalize`` table)."""
    luts = []
    for hist in _histograms(x):
        h = torch.tensor(hist, dtype=torch.int64)
        nonzero = h[h != 0]
        step = int(nonzero[:-1].sum()) // 255 if len(nonzero) > 1 else 0
        if step == 0:
            luts.append(torch.arange(256))
        else:  # lut[i] = (step // 2 + sum(h[:i])) // step
            n = torch.cat([torch.tensor([step // 2]), h[:-1]]).cumsum(0)
            luts.append((n // step).clamp_(0, 255))
    return _lut(x, torch.stack(luts).to(torch.uint8))


def brightness_t(x: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`brightness` on a tensor."""
    if factor == 1.0:
        return x
    lut = [min(255, max(0, int(i * factor))) for i in range(256)]
    return _lut(x, torch.tensor([lut] * x.shape[0], dtype=torch.uint8))


def sharpness_t(x: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`sharpness` on a tensor (through Pillow: never used at M = 5, where it is a no-op)."""
    if factor == 1.0:
        return x
    img = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")
    out = np.asarray(sharpness(img, factor)).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(out))


_GRIDS: dict[tuple, torch.Tensor] = {}
_TRUNC_EPS = 1e-3


def _grid(h: int, w: int, data: tuple[float, ...]) -> torch.Tensor:
    """``grid_sample`` grid for Pillow's affine ``data`` on an (h, w) image padded by 1 pixel.

    Output pixel (x, y) samples the source at pixel-corner coordinates
    ``(a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f)`` (Pillow's ``affine_transform``).
    Points outside ``[0, w) x [0, h)`` are Pillow's fill: they are sent far outside so that zero
    padding returns 0 there. Computed in float64, cached per size and matrix.
    """
    key = (h, w, data)
    grid = _GRIDS.get(key)
    if grid is None:
        a, b, c, d, e, f = data
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float64) + 0.5,
            torch.arange(w, dtype=torch.float64) + 0.5,
            indexing="ij",
        )
        sx, sy = a * xs + b * ys + c, d * xs + e * ys + f
        outside = (sx < 0) | (sx >= w) | (sy < 0) | (sy >= h)
        # Padded image: source pixel centre i + 0.5 is padded index i + 1; with
        # align_corners=False, index u maps to (2u + 1) / size - 1.
        gx = (2 * sx + 2) / (w + 2) - 1
        gy = (2 * sy + 2) / (h + 2) - 1
        gx[outside], gy[outside] = -4.0, -4.0
        grid = torch.stack([gx, gy], -1).float().unsqueeze(0)
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def affine_t(x: torch.Tensor, data: tuple[float, ...]) -> torch.Tensor:
    """``Image.transform(AFFINE, data, BILINEAR, fillcolor=FILL)`` on a uint8 (3, H, W) tensor.

    The source is shifted by -128 and replicate-padded by 1 pixel, so that zero padding gives the
    fill outside the image and Pillow's clamped neighbours at its border; the result is truncated
    to uint8 as Pillow does.
    """
    h, w = x.shape[1:]
    src = F.pad(x.unsqueeze(0).float().sub_(FILL[0]), (1, 1, 1, 1), mode="replicate")
    out = F.grid_sample(
        src, _grid(h, w, tuple(float(v) for v in data)), mode="bilinear", align_corners=False
    )
    # Truncate like Pillow's (UINT8) cast. float32 coordinates are good to ~1e-5 px, so a value
    # that is an integer in exact arithmetic (flat regions: equal neighbours) can come out a hair
    # below it; _TRUNC_EPS lifts it back (else half of all flat pixels would lose 1).
    out = out[0].add_(FILL[0] + _TRUNC_EPS).numpy().astype(np.uint8)
    return torch.from_numpy(out)


def shear_x_t(x: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`shear_x` on a tensor."""
    return affine_t(x, (1.0, -factor, 0.0, 0.0, 1.0, 0.0))


def shear_y_t(x: torch.Tensor, factor: float) -> torch.Tensor:
    """:func:`shear_y` on a tensor."""
    return affine_t(x, (1.0, 0.0, 0.0, -factor, 1.0, 0.0))


def _shift_t(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``out(x, y) = in(x + dx, y + dy)``, fill outside: an exact integer shift."""
    h, w = x.shape[1:]
    out = torch.full_like(x, FILL[0])
    if abs(dx) < w and abs(dy) < h:
        out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[
            :, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
        ]
    return out


def translate_x_t(x: torch.Tensor, offset: float) -> torch.Tensor:
    """:func:`translate_x` on a tensor."""
    if float(offset).is_integer():
        return _shift_t(x, int(offset), 0)
    return affine_t(x, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def translate_y_t(x: torch.Tensor, offset: float) -> torch.Tensor:
    """:func:`translate_y` on a tensor."""
    if float(offset).is_integer():
        return _shift_t(x, 0, int(offset))
    return affine_t(x, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def rotation_matrix(width: int, height: int, degrees: float) -> tuple[float, ...]:
    """The inverse affine matrix ``Image.rotate(degrees)`` uses (about ``(w/2, h/2)``)."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy)


def rotate_t(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """:func:`rotate` on a tensor (with Pillow's exact fast paths for multiples of 90 degrees)."""
    h, w = x.shape[1:]
    degrees = degrees % 360.0
    if degrees == 0:
        return x.clone()
    if degrees == 180:
        return x.flip(1, 2)
    if degrees in (90, 270) and h == w:
        return x.rot90(1 if degrees == 90 else -1, (1, 2)).contiguous()
    return affine_t(x, rotation_matrix(w, h, degrees))


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
"""The Pillow ops (the definitions)."""

TENSOR_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Identity": lambda x: x,
    "AutoContrast": autocontrast_t,
    "Equalize": equalize_t,
    "Brightness": brightness_t,
    "Sharpness": sharpness_t,
    "ShearX": shear_x_t,
    "ShearY": shear_y_t,
    "TranslateX": translate_x_t,
    "TranslateY": translate_y_t,
    "Rotate": rotate_t,
}
"""The same ops on uint8 (3, H, W) tensors."""


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

    def draw(self, rng: random.Random) -> list[tuple[str, tuple[float, ...]]]:
        """The ops to apply, with their arguments: ``n`` names drawn with replacement, each kept
        with probability 0.5; ops that are the identity (Identity, and Brightness/Sharpness at
        factor 1.0 as at M = 5) are dropped. Consumes ``rng`` exactly as the reference does."""
        chosen = [rng.choice(self.ops) for _ in range(self.n)]
        ops = []
        for name in chosen:
            if rng.random() > 0.5:
                continue
            args = op_arguments(name, self.m, rng)
            if name == "Identity" or (name in ("Brightness", "Sharpness") and args == (1.0,)):
                continue
            ops.append((name, args))
        return ops

    def apply(self, img, ops: list[tuple[str, tuple[float, ...]]]):
        """Apply drawn ``ops`` to a uint8 (3, H, W) tensor (tensor ops) or a PIL image (Pillow)."""
        table = TENSOR_OPS if isinstance(img, torch.Tensor) else OPS
        for name, args in ops:
            img = table[name](img, *args)
        return img

    def __call__(self, img, rng: random.Random):
        """``apply(img, draw(rng))``: a tensor in, a tensor out; a PIL image in, a PIL image out."""
        return self.apply(img, self.draw(rng))
