"""The tar-shard loader: one rank's worker processes each playing one shard stream (see
:mod:`.shard_streams`), batches interleaved in a fixed order, bad samples counted, a dead or
stuck worker named, and the per-rank state that resumes it exactly.

Batches are received from the ``DataLoader`` in a thread (:class:`~.watchdog.WatchedFetch`):
receiving one can block for good (its shared memory is fetched from the worker that made it,
and a stopped worker never answers; with no workers, a read of a hung file system never
returns), so the rank waits on that thread with the watchdog's checks instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from blip_recipes.config.sections import DataConfig
from blip_recipes.data._seeding import private_generator
from blip_recipes.data.counters import SampleCounters
from blip_recipes.data.nodes import close_at_exit
from blip_recipes.data.samples import IgnoreStopSignals
from blip_recipes.data.shard_files import list_shards, shard_sizes
from blip_recipes.data.shard_streams import ShardBatches
from blip_recipes.data.watchdog import (
    POLL_S,
    LoaderError,
    Watchdog,
    WatchedFetch,
    dataloader_awaited_worker,
    dataloader_workers,
    release_dataloader_workers,
)

logger = logging.getLogger("blip_recipes.data")

#: Seconds a rank looks for a dead worker after its connection to the workers broke.
WORKER_EXIT_WAIT_S = 2.0


class ShardLoader(SampleCounters):
    """Infinite, resumable iterator over tar shards; the same surface as :class:`TrainLoader`.

    ``num_samples`` and ``steps_per_epoch`` (``num_samples // global batch``) come from
    ``sizes.json`` or img2dataset's ``*_stats.json`` beside the shards (:func:`shard_sizes`);
    both are None when some shard's size is unknown (then ``training.steps_per_epoch`` is needed).
    """

    def __init__(self, data_cfg: DataConfig, ctx) -> None:
        self.cfg, self.ctx = data_cfg, ctx
        self.shards = [p for s in data_cfg.sources for p in list_shards(s.paths)]
        self.sizes, unknown = shard_sizes(self.shards)
        self.num_samples = None if unknown else sum(self.sizes.values())
        global_batch = ctx.batch_size * ctx.world_size
        self.steps_per_epoch = (
            None if self.num_samples is None else self.num_samples // global_batch
        )
        self.streams_per_rank = max(1, data_cfg.num_workers)
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self._init_counters()
        self._iterator = None
        self._fetch: WatchedFetch | None = None
        self._failed = False  # the watchdog found a dead or stuck worker
        close_at_exit(self)
        if len(self.shards) < ctx.world_size * self.streams_per_rank:
            logger.warning(
                "%d shards for %d streams (world size x workers): every stream reads every shard",
                len(self.shards),
                ctx.world_size * self.streams_per_rank,
            )

    @property
    def epoch(self) -> int:
        return min((s["epoch"] for s in self.states.values()), default=0)

    def __iter__(self):
        return self

    def _start(self):
        nw = self.cfg.num_workers
        dataset = ShardBatches(
            self.shards,
            self.ctx,
            self.cfg.shuffle_buffer,
            self.streams_per_rank,
            dict(self.states),
            self.consumed % self.streams_per_rank,
            self.sizes,
        )
        iterator = iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=nw,
                prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                worker_init_fn=IgnoreStopSignals() if nw > 0 else None,
                generator=private_generator(),
                timeout=POLL_S if nw > 0 else 0,  # see _receive
            )
        )
        release_dataloader_workers(iterator)  # a dead worker is the watchdog's to report
        return iterator

    def _next_batch(self) -> dict:
        """The next batch from the DataLoader, received in a thread while this one runs the
        watchdog's checks every ``POLL_S`` (:mod:`.watchdog`)."""
        if self._fetch is None:
            self._iterator = self._start()
            self._closing = threading.Event()
            ahead = 1 if self.cfg.num_workers > 0 else 0
            receive = self._receive(self._iterator, self._closing)
            self._fetch = WatchedFetch(receive, ahead, name="shard-batches")
        watchdog = self._watchdog()
        try:
            return self._fetch.get(lambda: self._check(watchdog))
        except (RuntimeError, EOFError, ConnectionError) as e:  # EOF: killed mid-send
            if isinstance(e, LoaderError) or self.cfg.num_workers == 0:
                raise
            # A worker killed while it hands over a batch breaks the connection a moment
            # before the kernel reports its exit: look for the dead worker for a while.
            broken = isinstance(e, (EOFError, ConnectionError))
            deadline = time.monotonic() + (WORKER_EXIT_WAIT_S if broken else 0)
            while True:
                self._check(watchdog)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            if broken:
                self._failed = True
                raise LoaderError(
                    f"rank {watchdog.rank}: the data loader's worker connection broke "
                    f"({type(e).__name__}: {e}) and no worker exited"
                ) from e
            raise

    @staticmethod
    def _receive(iterator: Iterator[dict], closing: threading.Event) -> Iterator[dict]:
        """The DataLoader's batches, waiting :data:`POLL_S` at a time until ``closing``: once
        its workers are shut down, a DataLoader without a timeout would wait for them forever
        (it only looks for workers that died while it still counted on them)."""
        while not closing.is_set():
            try:
                yield next(iterator)
            except RuntimeError as e:
                if not str(e).startswith("DataLoader timed out"):
                    raise

    def _check(self, watchdog: Watchdog) -> None:
        """The watchdog's checks, naming the worker whose batch is next (the DataLoader hands
        out batches round-robin, in order)."""
        it = self._iterator
        fetching = self._fetch.thread if self._fetch is not None else None
        try:
            watchdog.check(dataloader_workers(it), dataloader_awaited_worker(it), fetching)
        except LoaderError as error:
            self._failed = True
            raise error from None

    def __next__(self) -> dict:
        batch = self._next_batch()
        if "_raise" in batch:
            raise batch["_raise"]
        self.states[int(batch.pop("_stream"))] = batch.pop("_state")
        batch.pop("_epoch")
        bad, records = batch.pop("_bad"), batch.pop("_bad_samples")
        self.consumed += 1
        self._count_batch(bad, records)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts them again). Also done at
        interpreter exit: the workers ignore SIGTERM, which ``multiprocessing`` would wait on,
        so one that is still alive after the DataLoader's shutdown gets SIGKILL (at once when the
        watchdog found a dead or stuck worker)."""
        if self._fetch is not None:
            self._closing.set()
            self._fetch.close()
        if self._iterator is not None:
            workers = list(getattr(self._iterator, "_workers", []))
            if self._failed:
                for worker in workers:
                    if worker.is_alive():
                        worker.kill()
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
        self._iterator, self._fetch = None, None
        self._failed = False

    def __del__(self) -> None:
        # The fetch thread holds the DataLoader iterator, so the iterator's own clean-up would
        # never run for a loader dropped without close(), and its workers (they ignore SIGTERM)
        # would outlive it: multiprocessing's exit hook then waits for them forever.
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def stats(self) -> dict:
        """Per-rank counters: samples delivered, bad samples replaced, epoch."""
        return {**self._counter_stats(), "epoch": self.epoch}

    def state_dict(self) -> dict:
        """This rank's stream positions (per rank: save under a rank-specific key)."""
        return {
            "kind": "shards",
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "streams_per_rank": self.streams_per_rank,
            "consumed": self.consumed,
            "streams": {str(k): dict(v) for k, v in self.states.items()},
            "samples": self.samples,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        same = (
            int(state["world_size"]) == self.ctx.world_size
            and int(state["streams_per_rank"]) == self.streams_per_rank
            and int(state["rank"]) == self.ctx.rank
        )
        streams = {int(k): dict(v) for k, v in state["streams"].items()}
        if same:
            self.states, self.consumed = streams, int(state["consumed"])
        else:
            epoch = min((s["epoch"] for s in streams.values()), default=0)
            logger.warning(
                "shard loader layout changed (world size x workers); restarting every stream at "
                "the beginning of epoch %d",
                epoch,
            )
            fresh = dict(shard=0, offset=0, ordinal=0, window=0, taken=0, epoch=epoch)
            self.states = {i: dict(fresh) for i in range(self.streams_per_rank)}
            self.consumed = 0
        self.samples = int(state.get("samples", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
        self.close()


__all__ = ["WORKER_EXIT_WAIT_S", "ShardLoader"]
