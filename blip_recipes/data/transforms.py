"""Image transforms with Pillow + torch (no torchvision): uint8 tensors out, normalised on device.

Train: RandomResizedCrop(s, scale=(min_scale, 1), ratio=(3/4, 4/3), bicubic) -> horizontal flip
(p 0.5) -> RandAugment(2, 5) (see :mod:`.randaugment`) -> uint8 (3, s, s). Eval: resize to
(s, s) bicubic. The recipe normalises on the device with :func:`normalize_images`.

How the train transform is computed (one core, 512x384 JPEGs -> 224: about 1.8 ms, of which
decoding is 1.05 ms; a plain Pillow pipeline takes about 3.1 ms, see ``tools/benchmark_data.py``):

- The crop is drawn from the JPEG header's size, before decoding. When the crop keeps more than
  ``s`` pixels per side at 1/2, 1/4 or 1/8 scale, ``Image.draft`` decodes at that scale (libjpeg
  DCT scaling) and Pillow resizes the exact scaled crop box (``draft_snap`` trades that for a
  faster, sub-pixel-shifted crop). Pre-resized images (short side 384) never qualify at 224.
- Otherwise Pillow decodes fully, the integer crop box is copied out (``Image.crop`` + one
  ``np.array``) and resized by ``F.interpolate(bicubic, antialias=True)`` on uint8: Pillow's
  bicubic filter, computed by torch's vectorised uint8 kernel (0.2 ms instead of Pillow's 1.2 ms).
  See :func:`resized_crop` for how close it is to Pillow.
- Flip and RandAugment run on the 224 tensor (:data:`.randaugment.TENSOR_OPS`): no-op ops are
  skipped, integer translations are slice copies, shear/rotate are one ``grid_sample`` each
  (0.35 ms instead of Pillow's 1.0-1.3 ms), AutoContrast/Equalize are per-channel lookups.
  Geometric ops are applied one after another as the reference does (not fused into one warp).

All randomness comes from a ``random.Random`` the caller seeds per sample, so a sample's
augmentation is the same after a resume and with any number of workers.
"""

from __future__ import annotations

import io
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blip_recipes.data.randaugment import RandAugment

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean (RGB, in [0, 1]) of the reference normalisation."""
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation (RGB, in [0, 1]) of the reference normalisation."""


class BadImage(ValueError):
    """An image that cannot be used (unreadable, truncated, empty, too small, absurd aspect)."""


_NORMALIZATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) fp32 mean and std on ``device``, made once: building them from Python lists
    every step would be a blocking host-to-device copy inside the training step."""
    if device not in _NORMALIZATION:
        mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        _NORMALIZATION[device] = (mean, std)
    return _NORMALIZATION[device]


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> normalised float (B, 3, H, W) of ``dtype``.

    Computed in fp32 (``(x / 255 - mean) / std``), then cast.
    """
    mean, std = _mean_std(images.device)
    out = (images.to(torch.float32) / 255.0 - mean) / std
    return out.to(dtype)


def open_image(ref) -> Image.Image:
    """Open lazily (header only): ``ref`` is a path, raw bytes, or an already open image."""
    if isinstance(ref, Image.Image):
        return ref
    try:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            if len(ref) == 0:
                raise BadImage("zero-sized image data")
            return Image.open(io.BytesIO(ref))
        if os.path.getsize(ref) == 0:
            raise BadImage("zero-sized file")
        return Image.open(ref)
    except BadImage:
        raise
    except FileNotFoundError as e:
        raise BadImage("missing file") from e
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError...
        raise BadImage(f"cannot open: {e}") from e


def check_size(img: Image.Image, max_aspect_ratio: float, min_size: int = 1) -> None:
    """Raise :class:`BadImage` for an empty image, one whose shorter side is below ``min_size``
    pixels (a 1x1 tracking pixel, an icon) or one more elongated than ``max_aspect_ratio``."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"zero-sized image {w}x{h}")
    if min(w, h) < min_size:
        raise BadImage(f"image too small {w}x{h} (shorter side below {min_size} px)")
    if max(w / h, h / w) > max_aspect_ratio:
        raise BadImage(f"absurd aspect ratio {w}x{h} (limit {max_aspect_ratio}:1)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grey, CMYK, palette, 16-bit and alpha images -> RGB (alpha composited over white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        img = Image.fromarray((arr * (255.0 / max(hi, 1.0))).astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode fully (raising :class:`BadImage` on truncated / corrupt data) and convert to RGB."""
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise BadImage(f"cannot decode: {e}") from e


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def draft_scale(crop_w: int, crop_h: int, size: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2, else 1) keeping a crop of ``crop_w x crop_h`` source
    pixels at least ``size`` pixels per side once decoded and snapped to the reduced grid."""
    for d in (8, 4, 2):
        if crop_w >= d * (size + 1) and crop_h >= d * (size + 1):
            return d
    return 1


def draft_factors(full: tuple[int, int], reduced: tuple[int, int], d: int) -> tuple[float, float]:
    """Source -> reduced coordinate factors of an image decoded at 1/d: libjpeg's output pixel
    ``j`` covers source pixels ``[d j, d (j + 1))`` (sizes rounded up), so exactly ``1/d``."""
    if reduced == (-(-full[0] // d), -(-full[1] // d)):
        return 1.0 / d, 1.0 / d
    return reduced[0] / full[0], reduced[1] / full[1]  # not libjpeg's 1/d size: actual ratio


def reduced_box(
    crop: tuple[int, int, int, int], full: tuple[int, int], reduced: tuple[int, int], d: int
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a source crop on an image decoded at 1/d, edges rounded to whole
    reduced pixels (each moves by at most half a reduced pixel, under half an output pixel)."""
    left, top, w, h = crop
    fx, fy = draft_factors(full, reduced, d)
    x0 = min(round(left * fx), reduced[0] - 1)
    y0 = min(round(top * fy), reduced[1] - 1)
    x1 = min(max(round((left + w) * fx), x0 + 1), reduced[0])
    y1 = min(max(round((top + h) * fy), y0 + 1), reduced[1])
    return x0, y0, x1 - x0, y1 - y0


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop integer ``box`` of an RGB image and resize it to (size, size) with Pillow's bicubic.

    Returns a contiguous uint8 (3, size, size) tensor. The resize is
    ``F.interpolate(mode="bicubic", antialias=True)`` on the uint8 crop: the same separable
    filter as Pillow's ``BICUBIC`` (a = -0.5, support scaled by the downscale factor, weights
    normalised per output pixel, edge taps clipped to the crop, uint8 intermediate), computed by
    torch's vectorised uint8 kernel about 6x faster than Pillow. It is torchvision's
    ``resized_crop`` semantics (crop, then resize: taps never reach outside the crop). Against
    the float64 definition (horizontal pass, rounded to uint8, then vertical) it is within 1 on
    under 1% of values (fixed-point rounding). ``img.crop(box).resize(..., BICUBIC)`` differs a
    little more (on 512x384 photos: about 5% of values by 1, rare overshooting pixels by up to
    9) because Pillow runs the vertical pass first when that is cheaper, so its uint8
    intermediate, rounded and clipped, is another one.
    """
    crop = img if box == (0, 0) + img.size else img.crop(box)
    # np.array: a writable copy (np.asarray's is read-only and torch warns about it); (H, W, 3)
    # memory is a channels-last (1, 3, H, W) tensor, the layout torch's uint8 kernel wants.
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).unsqueeze(0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].contiguous()


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: ``(left, top, w, h)`` of the crop.

    Ten tries of area ``uniform(scale) * W * H`` and log-uniform aspect ``ratio``; otherwise a
    centre crop with the aspect clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """The BLIP pretraining transform on a lazily opened image.

    Args:
        image_size: output side ``s``.
        min_scale: lower bound of the crop area fraction (0.2 in BLIP).
        randaugment: apply RandAugment(2, 5).
        use_draft: let JPEGs decode at reduced size when the crop allows.
        max_aspect_ratio: images more elongated than this are bad samples.
        min_image_size: images whose shorter side is below this many pixels are bad samples.
        draft_snap: when a JPEG is decoded at 1/d, round the crop box to whole reduced pixels and
            resize with torch (about 20% faster at short side 768) instead of resizing the exact
            fractional box with Pillow. The box edges move by up to half an output pixel, so the
            output no longer matches full decoding up to resampling only (mean abs difference
            about 1.8 vs 0.9 on photo-like 1024x768 JPEGs at 224 px). Off by default.
    """

    def __init__(
        self,
        image_size: int,
        min_scale: float = 0.2,
        randaugment: bool = True,
        use_draft: bool = True,
        max_aspect_ratio: float = 20.0,
        draft_snap: bool = False,
        min_image_size: int = 8,
    ) -> None:
        self.image_size = image_size
        self.min_image_size = min_image_size
        self.draft_snap = draft_snap
        self.scale = (min_scale, 1.0)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.randaugment = RandAugment(2, 5) if randaugment else None
        self.use_draft = use_draft
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """uint8 tensor (3, s, s); raises :class:`BadImage` for unusable images."""
        s = self.image_size
        check_size(img, self.max_aspect_ratio, self.min_image_size)
        width, height = img.size
        left, top, w, h = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        d = 1
        if self.use_draft and img.format == "JPEG":
            d = draft_scale(w, h, s)
            if d > 1:
                try:
                    img.draft("RGB", (width // d, height // d))
                except Exception as e:
                    raise BadImage(f"cannot decode: {e}") from e
        img = load_rgb(img)
        if img.size == (width, height):
            out = resized_crop(img, (left, top, left + w, top + h), s)
        elif self.draft_snap:  # decoded at 1/d: the crop rounded to whole reduced pixels
            left, top, w, h = reduced_box((left, top, w, h), (width, height), img.size, d)
            out = resized_crop(img, (left, top, left + w, top + h), s)
        else:  # decoded at 1/d: Pillow resizes the exact (fractional) box
            fx, fy = draft_factors((width, height), img.size, d)
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            out = pil_to_tensor(img.resize((s, s), Image.Resampling.BICUBIC, box=box))
        if rng.random() < 0.5:
            out = out.flip(-1)
        if self.randaugment is not None:
            out = self.randaugment(out, rng)
        return out


class EvalTransform:
    """Resize to (s, s) bicubic (no crop), uint8 tensor (3, s, s)."""

    def __init__(self, image_size: int, max_aspect_ratio: float = float("inf")) -> None:
        self.image_size = image_size
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, img, rng: random.Random | None = None) -> torch.Tensor:
        img = open_image(img)
        check_size(img, self.max_aspect_ratio)
        img = load_rgb(img)
        return pil_to_tensor(img.resize((self.image_size,) * 2, Image.Resampling.BICUBIC))


def build_train_transform(
    image_size: int,
    min_scale: float = 0.2,
    randaugment: bool = True,
    use_draft: bool = True,
    max_aspect_ratio: float = 20.0,
    draft_snap: bool = False,
    min_image_size: int = 8,
) -> TrainTransform:
    """The pretraining transform; call it as ``transform(open_image(ref), random.Random(seed))``."""
    return TrainTransform(
        image_size, min_scale, randaugment, use_draft, max_aspect_ratio, draft_snap, min_image_size
    )


def build_eval_transform(image_size: int) -> EvalTransform:
    """Resize to (s, s) bicubic -> uint8 (3, s, s); accepts a path, bytes or PIL image."""
    return EvalTransform(image_size)
