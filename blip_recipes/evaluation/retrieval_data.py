"""What retrieval evaluation reads: an evaluation set (images, cleaned captions and which caption
belongs to which image, from a COCO-Karpathy-style file), the images as encoder inputs at the
model's resolution, and that resolution read from a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from blip_recipes.data import build_eval_transform, normalize_images, pre_caption
from blip_recipes.data.sources import load_retrieval_annotations


@dataclass
class RetrievalData:
    """An evaluation set: images, captions and which caption belongs to which image.

    Attributes:
        images: one entry per image: a path, raw bytes, a PIL image, or a uint8 (3, s, s) tensor
            already at the evaluation size.
        texts: all captions (already cleaned), image by image.
        txt2img: for each caption, the index of its image.
        img2txt: for each image, the indices of its captions.
    """

    images: Sequence[Any]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.txt2img) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.txt2img)} txt2img entries")
        if len(self.img2txt) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.img2txt)} img2txt entries")
        if not self.images or not self.texts:
            raise ValueError("an evaluation set needs at least one image and one caption")


def load_retrieval_data(
    annotation: str, image_root: str = "", max_words: int = 30
) -> RetrievalData:
    """Read a COCO-Karpathy-style test file (`[{"image": path, "caption": [texts]}]`).

    Captions are cleaned with `pre_caption(text, max_words)` as the reference does.
    """
    images, captions, txt2img, img2txt = load_retrieval_annotations(annotation, image_root)
    texts = [pre_caption(c, max_words) for c in captions]
    return RetrievalData(images, texts, txt2img, img2txt)


class EvalImages(Dataset):
    """Images (paths, bytes, PIL images or uint8 tensors) at `indices`, as uint8 (3, s, s)
    tensors resized for evaluation."""

    def __init__(self, images: Sequence[Any], indices: range, image_size: int) -> None:
        self.images, self.indices = images, indices
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        ref = self.images[self.indices[i]]
        if isinstance(ref, torch.Tensor):
            return ref
        return self.transform(ref)


class ImageInputs:
    """How :func:`score_retrieval` turns `RetrievalData.images` entries into encoder inputs:
    one image each, resized to `image_size`, encoded by `model.encode_image`.

    Another kind of media (video frames) supplies the same three methods.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def dataset(self, items: Sequence[Any], indices: range) -> Dataset:
        """The uint8 inputs of `items[indices]`, one per entry."""
        return EvalImages(items, indices, self.image_size)

    def dummy(self) -> torch.Tensor:
        """A batch of one input (the call a rank without work makes under FSDP2)."""
        return torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)

    def encode(
        self, model: nn.Module, batch: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, s, s) on the device -> (B, T, D_vision) tokens for ITM and the (B, E)
        unit-norm ITC feature."""
        return tuple(model.encode_image(normalize_images(batch, dtype)))


__all__ = ["EvalImages", "ImageInputs", "RetrievalData", "load_retrieval_data"]
