"""The training loader: fixed-size per-rank batches in an order defined over global sample indices.

**Order.** Epoch ``e`` is a sequence of ``N`` global positions (the concatenated map-style sources,
each repeated or subsampled by its weight, then permuted by ``(seed, e)``). A step consumes ``G =
batch_size * world_size`` consecutive positions; rank ``r`` takes positions ``[p + r*B, p + r*B +
B)`` of the step starting at ``p``. The tail of an epoch shorter than ``G`` is dropped
(``drop_last``), and the next epoch starts at position 0 with a new permutation. Iteration never
ends: the recipe keeps calling ``next()`` and the epoch advances by itself (``loader.epoch`` /
``stats()["epoch"]`` say where it is).

**Samples.** A sample's augmentation and caption choice use ``random.Random(derive_seed(seed,
epoch, position))``. A bad sample (missing, truncated, undecodable, zero-sized or absurd-aspect
image, empty caption after ``pre_caption``) is replaced by the sample at a position drawn from
``(seed, epoch, position, attempt)``, so batches keep their size and stay deterministic.
Images whose shorter side is below ``data.min_image_size`` (1x1 tracking pixels, icons) or more
elongated than ``data.max_aspect_ratio`` are bad samples too.

**Bad samples are named.** Each bad sample becomes a record (sample, reason, source, epoch,
position) made where it was read (a worker) and sent with its batch; the rank's training process
counts it, warns (rate-limited) and, once :meth:`SampleCounters.open_bad_sample_log` was called,
appends it to ``<output_dir>/bad_samples.rank<r>.jsonl`` (see :class:`BadSampleLog`).

**State.** A batch is a pure function of ``(epoch, position)``, so the loader's whole position is
two integers that are identical on every rank: ``state_dict()`` returns them with the global batch
and the per-rank counters. **Pipeline.** The batches come from a ``torchdata.nodes`` graph
(:mod:`.nodes`): a source of this rank's sample positions, a batcher of one step's positions, a
parallel map that makes the batch in ``data.num_workers`` worker processes (stateless, results in
order), pin memory, a prefetcher. Since workers are stateless and the map keeps order, the
batches after ``load_state_dict`` are bitwise those of an uninterrupted run with any number of
workers.
Resuming on another world size with the same global batch continues at the same global sample.
If the global batch changes, the run continues at the same position of the same epoch (no sample
of the epoch is repeated or skipped), with steps now ``G'`` samples wide; ``steps_per_epoch``
changes accordingly.

Streamed tar shards have no global index; see :mod:`.shards` for their (per rank and worker) state.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blip_recipes.config.sections import DataConfig
from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.nodes import (
    STOP_SIGNALS,
    Pipeline,
    SamplePositions,
    SampleTask,
    build_pipeline,
    stack,
)
from blip_recipes.data.sources import MapSource, build_map_source
from blip_recipes.data.transforms import BadImage, TrainTransform, open_image
from blip_recipes.data.watchdog import LoaderError, Watchdog

logger = logging.getLogger("blip_recipes.data")

MAX_REPLACEMENTS = 50
_PRIVATE = ("_epoch", "_position", "_bad", "_bad_samples")


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


def load_map_samples(plan: EpochPlan, ctx: BatchContext, epoch: int, positions: list[int]):
    """(images, captions, image ids, bad-sample records) of the samples at global ``positions``
    of ``epoch``; a bad sample is replaced by the one at a position drawn from ``(seed, epoch,
    position, attempt)``."""
    order = plan.order(epoch)
    images, captions, image_ids, bad = [], [], [], []
    for pos in positions:
        sample_pos = pos
        for attempt in range(MAX_REPLACEMENTS + 1):
            rng = random.Random(derive_seed(ctx.seed, epoch, pos, attempt))
            source, index = plan.locate(int(order[sample_pos]))
            try:
                image, caption = load_sample(source, index, rng, ctx)
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


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


_worker_init = IgnoreStopSignals(_single_thread)


class BadSampleLog:
    """Every bad sample one rank replaced, one JSON line each, in
    ``<output_dir>/bad_samples.rank<r>.jsonl``.

    A record is ``{"rank", "step", "sample", "reason", "source", "epoch", ...}``: ``sample`` is
    the file path (or ``shard.tar/key``, ``source[index]``), ``step`` the optimizer step that
    consumed the batch it was replaced in (1-based, as in ``metrics.jsonl``), plus ``position``
    (place in the epoch's order) for map-style sources. The part of a damaged tar shard that
    could not be read is one record with ``sample`` the shard's name and ``count`` the samples
    it stands for. A sample that is bad again in a later epoch gets a record again, so the
    records of a rank add up (``count`` or 1 each) to its ``bad_samples`` counter.

    One file per rank, written only by that rank's training process (workers send their records
    with the batch): no two processes ever write one file, which also holds on NFS, where appends
    from several hosts can overwrite each other. Read them all with ``cat bad_samples.rank*.jsonl``.
    Each line is written and flushed as it comes, so the file is complete up to a crash.

    Restarts follow ``metrics.jsonl`` (:func:`blip_recipes.metrics.logger.prepare_jsonl`): a
    resumed run keeps the records up to its step (later ones are replayed) and a fresh start
    moves an old file to ``bad_samples.rank<r>.jsonl.K``; whatever is left out stays in such a
    backup. Rank 0 does the same for the files of ranks beyond the current world size.
    """

    PATTERN = "bad_samples.rank{rank}.jsonl"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        rank: int,
        world_size: int = 1,
        resume_step: int | None = None,
    ) -> None:
        from blip_recipes.metrics.logger import prepare_jsonl

        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.path = folder / self.PATTERN.format(rank=rank)
        paths = [self.path]
        if rank == 0:
            for other in folder.glob(self.PATTERN.format(rank="*")):
                r = other.name[len("bad_samples.rank") : -len(".jsonl")]
                if r.isdigit() and int(r) >= world_size:
                    paths.append(other)
        for path in paths:
            prepare_jsonl(path, resume_step, unique_steps=False)
        self._file = None

    def write(self, step: int, records: list[dict]) -> None:
        """Append one line per record (the file is created on the first bad sample)."""
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        for record in records:
            line = {"rank": self.rank, "step": step, **record}
            self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SampleCounters:
    """Per-rank sample and bad-sample counters with rate-limited warnings, the stop rule and the
    bad-sample log, shared by the map-style and the shard loaders (both have ``cfg`` and ``ctx``).
    """

    cfg: DataConfig
    ctx: BatchContext
    stop_requested: Callable[[], bool] | None = None
    """Set by the recipe: True once the run was asked to stop. A rank waiting for a batch then
    waits at most :data:`~.watchdog.STOP_GRACE_S` more (see :mod:`.watchdog`)."""

    def _watchdog(self) -> Watchdog:
        """The bound on this rank's waits for a batch (``data.timeout_s``)."""
        return Watchdog(self.cfg.timeout_s, self._stop_now, self.ctx.rank)

    def _stop_now(self) -> bool:
        return self.stop_requested is not None and self.stop_requested()

    def _init_counters(self) -> None:
        self.samples, self.bad_samples = 0, 0
        self._last_warning = 0.0
        self._warned = 0
        self.bad_sample_log: BadSampleLog | None = None
        self._step, self._batches, self._batches_per_step = 0, 0, 1
        self._damage_warned: set[tuple[str, int]] = set()

    def open_bad_sample_log(
        self,
        output_dir: str | os.PathLike,
        resume_step: int | None = None,
        batches_per_step: int = 1,
    ) -> BadSampleLog:
        """Name every bad sample from now on in ``output_dir`` (see :class:`BadSampleLog`).

        Call it once the run knows where it starts: ``resume_step`` is the step a resumed run
        continues from (None: a fresh start at step 0); ``batches_per_step`` is how many loader
        batches one optimizer step takes (gradient accumulation), to number records by step.
        """
        self.close_bad_sample_log()
        self.bad_sample_log = BadSampleLog(
            output_dir, self.ctx.rank, self.ctx.world_size, resume_step
        )
        self._step, self._batches = resume_step or 0, 0
        self._batches_per_step = max(1, batches_per_step)
        return self.bad_sample_log

    def close_bad_sample_log(self) -> None:
        if self.bad_sample_log is not None:
            self.bad_sample_log.close()
            self.bad_sample_log = None

    def _count_batch(self, bad: int, records: list[dict]) -> None:
        """Count one delivered batch and its bad samples (the training process only)."""
        self._batches += 1
        self.samples += self.ctx.batch_size
        if bad:
            self._record_bad(bad, records)

    def _current_step(self) -> int:
        return self._step + (self._batches - 1) // self._batches_per_step + 1

    def _counter_stats(self) -> dict:
        seen = self.samples + self.bad_samples
        return {
            "samples": self.samples,
            "bad_samples": self.bad_samples,
            "bad_fraction": self.bad_samples / seen if seen else 0.0,
        }

    def _record_bad(self, bad: int, records: list[dict]) -> None:
        self.bad_samples += bad
        if self.bad_sample_log is not None:
            self.bad_sample_log.write(self._current_step(), records)
        for r in records:  # a damaged shard: once per shard and epoch, never rate-limited
            if "count" in r and (r["sample"], r["epoch"]) not in self._damage_warned:
                self._damage_warned.add((r["sample"], r["epoch"]))
                logger.warning(
                    "rank %d: shard %s (epoch %d): %s", self.ctx.rank, r["sample"], r["epoch"],
                    r["reason"],
                )  # fmt: skip
        messages = [describe_bad(r) for r in records[:8]]
        if len(records) > 8:
            messages.append(f"and {len(records) - 8} more")
        now = time.monotonic()
        if self._warned < 5 or now - self._last_warning > 30.0:
            self._warned += 1
            self._last_warning = now
            logger.warning(
                "rank %d: replaced %d bad sample(s) (%d so far of %d): %s",
                self.ctx.rank,
                bad,
                self.bad_samples,
                self.samples + self.bad_samples,
                "; ".join(messages),
            )
        seen = self.samples + self.bad_samples
        fraction = self.bad_samples / seen
        if seen >= self.cfg.bad_fraction_min_samples and fraction > self.cfg.max_bad_fraction:
            raise BadSampleError(
                f"rank {self.ctx.rank}: {self.bad_samples} of {seen} samples were bad "
                f"({fraction:.1%} > data.max_bad_fraction={self.cfg.max_bad_fraction}); latest: "
                f"{'; '.join(messages)}. Fix or filter the data (tools/build_shards.py reports bad "
                "inputs), or raise data.max_bad_fraction."
            )


class TrainLoader(SampleCounters):
    """Infinite, resumable iterator of ``{"images", "input_ids", "attention_mask", "image_ids"}``
    batches.

    ``images`` is uint8 (B, 3, s, s), ``input_ids``/``attention_mask`` int64 (B, L),
    ``image_ids`` int64 (B,), with B = ``data.batch_size`` always. A ``Stateful``
    (``state_dict``/``load_state_dict``) for the checkpoint manager; ``stats()`` gives the
    per-rank counters.
    """

    def __init__(
        self,
        plan: EpochPlan,
        ctx: BatchContext,
        data_cfg: DataConfig,
    ) -> None:
        self.plan, self.ctx, self.cfg = plan, ctx, data_cfg
        self.global_batch = ctx.batch_size * ctx.world_size
        if plan.length < self.global_batch:
            raise ValueError(
                f"the data has {plan.length} samples per epoch, fewer than one global batch "
                f"(data.batch_size x world size = {self.global_batch})"
            )
        self.epoch, self.position = 0, 0
        self._init_counters()
        self._iterator: Pipeline | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Steps in a full epoch (``N // global batch``)."""
        return self.plan.length // self.global_batch

    @property
    def epoch_length(self) -> int:
        """Global samples in one epoch."""
        return self.plan.length

    def _make_iterator(self) -> Pipeline:
        ctx = self.ctx
        positions = SamplePositions(
            self.plan.advance, ctx.batch_size, ctx.rank, ctx.world_size, self.epoch, self.position
        )
        return build_pipeline(
            positions,
            MapBatchMaker(self.plan, ctx),
            batch_size=ctx.batch_size,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory,
            watchdog=self._watchdog(),
        )

    def close(self) -> None:
        """Stop the worker processes and threads (a later ``next()`` starts them again)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        epoch, position = batch.pop("_epoch"), batch.pop("_position")
        bad, bad_samples = batch.pop("_bad"), batch.pop("_bad_samples")
        self.epoch, self.position = self.plan.advance(epoch, position, self.global_batch)
        self._count_batch(bad, bad_samples)
        return batch

    def stats(self) -> dict:
        """Per-rank counters: samples delivered, bad samples replaced, epoch and position."""
        return {**self._counter_stats(), "epoch": self.epoch, "position": self.position}

    def state_dict(self) -> dict:
        """Position (identical on all ranks) plus this rank's counters."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "global_batch": self.global_batch,
            "epoch_length": self.plan.length,
            "samples": self.samples,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position (see the module docstring for global-batch changes)."""
        if int(state["epoch_length"]) != self.plan.length:
            logger.warning(
                "data epoch length changed (%d -> %d samples): the order of the resumed epoch "
                "differs from the interrupted run",
                int(state["epoch_length"]),
                self.plan.length,
            )
        if int(state["global_batch"]) != self.global_batch:
            logger.warning(
                "global batch changed (%d -> %d): continuing at global sample %d of epoch %d",
                int(state["global_batch"]),
                self.global_batch,
                int(state["position"]),
                int(state["epoch"]),
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position + self.global_batch > self.plan.length:
            self.epoch, self.position = self.epoch + 1, 0
        self.samples = int(state.get("samples", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
        self.close()


def build_train_loader(
    data_cfg: DataConfig,
    tokenizer,
    image_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
):
    """Build the training loader of this rank (see the module docstring for order and state).

    Args:
        data_cfg: the ``[data]`` section.
        tokenizer: from :func:`build_tokenizer`; captions are tokenized in the loader.
        image_size: output side of the train transform.
        seed: the run seed (data order, augmentation, replacements).
        rank, world_size: this process's place among the data-parallel ranks.

    Returns:
        An infinite iterator of ``{"images": uint8 (B, 3, s, s), "input_ids": int64 (B, L),
        "attention_mask": int64 (B, L), "image_ids": int64 (B,)}`` with
        ``state_dict``/``load_state_dict``, ``steps_per_epoch`` (None for streamed shards) and
        ``stats()``.

        ``image_ids[i] == image_ids[j]`` iff samples ``i`` and ``j`` show the same image of the
        same source (e.g. two captions of one COCO image), on every rank alike, so a contrastive
        loss can mask such pairs as positives. JSON/JSONL: the record's ``image_id`` field when
        present, else its image path, numbered densely in order of first appearance over the
        source's files and offset by the images of the sources before it; synthetic: the sample
        index (offset likewise); tar shards: a stable 63-bit hash (BLAKE2b) of ``"<shard
        basename>/<key>"``. Pretraining ignores the field.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transform = TrainTransform(
        image_size,
        min_scale=data_cfg.min_scale,
        randaugment=data_cfg.randaugment,
        use_draft=data_cfg.jpeg_draft,
        max_aspect_ratio=data_cfg.max_aspect_ratio,
        min_image_size=data_cfg.min_image_size,
    )
    ctx = BatchContext(
        tokenizer=tokenizer,
        transform=transform,
        max_words=data_cfg.max_words,
        batch_size=data_cfg.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    kinds = {s.kind for s in data_cfg.sources}
    if kinds == {"shards"}:
        from blip_recipes.data.shards import ShardLoader

        return ShardLoader(data_cfg, ctx)
    map_cfgs = [s for s in data_cfg.sources if s.kind != "shards"]
    sources = [build_map_source(s, seed) for s in map_cfgs]
    plan = EpochPlan(sources, [s.weight for s in map_cfgs], seed)
    if "shards" in kinds:
        from blip_recipes.data.mixed import MixedLoader

        return MixedLoader(plan, ctx, data_cfg)
    return TrainLoader(plan, ctx, data_cfg)
