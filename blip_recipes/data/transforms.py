"""Image transforms with Pillow + torch (no torchvision): uint8 tensors out, normalised on device.

Train: RandomResizedCrop(s, scale=(min_scale, 1), ratio=(3/4, 4/3), bicubic) -> horizontal flip
(p 0.5) -> RandAugment(2, 5) (see :mod:`.randaugment`). The crop is chosen from the JPEG header's
size before decoding, so ``Image.draft`` can decode at 1/2, 1/4 or 1/8 size whenever the crop
still has at least ``s`` pixels per side at that scale; the crop box is then resized in one Pillow
call. Eval: resize to (s, s) bicubic. Both return ``uint8`` tensors (3, s, s); the recipe
normalises on the device with :func:`normalize_images`.

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
from PIL import Image

from blip_recipes.data.randaugment import RandAugment

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean (RGB, in [0, 1]) of the reference normalisation."""
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation (RGB, in [0, 1]) of the reference normalisation."""


class BadImage(ValueError):
    """An image that cannot be used (unreadable, truncated, empty, absurd aspect)."""


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> normalised float (B, 3, H, W) of ``dtype``.

    Computed in fp32 (``(x / 255 - mean) / std``), then cast.
    """
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
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


def check_size(img: Image.Image, max_aspect_ratio: float) -> None:
    """Raise :class:`BadImage` for an empty image or one more elongated than ``max_aspect_ratio``."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"zero-sized image {w}x{h}")
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
    """

    def __init__(
        self,
        image_size: int,
        min_scale: float = 0.2,
        randaugment: bool = True,
        use_draft: bool = True,
        max_aspect_ratio: float = 20.0,
    ) -> None:
        self.image_size = image_size
        self.scale = (min_scale, 1.0)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.randaugment = RandAugment(2, 5) if randaugment else None
        self.use_draft = use_draft
        self.max_aspect_ratio = max_aspect_ratio

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """uint8 tensor (3, s, s); raises :class:`BadImage` for unusable images."""
        s = self.image_size
        check_size(img, self.max_aspect_ratio)
        width, height = img.size
        left, top, w, h = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        if self.use_draft and img.format == "JPEG":
            # Largest reduction (1/2, 1/4, 1/8) keeping the crop >= s pixels on each side.
            request = (math.ceil(width * s / w), math.ceil(height * s / h))
            if request[0] < width and request[1] < height:
                try:
                    img.draft("RGB", request)
                except Exception as e:
                    raise BadImage(f"cannot decode: {e}") from e
        img = load_rgb(img)
        if img.size == (width, height):  # crop, then resize: torchvision's PIL semantics
            img = img.crop((left, top, left + w, top + h)).resize((s, s), Image.Resampling.BICUBIC)
        else:  # decoded at reduced size: resize the scaled crop box in one call
            fx, fy = img.size[0] / width, img.size[1] / height
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
            img = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return pil_to_tensor(img)


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
) -> TrainTransform:
    """The pretraining transform; call it as ``transform(open_image(ref), random.Random(seed))``."""
    return TrainTransform(image_size, min_scale, randaugment, use_draft, max_aspect_ratio)


def build_eval_transform(image_size: int) -> EvalTransform:
    """Resize to (s, s) bicubic -> uint8 (3, s, s); accepts a path, bytes or PIL image."""
    return EvalTransform(image_size)
