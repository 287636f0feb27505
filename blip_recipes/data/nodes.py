"""The training loader's ``torchdata.nodes`` graph, and what its worker processes need.

The graph of one rank (see :func:`build_pipeline`)::

    SamplePositions            this rank's global sample positions, step by step (main process)
      -> Batcher(B)            the B positions of one step
      -> ParallelMapper        load, decode, augment, collate, tokenize one step's samples
                               (data.num_workers processes, in order; inline with 0 workers)
      -> PinMemory             (CUDA only, data.pin_memory)
      -> a fetch thread        data.prefetch_factor batches ahead with workers; with 0 workers
                               it makes each batch while the rank waits for it

The map function receives a whole step's positions and returns the finished batch: one message
and one shared-memory tensor per batch between processes, as with ``DataLoader``. Per-sample
messages would cost an IPC round and a shared-memory segment for every image.

The rank's wait for a batch is bounded (:mod:`.watchdog`), with or without workers: batches
are fetched in a thread, and the rank checks every half second that its workers are alive,
whether a stop was requested and how long it has waited. A
:class:`~.watchdog.LoaderError` raised in a worker (too many bad samples) reaches the rank as a
result and is raised there with its own one-line message.

Worker processes ignore the stop signals and exit when their rank is gone (see
:class:`WorkerFunction`), as ``DataLoader`` workers did with ``IgnoreStopSignals`` and the
parent watchdog.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.util  # noqa: F401 (its exit hook is registered before ours, runs after)
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torchdata.nodes import (
    BaseNode,
    Batcher,
    Loader,
    ParallelMapper,
    PinMemory,
)

from blip_recipes.data.watchdog import LoaderError, Watchdog, WatchedFetch

logger = logging.getLogger("blip_recipes.data")

#: Signals that ask a run to save and stop. The rank handles them; its loader workers ignore them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class SampleTask(NamedTuple):
    """One sample of one step: the step starts at global ``step_position`` of ``epoch``; the
    sample is at global ``position`` of the epoch's order."""

    epoch: int
    step_position: int
    position: int


class SamplePositions(BaseNode[SampleTask]):
    """This rank's sample positions from ``(epoch, position)`` on, step after step, forever.

    Step ``(e, p)`` gives positions ``p + rank*B ... p + rank*B + B - 1``, then the next step
    starts at ``advance(e, p, G)`` (:meth:`EpochPlan.advance`, ``G = B x world size``). The state
    is ``{"epoch", "position", "slot"}`` (the step and how many of its samples were given).
    """

    def __init__(self, advance: Callable, batch_size: int, rank: int, world_size: int,
                 epoch: int = 0, position: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.advance = advance
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start = {"epoch": epoch, "position": position, "slot": 0}
        self.state = dict(self.start)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.state = dict(initial_state if initial_state is not None else self.start)

    def next(self) -> SampleTask:
        st = self.state
        if st["slot"] == self.batch_size:
            epoch, position = self.advance(
                st["epoch"], st["position"], self.batch_size * self.world_size
            )
            st = self.state = {"epoch": epoch, "position": position, "slot": 0}
        first = st["position"] + self.rank * self.batch_size
        task = SampleTask(st["epoch"], st["position"], first + st["slot"])
        st["slot"] += 1
        return task

    def get_state(self) -> dict:
        return dict(self.state)


class WorkerFailure(NamedTuple):
    """A :class:`LoaderError` raised by the map function, returned as its result (rather than
    raised, which would reach the rank as a wrapped traceback): the rank raises it as it is."""

    error: LoaderError


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


_IN_WORKER = False


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a worker process straight into shared memory, as ``DataLoader``'s
    collate does, so sending the batch to the rank copies nothing."""
    if not _IN_WORKER:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class WorkerFunction:
    """A map function that first prepares the worker process it runs in.

    In a process other than the one that built it (a ``ParallelMapper`` process worker), the
    first call ignores SIGTERM, SIGINT and SIGUSR1, unblocks them (the pipeline starts its
    workers with them blocked, so one arriving before this call stays pending and is then
    dropped) and starts a thread that exits the worker once its parent is gone.

    Slurm (``scancel``, the time limit, ``--signal``) signals every process of a job step and
    torchrun signals each rank's whole process group, so loader workers receive the same stop
    signal as their rank. Left alone, a worker dies of it (SIGTERM, SIGUSR1) or raises
    KeyboardInterrupt (SIGINT), the rank's next batch fails and no checkpoint is written.
    Ignoring them leaves shutdown to the rank, which saves and then closes its loader; SIGKILL
    still ends a worker. A :class:`LoaderError` of ``fn`` is returned as a :class:`WorkerFailure`.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.parent = os.getpid()
        self._prepared: int | None = None

    def __call__(self, item: Any) -> Any:
        if self._prepared != os.getpid():
            self._prepared = os.getpid()
            if self._prepared != self.parent:
                global _IN_WORKER
                _IN_WORKER = True
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                torch.set_num_threads(1)
                threading.Thread(target=_watch_parent, args=(self.parent,), daemon=True).start()
        try:
            return self.fn(item)
        except LoaderError as e:
            return WorkerFailure(e)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while the pipeline starts its threads and worker
    processes, which inherit the mask: a stop signal then reaches the rank (once unblocked here)
    and never a worker before it ignores it. A blocked signal waits; none is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_LIVE: weakref.WeakSet = weakref.WeakSet()
_OWN_THREADS: weakref.WeakSet = weakref.WeakSet()
_previous_excepthook = threading.excepthook


def _excepthook(args: Any) -> None:
    """A pipeline thread that fails (its worker died with a batch in transit) goes to the log at
    debug level, not to the console: the rank's watchdog reports the cause in one line."""
    if args.thread in _OWN_THREADS:
        logger.debug(
            "loader thread %s ended", args.thread.name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )  # fmt: skip
        return
    _previous_excepthook(args)


@atexit.register
def close_live_loaders() -> None:
    """Stop the workers of loaders still open at interpreter exit. Registered after
    ``multiprocessing``'s own exit hook, so it runs first: that hook SIGTERMs daemonic children
    and then joins them, which would wait forever for workers that ignore SIGTERM."""
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception:
            pass


def close_at_exit(loader: object) -> None:
    """Have ``loader.close()`` called at interpreter exit if it is still alive then."""
    _LIVE.add(loader)


class Pipeline:
    """A started node graph: ``next()`` gives batches; :meth:`close` stops its threads and
    worker processes.

    Batches are fetched in a thread (:class:`~.watchdog.WatchedFetch`: ``prefetch`` ahead with
    workers, each one only when asked for without), and the rank's wait for one runs the
    watchdog's checks every :data:`~.watchdog.POLL_S` s.
    """

    def __init__(
        self,
        root: BaseNode,
        mapper: ParallelMapper,
        threaded: list[BaseNode],
        watchdog: Watchdog,
        prefetch: int = 1,
    ) -> None:
        self.mapper, self.threaded, self.watchdog = mapper, threaded, watchdog
        self._failed = False  # the watchdog found a dead or stuck worker
        close_at_exit(self)
        with stop_signals_blocked():  # iter() resets the graph: threads and workers start here
            self._iterator = iter(Loader(root, restart_on_stop_iteration=False))
            ahead = max(1, prefetch) if mapper.num_workers > 0 else 0
            self._fetch = WatchedFetch(self._iterator, ahead)
        inner = getattr(getattr(mapper, "_it", None), "_it", None)
        for thread in (getattr(inner, "_read_thread", None), getattr(inner, "_sort_thread", None)):
            if thread is not None:
                _OWN_THREADS.add(thread)
        if threading.excepthook is not _excepthook:
            threading.excepthook = _excepthook

    def workers(self) -> list:
        """The worker processes (empty when inline or not started)."""
        inner = getattr(getattr(self.mapper, "_it", None), "_it", None)
        return list(getattr(inner, "_workers", []))

    def __next__(self) -> Any:
        self.watchdog.start()
        item = self._fetch.get(self._check)
        if isinstance(item, WorkerFailure):
            raise item.error
        return item

    def _check(self) -> None:
        try:
            self.watchdog.check(self.workers(), fetching=self._fetch.thread)
        except LoaderError:
            self._failed = True
            raise

    def close(self) -> None:
        """Stop fetching, let the result threads finish while the workers still live (a batch in
        transit fetches its shared memory from the worker that made it), then stop the workers
        (SIGKILL for one that does not exit: they ignore SIGTERM). After the watchdog found a
        dead or stuck worker, SIGKILL them all first: a thread may wait on a stuck one."""
        self._fetch.close()
        if self._failed:
            for worker in self.workers():
                if worker.is_alive():
                    worker.kill()
        for node in self.threaded:  # the pin-memory thread first: it pulls
            it = getattr(node, "_it", None)
            if it is not None:
                it._shutdown()
        impl = getattr(self.mapper, "_it", None)
        inner = getattr(impl, "_it", None)
        if inner is None or not hasattr(inner, "_workers"):
            return  # inline (no workers) or never started
        inner._stop.set()
        for thread in (inner._read_thread, inner._sort_thread, self._fetch.thread):
            if thread is not None and thread.is_alive():
                thread.join(timeout=1 if self._failed else 10)
        inner._mp_stop.set()
        for worker in inner._workers:
            worker.join(timeout=1)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass


def build_pipeline(
    source: BaseNode,
    make_batch: Callable[[Any], dict],
    batch_size: int | None,
    num_workers: int,
    prefetch_factor: int,
    pin_memory: bool,
    watchdog: Watchdog | None = None,
) -> Pipeline:
    """Start the graph of the module docstring over ``source``.

    Args:
        source: a node of per-sample tasks, ``batch_size`` per step (or, with ``batch_size``
            None, of whole steps: no ``Batcher``).
        make_batch: the step's tasks (or step) -> the batch (runs in the workers; picklable).
        num_workers: process workers; 0 runs everything in the calling thread when it asks.
        prefetch_factor: batches the fetch thread keeps ready (workers only).
        pin_memory: pin batches in a thread (only where CUDA is available).
        watchdog: bounds each wait for a batch (default: 600 s, no stop check).
    """
    node: BaseNode = source
    if batch_size is not None:
        node = Batcher(source, batch_size=batch_size, drop_last=True)
    mapper = ParallelMapper(
        node,
        WorkerFunction(make_batch),
        num_workers=num_workers,
        in_order=True,
        method="process",
    )
    node, threaded = mapper, []
    if pin_memory and torch.cuda.is_available():
        node = PinMemory(node, pin_memory_device="cuda")
        threaded.append(node)
    return Pipeline(node, mapper, threaded, watchdog or Watchdog(600.0), prefetch_factor)
