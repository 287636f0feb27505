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

import logging
import os

from blip_recipes.config.sections import DataConfig
from blip_recipes.data.counters import (
    SampleCounters,
)
from blip_recipes.data.nodes import (
    Pipeline,
    SamplePositions,
    build_pipeline,
)
from blip_recipes.data.samples import (
    BatchContext,
    EpochPlan,
    MapBatchMaker,
)
from blip_recipes.data.sources import build_map_source
from blip_recipes.data.transforms import TrainTransform

logger = logging.getLogger("blip_recipes.data")


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
            self._batch_maker(),
            batch_size=ctx.batch_size,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory,
            watchdog=self._watchdog(),
        )

    def _batch_maker(self) -> MapBatchMaker:
        """What the workers run to make a batch (a subclass may make other batches)."""
        return MapBatchMaker(self.plan, self.ctx)

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
