"""Per-rank sample counters: bad samples counted, warned about, written to
``bad_samples.rank<r>.jsonl`` (:class:`BadSampleLog`), and ``data.max_bad_fraction`` enforced.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from blip_recipes.config.sections import DataConfig
from blip_recipes.data.samples import BadSampleError, BatchContext, describe_bad
from blip_recipes.data.watchdog import Watchdog

logger = logging.getLogger("blip_recipes.data")


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
