"""Tar shards and map-style sources (JSON, JSONL, synthetic) mixed by weight in every batch.

**Share.** An epoch is ``N_map + N_shards`` samples: ``N_map`` the map-style sources' epoch
(:class:`~blip_recipes.data.samples.EpochPlan`, each source repeated or subsampled by its
weight) and ``N_shards = sum(weight_k x samples_k)`` over the shard sources (sizes from
``sizes.json`` or img2dataset stats: :func:`~blip_recipes.data.shard_files.shard_sizes`). Each of the
``G = batch_size x world_size`` sample slots of step ``s`` is a shard sample with probability
``p = N_shards / (N_map + N_shards)``, drawn from ``(seed, s, slot)`` alone, so every rank knows
every rank's split and a resumed run draws the same. ``steps_per_epoch = (N_map + N_shards) //
G``; ``stats()["epoch"]`` is ``step // steps_per_epoch``.

**Map-style slots** take consecutive global positions of the map-style order (identical on all
ranks: rank ``r`` starts after the map slots of ranks ``< r``), running on into the next epoch
of that order without dropping a tail. They are made by the same ``torchdata.nodes`` graph as the
map-style loader (:mod:`.nodes`), one step per item.

**Shard slots** take this rank's next shard samples, in stream order, from a
:class:`~blip_recipes.data.shards.ShardLoader` over the shard sources (its own workers: about
``p x data.num_workers`` of them, the map graph gets the rest). The shard loader makes batches of
``B`` samples; a batch can feed several steps.

**State** (per rank, like shards alone): the step, the map-style position, the shard loader's
state before the shard batch in use and how many of its samples were used. Resuming with the same
world size and workers is bitwise. With another world size the per-rank state is not restored
(:class:`~blip_recipes.checkpoint.states.PerRankState`) and the data starts over, as for shards.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import numpy as np
import torch
from torchdata.nodes import BaseNode

from blip_recipes.config.sections import DataConfig
from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.counters import SampleCounters
from blip_recipes.data.nodes import Pipeline, build_pipeline, stack
from blip_recipes.data.samples import BatchContext, EpochPlan, bad_count, load_map_samples
from blip_recipes.data.shard_files import list_shards, shard_sizes
from blip_recipes.data.shards import ShardLoader

logger = logging.getLogger("blip_recipes.data")

_SLOT_TAG = 0x313D


def shard_slots(seed: int, step: int, global_batch: int, shard_share: float) -> np.ndarray:
    """bool (G,): which slots of step ``step`` (all ranks, rank-major) take a shard sample."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, step, _SLOT_TAG)))
    return rng.random(global_batch) < shard_share


class MixedStep(NamedTuple):
    """What one rank's batch of step ``step`` is made of: ``map_slots[i]`` says slot ``i``
    takes a map-style sample; ``tasks`` are their ``(epoch, position)``; ``after`` the map-style
    ``(epoch, position)`` the next step starts at."""

    step: int
    map_slots: tuple[bool, ...]
    tasks: tuple[tuple[int, int], ...]
    after: tuple[int, int]


class MixedSteps(BaseNode[MixedStep]):
    """Source node of a mixed run: one :class:`MixedStep` per step from ``state`` on, forever.
    State ``{"step", "epoch", "position"}`` (the map-style position the step starts at)."""

    def __init__(self, plan_length: int, ctx: BatchContext, shard_share: float, state: dict):
        super().__init__()
        self.length, self.ctx, self.share = plan_length, ctx, shard_share
        self.start = dict(state)
        self.state = dict(state)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.state = dict(initial_state if initial_state is not None else self.start)

    def _at(self, epoch: int, position: int, offset: int) -> tuple[int, int]:
        position += offset
        return epoch + position // self.length, position % self.length

    def next(self) -> MixedStep:
        ctx, st = self.ctx, self.state
        is_map = ~shard_slots(ctx.seed, st["step"], ctx.batch_size * ctx.world_size, self.share)
        lo = ctx.rank * ctx.batch_size
        mine = is_map[lo : lo + ctx.batch_size]
        before = int(is_map[:lo].sum())
        tasks = tuple(
            self._at(st["epoch"], st["position"], before + i) for i in range(int(mine.sum()))
        )
        after = self._at(st["epoch"], st["position"], int(is_map.sum()))
        item = MixedStep(st["step"], tuple(bool(x) for x in mine), tasks, after)
        self.state = {"step": st["step"] + 1, "epoch": after[0], "position": after[1]}
        return item

    def get_state(self) -> dict:
        return dict(self.state)


class MixedMapPart:
    """Map function of the mixed graph: the map-style samples of one step (in the workers)."""

    def __init__(self, plan: EpochPlan, ctx: BatchContext) -> None:
        self.plan, self.ctx = plan, ctx

    def __call__(self, step: MixedStep) -> dict:
        images, captions, image_ids, bad = [], [], [], []
        for epoch in sorted({e for e, _ in step.tasks}):
            positions = [p for e, p in step.tasks if e == epoch]
            part = load_map_samples(self.plan, self.ctx, epoch, positions)
            for into, values in zip((images, captions, image_ids, bad), part):
                into.extend(values)
        out = {"step": step, "images": None, "_bad_samples": bad}
        if images:
            input_ids, attention_mask = self.ctx.tokenizer(captions)
            out.update(
                images=stack(images),
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_ids=torch.tensor(image_ids, dtype=torch.int64),
            )
        return out


class _ShardBatches(ShardLoader):
    """The shard loader of a mixed run: its batches are raw material, counted by the mixer."""

    def _count_batch(self, bad: int, records: list[dict]) -> None:
        self.consumed_records = records


def shard_samples(data_cfg: DataConfig) -> int:
    """``sum(weight x samples)`` over the shard sources; raises if a shard's size is unknown."""
    total = 0.0
    for source in data_cfg.sources:
        if source.kind != "shards":
            continue
        known, unknown = shard_sizes(list_shards(source.paths))
        if unknown:
            raise ValueError(
                f"mixing shards with map-style sources needs every shard's size, unknown for "
                f"{len(unknown)} shard(s), e.g. {unknown[:3]}: write a sizes.json beside them "
                '({"shard.tar": samples, ...}) or keep img2dataset\'s *_stats.json'
            )
        total += source.weight * sum(known.values())
    return max(1, round(total))


class MixedLoader(SampleCounters):
    """Infinite, resumable iterator of batches mixing shard and map-style samples (module
    docstring); the same batch contract and surface as :class:`TrainLoader`. Its state is per
    rank (the recipe saves it through ``PerRankState``)."""

    def __init__(self, plan: EpochPlan, ctx: BatchContext, data_cfg: DataConfig) -> None:
        self.plan, self.ctx, self.cfg = plan, ctx, data_cfg
        self.global_batch = ctx.batch_size * ctx.world_size
        self.num_shard_samples = shard_samples(data_cfg)
        self.num_samples = plan.length + self.num_shard_samples
        self.shard_share = self.num_shard_samples / self.num_samples
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"the data has {self.num_samples} samples per epoch, fewer than one global "
                f"batch (data.batch_size x world size = {self.global_batch})"
            )
        workers = data_cfg.num_workers
        self.shard_workers = min(workers, max(1, round(workers * self.shard_share)))
        self.map_workers = max(1, workers - self.shard_workers) if workers else 0
        shard_cfg = dataclasses.replace(
            data_cfg,
            sources=[s for s in data_cfg.sources if s.kind == "shards"],
            num_workers=self.shard_workers,
        )
        self.shards = _ShardBatches(shard_cfg, ctx)
        self.shards.stop_requested = self._stop_now
        self.step, self.epoch_position = 0, (0, 0)
        self._chunk: dict | None = None
        self._used = 0
        self._skip = 0
        self._shards_before: dict = self.shards.state_dict()
        self._init_counters()
        self._iterator: Pipeline | None = None

    @property
    def steps_per_epoch(self) -> int:
        """``(N_map + N_shards) // global batch``."""
        return self.num_samples // self.global_batch

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> MixedLoader:
        return self

    def _make_iterator(self) -> Pipeline:
        epoch, position = self.epoch_position
        state = {"step": self.step, "epoch": epoch, "position": position}
        return build_pipeline(
            MixedSteps(self.plan.length, self.ctx, self.shard_share, state),
            MixedMapPart(self.plan, self.ctx),
            batch_size=None,
            num_workers=self.map_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory,
            watchdog=self._watchdog(),
        )

    def _shard_rows(self, n: int) -> tuple[list[dict], list[dict]]:
        """``n`` next shard samples as slices of shard batches, and newly seen bad records."""
        pieces, records = [], []
        while n > 0:
            if self._chunk is None or self._used == self.ctx.batch_size:
                self._shards_before = self.shards.state_dict()
                self._chunk = next(self.shards)
                self._used, self._skip = self._skip, 0
                if self._used == 0:  # a resumed batch's bad samples were counted before
                    records += self.shards.consumed_records
            take = min(n, self.ctx.batch_size - self._used)
            rows = slice(self._used, self._used + take)
            pieces.append({k: v[rows] for k, v in self._chunk.items()})
            self._used += take
            n -= take
        return pieces, records

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        part = next(self._iterator)
        step: MixedStep = part["step"]
        map_slots = torch.tensor(step.map_slots)
        shard_pieces, shard_records = self._shard_rows(int((~map_slots).sum()))
        batch = {}
        for key in ("images", "input_ids", "attention_mask", "image_ids"):
            shard_part = [p[key] for p in shard_pieces]
            template = part[key] if part["images"] is not None else shard_part[0]
            out = template.new_empty((self.ctx.batch_size, *template.shape[1:]))
            if part["images"] is not None:
                out[map_slots] = part[key]
            if shard_part:
                out[~map_slots] = torch.cat(shard_part)
            batch[key] = out
        self.step = step.step + 1
        self.epoch_position = step.after
        records = part["_bad_samples"] + shard_records
        self._count_batch(bad_count(records), records)
        return batch

    def close(self) -> None:
        """Stop the workers (a later ``next()`` starts them again)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self.shards.close()

    def stats(self) -> dict:
        """Per-rank counters, the step and the epoch (``step // steps_per_epoch``)."""
        return {**self._counter_stats(), "epoch": self.epoch, "step": self.step}

    def state_dict(self) -> dict:
        """This rank's position: step, map-style position, shard state (see the module doc)."""
        in_use = self._chunk is not None and self._used < self.ctx.batch_size
        return {
            "kind": "mixed",
            "step": self.step,
            "epoch": self.epoch_position[0],
            "position": self.epoch_position[1],
            "global_batch": self.global_batch,
            "shards": self._shards_before if in_use else self.shards.state_dict(),
            "shard_batch_used": self._used if in_use else 0,
            "samples": self.samples,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "mixed":
            raise ValueError(
                f"loader state of kind {state.get('kind', 'map-style')!r} cannot resume a run "
                "mixing shards with map-style sources (the data sources changed)"
            )
        if int(state["global_batch"]) != self.global_batch:
            logger.warning(
                "global batch changed (%d -> %d): the mixed run's slot draws differ from here on",
                int(state["global_batch"]),
                self.global_batch,
            )
        self.close()
        self.step = int(state["step"])
        self.epoch_position = (int(state["epoch"]), int(state["position"]))
        self.shards.load_state_dict(state["shards"])
        self._chunk, self._used = None, 0
        self._skip = int(state["shard_batch_used"])
        self.samples = int(state.get("samples", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
