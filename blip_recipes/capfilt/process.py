"""Run one unit: open its images, caption them, score every caption, keep what passes.

The result depends on the unit's pairs, the models and the settings only: batches are cut from
the unit's own readable images in order, and image ``i`` of unit ``u`` samples its captions from
``derive_seed(seed, u, i)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from blip_recipes.capfilt.filtering import ScoredCaption, select_captions
from blip_recipes.capfilt.models import Captioner, Scorer
from blip_recipes.capfilt.stats import UnitStats
from blip_recipes.capfilt.units import WebPair, WorkUnit
from blip_recipes.data import BadImage, build_eval_transform
from blip_recipes.data._seeding import derive_seed


@dataclass(frozen=True)
class FilterSettings:
    """What decides which captions survive (``capfilt.threshold``, ``capfilt.synthetic_top_k``)."""

    threshold: float = 0.5
    synthetic_top_k: int | None = None


@dataclass(frozen=True)
class KeptImage:
    """An image with at least one surviving caption (``captions`` in output order)."""

    pair: WebPair
    captions: list[ScoredCaption]


@dataclass
class _Loaded:
    index: int
    pair: WebPair
    caption_pixels: torch.Tensor
    filter_pixels: torch.Tensor


def _load(index: int, pair: WebPair, caption_transform, filter_transform) -> _Loaded:
    """The pair's image at the captioner's and at the filter's side (decoded once per side)."""
    if pair.image is None:
        raise BadImage("no image member")
    caption_pixels = caption_transform(pair.image)
    if filter_transform is caption_transform:
        return _Loaded(index, pair, caption_pixels, caption_pixels)
    return _Loaded(index, pair, caption_pixels, filter_transform(pair.image))


def _batches(pairs: Iterable[WebPair], batch_size: int, sizes: tuple[int, int],
             stats: UnitStats) -> Iterator[list[_Loaded]]:  # fmt: skip
    """Readable images in order, ``batch_size`` at a time; bad ones are counted and named."""
    caption_transform = build_eval_transform(sizes[0])
    filter_transform = caption_transform if sizes[1] == sizes[0] else build_eval_transform(sizes[1])
    batch: list[_Loaded] = []
    for index, pair in enumerate(pairs):
        stats.images += 1
        try:
            batch.append(_load(index, pair, caption_transform, filter_transform))
        except BadImage as e:
            stats.bad_images.append({"image": pair.origin, "reason": str(e)})
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def process_unit(
    unit: WorkUnit,
    pairs: Iterable[WebPair],
    captioner: Captioner,
    scorer: Scorer,
    settings: FilterSettings,
    seed: int,
    batch_size: int = 32,
) -> tuple[list[KeptImage], UnitStats]:
    """Caption, score and filter every pair of ``unit``.

    Returns:
        The kept images in input order, and the unit's statistics.
    """
    start = time.perf_counter()
    stats = UnitStats(unit=unit.index, source=unit.source)
    kept: list[KeptImage] = []
    sizes = (captioner.image_size, scorer.image_size)
    for batch in _batches(pairs, batch_size, sizes, stats):
        seeds = [derive_seed(seed, unit.index, item.index) for item in batch]
        synthetic = captioner(torch.stack([item.caption_pixels for item in batch]), seeds)
        stats.captions_generated += sum(len(s) for s in synthetic)
        texts, sources, rows = [], [], []
        for b, (item, generated) in enumerate(zip(batch, synthetic)):
            for text, source in [(t, "web") for t in item.pair.captions] + [
                (t, "synthetic") for t in generated
            ]:
                texts.append(text)
                sources.append(source)
                rows.append(b)
        images = torch.stack([item.filter_pixels for item in batch])
        scores = scorer(images, texts, torch.tensor(rows, dtype=torch.long))
        itm, itc = scores.itm.tolist(), scores.itc.tolist()
        per_image: list[list[ScoredCaption]] = [[] for _ in batch]
        for text, source, row, p, s in zip(texts, sources, rows, itm, itc):
            per_image[row].append(ScoredCaption(text, source, p, s))
        for item, candidates in zip(batch, per_image):
            chosen = select_captions(candidates, settings.threshold, settings.synthetic_top_k)
            chosen_ids = {id(c) for c in chosen}
            for c in candidates:
                counts = stats.web if c.source == "web" else stats.synthetic
                counts.add(c.itm, id(c) in chosen_ids)
            if chosen:
                kept.append(KeptImage(item.pair, chosen))
                stats.images_kept += 1
    stats.seconds = time.perf_counter() - start
    return kept, stats


__all__ = ["FilterSettings", "KeptImage", "process_unit"]
