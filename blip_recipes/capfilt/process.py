"""Run one unit: open its images, caption them, score every caption, keep what passes.

The result depends on the unit's pairs, the models and the settings only: batches are cut from
the unit's own readable images in order, and image ``i`` of unit ``u`` samples its captions from
``derive_seed(seed, u, i)``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


def decode_threads() -> int:
    """Threads that decode and resize images for one rank: this host's cores shared by its ranks
    (``LOCAL_WORLD_SIZE``), at most 8. Pillow releases the GIL while it decodes and resizes, so
    threads keep the accelerator fed without worker processes."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 1) // local_ranks))


def _in_order(pool: ThreadPoolExecutor, fn, items: Iterable, lookahead: int) -> Iterator:
    """``map(fn, items)`` on ``pool`` in input order, at most ``lookahead`` items in flight (the
    input is read lazily, so a shard streams)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(pairs: Iterable[WebPair], batch_size: int, sizes: tuple[int, int],
             stats: UnitStats, threads: int = 1) -> Iterator[list[_Loaded]]:  # fmt: skip
    """Readable images in order, ``batch_size`` at a time; bad ones are counted and named.
    ``threads`` decode ahead of the consumer (the result does not depend on how many)."""
    caption_transform = build_eval_transform(sizes[0])
    filter_transform = caption_transform if sizes[1] == sizes[0] else build_eval_transform(sizes[1])

    def load(item: tuple[int, WebPair]) -> tuple[WebPair, _Loaded | BadImage]:
        index, pair = item
        try:
            return pair, _load(index, pair, caption_transform, filter_transform)
        except BadImage as e:
            return pair, e

    batch: list[_Loaded] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for pair, loaded in _in_order(pool, load, enumerate(pairs), 2 * batch_size):
            stats.images += 1
            if isinstance(loaded, BadImage):
                stats.bad_images.append({"image": pair.origin, "reason": str(loaded)})
                continue
            batch.append(loaded)
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
    threads: int = 1,
) -> tuple[list[KeptImage], UnitStats]:
    """Caption, score and filter every pair of ``unit`` (``threads`` decode images ahead).

    Returns:
        The kept images in input order, and the unit's statistics.
    """
    start = time.perf_counter()
    stats = UnitStats(unit=unit.index, source=unit.source)
    kept: list[KeptImage] = []
    sizes = (captioner.image_size, scorer.image_size)
    for batch in _batches(pairs, batch_size, sizes, stats, threads):
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


__all__ = ["FilterSettings", "KeptImage", "decode_threads", "process_unit"]
