"""Zero-shot image classification with a pretrained BLIP model's ITC (and optionally ITM) heads.

Each class becomes a text classifier as in CLIP's zero-shot protocol (and open_clip /
CLIP_benchmark): its name is put into every prompt template ("a picture of a {}."), each prompt
is encoded by the unimodal text encoder into a unit-norm ITC feature, the features are averaged
over the templates and the mean is normalised again. An image's class scores are the cosine
similarities of its ITC feature with the C class features; top-1 / top-5 accuracy follow.

With `rerank_k > 0` the top-k classes of each image are re-scored with the image-grounded
encoder, as BLIP's retrieval protocol reranks its top-k: score = ITM "match" logit (averaged
over the templates) + ITC similarity; classes outside the top-k keep their order below them.

Data: an ImageFolder-style tree (`root/<class name>/<image>`, classes in sorted order), or a
JSON list of `{"image", "label"}` records (label = class name or index) with a class list
(JSON list of names, or `{"classes": [...]}`); underscores in class names read as spaces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from blip_recipes.data.sources import AnnotationError
from blip_recipes.data.transforms import EvalTransform, normalize_images
from blip_recipes.evaluation._dist import (
    all_gather_rows,
    is_sharded,
    rank_and_world,
    run_balanced,
    shard_range,
)
from blip_recipes.parallel.fsdp import reshard_all

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a picture of a {}.", "a photo of a {}.", "an image of a {}.")


@dataclass
class ClassificationData:
    """images: paths; labels: (N,) class index of each; classes: display names (C)."""

    images: list[str]
    labels: list[int]
    classes: list[str]


def _class_text(name: str) -> str:
    return name.replace("_", " ").strip()


def load_image_folder(root: str | Path) -> ClassificationData:
    """`root/<class>/<image>`: one class per subfolder (sorted), its image files (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise AnnotationError(f"{root} holds no class subfolders (expected root/<class>/<image>)")
    images, labels = [], []
    for index, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images += [str(p) for p in files]
        labels += [index] * len(files)
    if not images:
        raise AnnotationError(f"{root}: the class subfolders hold no images")
    return ClassificationData(images, labels, [_class_text(f.name) for f in folders])


def load_class_list(path: str | Path) -> list[str]:
    """A JSON list of class names, or `{"classes": [...]}`."""
    loaded = json.loads(Path(path).read_text())
    classes = loaded.get("classes") if isinstance(loaded, dict) else loaded
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise AnnotationError(f"{path}: expected a non-empty JSON list of class names")
    return [_class_text(c) for c in classes]


def load_annotated(
    annotation: str | Path, classes_file: str | Path, image_root: str = ""
) -> ClassificationData:
    """JSON records `{"image", "label"}` (label: class name or 0-based index) + a class list."""
    classes = load_class_list(classes_file)
    index = {c: i for i, c in enumerate(classes)}
    records = json.loads(Path(annotation).read_text())
    if not isinstance(records, list) or not records:
        raise AnnotationError(f"{annotation}: expected a non-empty JSON list of records")
    root = Path(image_root) if image_root else None
    images, labels = [], []
    for i, record in enumerate(records):
        where = f"{annotation} record {i}"
        if not isinstance(record, dict) or "image" not in record or "label" not in record:
            raise AnnotationError(f"{where}: expected {{'image': path, 'label': class}}")
        label = record["label"]
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
            labels.append(label)
        elif isinstance(label, str) and _class_text(label) in index:
            labels.append(index[_class_text(label)])
        else:
            raise AnnotationError(
                f"{where}: label {label!r} is not one of the {len(classes)} classes of "
                f"{classes_file} (a name or a 0-based index)"
            )
        images.append(str(root / record["image"]) if root is not None else str(record["image"]))
    return ClassificationData(images, labels, classes)


def prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """C x T prompts, class-major: class c's templates are rows c*T ... c*T + T - 1."""
    return [t.format(c) for c in classes for t in templates]


@torch.no_grad()
def class_features(
    model: nn.Module,
    tokenizer: Any,
    classes: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    batch_size: int = 256,
    text_max_length: int | None = None,
) -> torch.Tensor:
    """(C, E) unit-norm class features: per class, the mean of its templates' unit-norm ITC
    text features, normalised again (every rank computes all of them)."""
    texts = prompts(classes, templates)
    feats = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(texts[start : start + batch_size], max_length=text_max_length)
        feats.append(model.encode_text(ids.to(device), mask.to(device)).feat.float())
    per_prompt = torch.cat(feats).view(len(classes), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows of `scores` (N, C) have their label among their k best classes, per k
    (k capped at C). Ties are broken towards the lower class index."""
    order = _ranking(scores)
    hits = order == labels[:, None]
    return {k: int(hits[:, : min(k, scores.shape[1])].any(dim=1).sum()) for k in ks}


def _ranking(scores: torch.Tensor) -> torch.Tensor:
    """(N, C) -> class indices by decreasing score, ties by increasing index (stable)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


class _Images(Dataset):
    def __init__(self, images: list[str], indices: range, image_size: int) -> None:
        self.images, self.indices = images, indices
        self.transform = EvalTransform(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[self.indices[i]])


@dataclass
class ZeroShotResult:
    """metrics: top1 / top5 (ITC), and rerank_top1 / rerank_top5 when reranked, in percent;
    scores: (N, C) final class scores (ITC, or reranked); ranking: (N, C) classes best first."""

    metrics: dict[str, float]
    scores: torch.Tensor
    ranking: torch.Tensor

    def records(self, data: ClassificationData, top: int = 5) -> list[dict[str, Any]]:
        """One `{"image", "label", "predictions": [top classes]}` per image."""
        top = min(top, len(data.classes))
        return [
            {"image": image, "label": data.classes[label],
             "predictions": [data.classes[c] for c in row[:top].tolist()]}
            for image, label, row in zip(data.images, data.labels, self.ranking)
        ]  # fmt: skip


@torch.no_grad()
def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    data: ClassificationData,
    templates: Sequence[str],
    image_size: int,
    device: torch.device,
    batch_size: int = 64,
    rerank_k: int = 0,
    num_workers: int = 0,
    text_max_length: int | None = None,
) -> ZeroShotResult:
    """Zero-shot classification of `data` (module docstring); collective when a process group
    is up (each rank encodes a contiguous share of the images; every rank returns the same).
    """
    model.eval()
    classes = class_features(model, tokenizer, data.classes, templates, device,
                             text_max_length=text_max_length)  # fmt: skip
    rank, world = rank_and_world()
    share = shard_range(len(data.images), rank, world)
    loader = DataLoader(_Images(data.images, share, image_size), batch_size=batch_size,
                        num_workers=num_workers)  # fmt: skip
    k = min(rerank_k, len(data.classes))
    prompt_ids, prompt_mask = tokenizer(
        prompts(data.classes, templates), max_length=text_max_length
    )
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)

    def score(images: torch.Tensor) -> torch.Tensor:
        encoded = model.encode_image(normalize_images(images.to(device)))
        sims = encoded.feat.float() @ classes.T  # (B, C)
        if k == 0:
            return torch.cat([sims, sims], dim=1)
        top = _ranking(sims)[:, :k]  # (B, k)
        rows = _rerank_rows(top, len(templates))  # (B * k * T,) prompt row of each pair
        image_rows = torch.arange(top.shape[0], device=device).repeat_interleave(k * len(templates))
        itm = model.itm_logits(encoded.embeds, prompt_ids[rows], prompt_mask[rows], image_rows)
        match = itm[:, 1].float().view(top.shape[0], k, len(templates)).mean(dim=2)
        reranked = sims.gather(1, top) + match
        # the top-k above every other class, in their new order; the rest keep their ITC scores
        floor = reranked.min(dim=1, keepdim=True).values - sims.max(dim=1, keepdim=True).values
        final = (sims + floor - 1.0).scatter(1, top, reranked)
        return torch.cat([sims, final], dim=1)  # (B, 2C): ITC, final

    steps = -(-len(share) // batch_size) if len(share) else 0
    parts = [s for _, s in run_balanced(loader, steps, score, dummy, is_sharded(model))]
    width = 2 * len(data.classes)
    local = torch.cat(parts) if parts else torch.zeros(0, width, device=device)
    itc, scores = all_gather_rows(local, len(data.images)).cpu().chunk(2, dim=1)
    reshard_all(model)
    labels = torch.tensor(data.labels, dtype=torch.int64)
    n = len(data.images)
    hits = topk_correct(scores, labels, (1, 5))
    prefix = "rerank_" if k else ""
    metrics = {f"{prefix}top1": 100.0 * hits[1] / n, f"{prefix}top5": 100.0 * hits[5] / n}
    if k:  # the ITC-only numbers of the same run, for comparison
        plain = topk_correct(itc, labels, (1, 5))
        metrics |= {"top1": 100.0 * plain[1] / n, "top5": 100.0 * plain[5] / n}
    metrics |= {"images": float(n), "classes": float(len(data.classes)),
                "chance_top1": 100.0 / len(data.classes)}  # fmt: skip
    return ZeroShotResult(metrics, scores, _ranking(scores))


def _rerank_rows(top: torch.Tensor, templates: int) -> torch.Tensor:
    """(B, k) class indices -> (B * k * T,) prompt rows (class-major prompts)."""
    offsets = torch.arange(templates, device=top.device)
    return (top[:, :, None] * templates + offsets).flatten()


__all__ = [
    "DEFAULT_TEMPLATES",
    "ClassificationData",
    "ZeroShotResult",
    "class_features",
    "evaluate_zeroshot",
    "load_annotated",
    "load_class_list",
    "load_image_folder",
    "prompts",
    "topk_correct",
]


# ---------------------------------------------------------------------- config checks
def _register_checks() -> None:
    from blip_recipes.config import register_validator

    @register_validator
    def _zeroshot_section(cfg, ctx):
        """`[zeroshot]` checks (files named, templates with a "{}" slot)."""
        zs = cfg.zeroshot
        if zs.rerank_k < 0:
            yield f"'zeroshot.rerank_k' must be >= 0, got {zs.rerank_k}"
        for template in zs.templates:
            if "{}" not in template:
                yield f"'zeroshot.templates' entry {template!r} has no {{}} for the class name"
        if zs.image_folder and not Path(zs.image_folder).is_dir():
            yield f"'zeroshot.image_folder' {zs.image_folder} is not a folder (it does not exist)"
        if zs.annotation and not zs.classes:
            yield "'zeroshot.annotation' needs 'zeroshot.classes' (a JSON list of class names)"
        for key in ("annotation", "classes"):
            path = getattr(zs, key)
            if path and not Path(path).is_file():
                yield f"'zeroshot.{key}' {path} does not exist (or is not a file)"


_register_checks()
