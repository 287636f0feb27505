"""Caption evaluation: generate a caption for every image of a split, split across ranks, score
BLEU-1..4 and CIDEr-D against the reference captions (BLIP's `evaluate` + `coco_caption_eval`).

Each rank captions a contiguous share of the images (`shard_range`) through the model's entry
points; the captions are all-gathered in image order and every rank scores them, so every rank
returns the same result (the recipe's keep-the-best decision is then the same everywhere).
With an FSDP2-sharded model every rank makes the same number of decoding calls (a rank with
fewer batches decodes a dummy one) and decoding never stops early (see `generation.generate`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from blip_recipes.data import normalize_images
from blip_recipes.data.sources import load_retrieval_annotations
from blip_recipes.evaluation._dist import is_sharded, rank_and_world, run_balanced, shard_range
from blip_recipes.evaluation.caption_metrics import caption_scores
from blip_recipes.evaluation.generation import DEFAULT_PROMPT, Method, generate, prompt_ids
from blip_recipes.evaluation.retrieval_data import EvalImages
from blip_recipes.models.inputs import model_image_size

SELECTION_KEY = "score"
"""Key of `CIDEr + Bleu_4` in the metrics (the reference keeps the checkpoint maximising it)."""


@dataclass
class CaptionData:
    """A captioning split: images, their reference captions and their ids.

    Attributes:
        images: one entry per image: a path, bytes, a PIL image or a uint8 (3, s, s) tensor
            already at the evaluation size.
        references: the raw reference captions of each image (at least one each).
        image_ids: the id written with each generated caption (COCO's numeric id when the file
            name ends in one, e.g. ``COCO_val2014_000000391895.jpg`` -> 391895).
    """

    images: Sequence[Any]
    references: list[list[str]]
    image_ids: list[Any]

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.references) == len(self.image_ids)):
            raise ValueError(
                f"{len(self.images)} images, {len(self.references)} reference lists and "
                f"{len(self.image_ids)} ids: they must match"
            )
        if not self.images:
            raise ValueError("a caption evaluation split needs at least one image")
        empty = [i for i, refs in enumerate(self.references) if not refs]
        if empty:
            raise ValueError(f"images without reference captions: {empty[:5]}")


def image_id_of(path: str) -> int | str:
    """COCO's image id from a file name (trailing digits of the stem), else the stem."""
    stem = Path(str(path)).stem
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else stem


def load_caption_data(annotation: str, image_root: str = "") -> CaptionData:
    """A Karpathy-style val/test file (`[{"image": path, "caption": [texts]}]`) -> `CaptionData`.

    Image ids come from the file names (:func:`image_id_of`); when they are not unique, the
    position in the file is used instead.
    """
    images, captions, _, img2txt = load_retrieval_annotations(annotation, image_root)
    references = [[captions[i] for i in rows] for rows in img2txt]
    ids = [image_id_of(p) for p in images]
    if len(set(ids)) != len(ids):
        ids = list(range(len(images)))
    return CaptionData(images, references, ids)


@dataclass
class CaptionEvalResult:
    """Generated captions (one per image, in split order) and their scores.

    Attributes:
        captions: the generated captions, prompt excluded.
        metrics: ``Bleu_1..4``, ``CIDEr`` (fractions, coco-caption's scale) and ``score`` =
            CIDEr + Bleu_4.
    """

    captions: list[str]
    metrics: dict[str, float]

    def records(self, data: CaptionData) -> list[dict[str, Any]]:
        """``[{"image_id", "caption"}]``, the coco-caption results format."""
        return [{"image_id": i, "caption": c} for i, c in zip(data.image_ids, self.captions)]

    def write(self, data: CaptionData, path: str | os.PathLike) -> Path:
        """Write :meth:`records` as JSON to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records(data), indent=1) + "\n")
        return path


@torch.no_grad()
def generate_captions(
    model: nn.Module,
    tokenizer: Any,
    images: Sequence[Any],
    prompt: str = DEFAULT_PROMPT,
    method: Method = "beam",
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Captions of `images`, decoded across ranks, identical on every rank.

    Collective when a process group is initialised: call it on every rank with the same images.

    Args:
        model: a `BlipPretrain` (plain or FSDP2); evaluated in eval mode, its mode restored.
        tokenizer: the run's tokenizer.
        images: paths, bytes, PIL images or uint8 (3, s, s) tensors.
        prompt: decoder prompt, excluded from the returned captions.
        method: "beam", "greedy" or "nucleus".
        image_size: input side; default the model's.
        batch_size: images per decoding batch.
        num_workers: image-decoding worker processes.
        device: default the model's device.
        generate_kwargs: :func:`blip_recipes.evaluation.generation.generate` options (num_beams,
            max_length, min_length, repetition_penalty...).

    Returns:
        One caption per image, in order.
    """
    rank, world = rank_and_world()
    weight = model.visual_encoder.patch_embed.proj.weight
    device = torch.device(device) if device is not None else weight.device
    image_size = image_size or model_image_size(model)
    local = shard_range(len(images), rank, world)
    loader = DataLoader(EvalImages(images, local, image_size), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)  # fmt: skip
    prefix = prompt_ids(tokenizer, prompt)
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)

    def decode(batch: torch.Tensor) -> list[str]:
        pixels = normalize_images(batch.to(device, non_blocking=True))
        outs = generate(model, pixels, prefix, tokenizer.sep_token_id, tokenizer.pad_token_id,
                        method, **generate_kwargs)  # fmt: skip
        return [tokenizer.decode(ids.tolist()).strip() for ids in outs]

    was_training = model.training
    model.eval()
    try:
        captions: list[str] = []
        for _, out in run_balanced(loader, len(loader), decode, dummy, is_sharded(model)):
            captions += out
    finally:
        model.train(was_training)
    if world == 1:
        return captions
    gathered: list[list[str] | None] = [None] * world
    dist.all_gather_object(gathered, captions)
    return [c for part in gathered for c in (part or [])]


def score_captions(captions: Sequence[str], data: CaptionData) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and the selection score (CIDEr + Bleu_4) of one caption per image."""
    if len(captions) != len(data.references):
        raise ValueError(f"{len(captions)} captions for {len(data.references)} images")
    keys = range(len(captions))
    metrics = caption_scores(dict(zip(keys, captions)), dict(zip(keys, data.references)))
    metrics[SELECTION_KEY] = metrics["CIDEr"] + metrics["Bleu_4"]
    return metrics


def evaluate_captions(
    model: nn.Module, tokenizer: Any, data: CaptionData, **kwargs: Any
) -> CaptionEvalResult:
    """Caption every image of `data` (:func:`generate_captions`, same keyword arguments) and
    score the captions (:func:`score_captions`); identical on every rank."""
    captions = generate_captions(model, tokenizer, data.images, **kwargs)
    return CaptionEvalResult(captions, score_captions(captions, data))


__all__ = [
    "SELECTION_KEY",
    "CaptionData",
    "CaptionEvalResult",
    "evaluate_captions",
    "generate_captions",
    "image_id_of",
    "load_caption_data",
    "score_captions",
]
