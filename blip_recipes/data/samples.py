"""Map-style samples: the epoch plan (order over global positions), loading one sample, replacing
a bad one deterministically, and the batch maker the loader's workers run.

See :mod:`blip_recipes.data.loader` for the order, the bad-sample rules and the loader's state.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.nodes import (
    STOP_SIGNALS,
    SampleTask,
    stack,
)
from blip_recipes.data.sources import MapSource
from blip_recipes.data.transforms import BadImage, TrainTransform, open_image
from blip_recipes.data.watchdog import LoaderError

logger = logging.getLogger("blip_recipes.data")

MAX_REPLACEMENTS = 50


class BadSampleError(LoaderError):
    """Too many bad samples: the data is broken, stop the run."""


@dataclass
class BatchContext:
    """What producing a batch needs: shared by the loader and its workers (pickled to them)."""

    tokenizer: object
    transform: TrainTransform
    max_words: int
    batch_size: int
    rank: int
    world_size: int
    seed: int


def load_sample(source: MapSource, index: int, rng: random.Random, ctx: BatchContext):
    """(uint8 image (3, s, s), cleaned caption) of ``source[index]``; raises :class:`BadImage`
    (with ``origin`` and ``reason`` attributes when the sample's origin is known)."""
    image_ref, caption, origin = source.get(index, rng)
    try:
        caption = pre_caption(caption, ctx.max_words)
        if not caption:
            raise BadImage("empty caption after cleaning")
        return ctx.transform(open_image(image_ref), rng), caption
    except BadImage as e:
        error = BadImage(f"{origin}: {e}")
        error.origin, error.reason = origin, str(e)
        raise error from e


def bad_record(error: Exception, origin: str, source: str, epoch: int, **where) -> dict:
    """The record naming one bad sample (made in the worker that read it)."""
    reason = getattr(error, "reason", None) or str(error)
    origin = getattr(error, "origin", None) or origin
    if reason.startswith(f"{origin}: "):
        reason = reason[len(origin) + 2 :]
    return {"sample": origin, "reason": reason, "source": source, "epoch": epoch, **where}


def bad_count(records: list[dict]) -> int:
    """Bad samples the records stand for (a damaged shard's record has a ``count``)."""
    return sum(int(r.get("count", 1)) for r in records)


def describe_bad(record: dict) -> str:
    """``sample: reason`` of a bad-sample record."""
    return f"{record['sample']}: {record['reason']}"


class EpochPlan:
    """Epoch-by-epoch order of map-style sources mixed by weight.

    Source ``k`` of ``n_k`` samples contributes ``max(1, round(weight_k * n_k))`` draws to every
    epoch: weight 1 visits each sample once, 2 twice, 0.5 a fresh random half each epoch.
    """

    def __init__(self, sources: list[MapSource], weights: list[float], seed: int) -> None:
        self.sources = sources
        self.sizes = [len(s) for s in sources]
        self.counts = [max(1, round(w * n)) if n else 0 for w, n in zip(weights, self.sizes)]
        self.offsets = np.cumsum([0, *self.sizes])
        self.seed = seed
        self.length = int(sum(self.counts))
        self._cached: tuple[int, np.ndarray] | None = None
        self._image_id_offsets: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Global sample ids (concatenated-source numbering) of epoch ``epoch``, in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, 0xE90C)))
        parts = []
        for k, (n, count) in enumerate(zip(self.sizes, self.counts)):
            if count == 0:
                continue
            reps = -(-count // n)
            ids = np.concatenate([rng.permutation(n) for _ in range(reps)])[:count]
            parts.append(ids + self.offsets[k])
        order = rng.permutation(np.concatenate(parts))
        self._cached = (epoch, order)
        return order

    def locate(self, sample_id: int) -> tuple[MapSource, int]:
        k = int(np.searchsorted(self.offsets, sample_id, side="right") - 1)
        return self.sources[k], int(sample_id - self.offsets[k])

    @property
    def image_id_offsets(self) -> np.ndarray:
        """First image id of each source: source ``k``'s dense ids are shifted by the images of
        the sources before it, so ids never collide across sources (the same on every rank)."""
        if self._image_id_offsets is None:
            self._image_id_offsets = np.cumsum([0, *(s.num_images for s in self.sources)])
        return self._image_id_offsets

    def image_id(self, sample_id: int) -> int:
        """The image id of a global sample id (equal iff same image of the same source)."""
        k = int(np.searchsorted(self.offsets, sample_id, side="right") - 1)
        local = self.sources[k].image_id(int(sample_id - self.offsets[k]))
        return int(self.image_id_offsets[k]) + local

    def advance(self, epoch: int, position: int, global_batch: int, steps: int = 1):
        """(epoch, position) after ``steps`` steps of ``global_batch`` from ``(epoch, position)``."""
        n = self.length
        if position + global_batch > n:  # (can happen after a global-batch change)
            epoch, position = epoch + 1, 0
        left = (n - position) // global_batch
        if steps < left:
            return epoch, position + steps * global_batch
        steps -= left
        per_epoch = n // global_batch
        return epoch + 1 + steps // per_epoch, (steps % per_epoch) * global_batch


class MapBatchMaker:
    """The map function of the loader's node graph (:mod:`.nodes`): one step's sample tasks
    -> that rank's batch. Runs in the worker processes; a pure function of its input."""

    def __init__(self, plan: EpochPlan, ctx: BatchContext) -> None:
        self.plan, self.ctx = plan, ctx

    def __call__(self, tasks: list[SampleTask]) -> dict:
        epoch, position = tasks[0].epoch, tasks[0].step_position
        return self.make_batch(epoch, position, [t.position for t in tasks])

    def make_batch(self, epoch: int, position: int, positions: list[int] | None = None) -> dict:
        """The batch of the samples at global ``positions`` of ``epoch`` (default: this rank's
        share of the step starting at global ``position``)."""
        ctx = self.ctx
        if positions is None:
            start = position + ctx.rank * ctx.batch_size
            positions = list(range(start, start + ctx.batch_size))
        images, captions, image_ids, bad = load_map_samples(self.plan, ctx, epoch, positions)
        input_ids, attention_mask = ctx.tokenizer(captions)
        return {
            "images": stack(images),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_ids": torch.tensor(image_ids, dtype=torch.int64),
            "_epoch": epoch,
            "_position": position,
            "_bad": len(bad),
            "_bad_samples": bad,
        }


def load_map_samples(
    plan: EpochPlan, ctx: BatchContext, epoch: int, positions: list[int], load=load_sample
):
    """(images, captions, image ids, bad-sample records) of the samples at global ``positions``
    of ``epoch``; a bad sample is replaced by the one at a position drawn from ``(seed, epoch,
    position, attempt)``. ``load(source, index, rng, ctx) -> (image, text)`` reads one sample
    (:func:`load_sample`; VQA passes its own, whose "text" is a question with its answers)."""
    order = plan.order(epoch)
    images, captions, image_ids, bad = [], [], [], []
    for pos in positions:
        sample_pos = pos
        for attempt in range(MAX_REPLACEMENTS + 1):
            rng = random.Random(derive_seed(ctx.seed, epoch, pos, attempt))
            source, index = plan.locate(int(order[sample_pos]))
            try:
                image, caption = load(source, index, rng, ctx)
                break
            except BadImage as e:
                where = f"{source.name}[{index}]"
                bad.append(bad_record(e, where, source.name, epoch, position=sample_pos))
                sample_pos = derive_seed(ctx.seed, epoch, pos, attempt, 0xBAD) % plan.length
        else:
            raise BadSampleError(
                f"{MAX_REPLACEMENTS} replacements in a row were bad samples; last: "
                f"{describe_bad(bad[-1])}"
            )
        images.append(image)
        captions.append(caption)
        image_ids.append(plan.image_id(int(order[sample_pos])))
    return images, captions, image_ids, bad


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM, SIGINT and SIGUSR1, then runs
    ``inner`` (another ``worker_init_fn``) if given.

    Slurm (``scancel``, the time limit, ``--signal``) signals every process of a job step and
    torchrun signals each rank's whole process group, so loader workers receive the same stop
    signal as their rank. Left alone, a worker dies of it (SIGTERM, SIGUSR1) or raises
    KeyboardInterrupt (SIGINT), the rank's next batch fails and no checkpoint is written. Ignoring
    them leaves shutdown to the rank, which saves and then closes its loader; a worker whose rank
    is gone exits by itself (the DataLoader's parent watchdog), and SIGKILL still ends it.
    Picklable, so it also works with the spawn and forkserver start methods.
    """

    def __init__(self, inner: Callable[[int], None] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
