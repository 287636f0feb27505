"""The bound on a rank's wait for its next batch: dead workers, stalls and stop requests.

Batches are fetched in a thread (:class:`WatchedFetch`), never in the rank's own thread, so
that its wait is a wait on a queue that can always be given up: with worker processes the
thread receives their batches (receiving one can itself block: a batch's shared memory is
fetched from the worker that made it, and a stopped worker never answers); with
``data.num_workers=0`` it makes each batch while the rank waits for it (a read of a hung file
system never returns). While it waits, the rank checks every :data:`POLL_S` seconds that

- every worker still runs: one that died (``kill -9``, the kernel's OOM killer, a crash) ends
  the run at once, naming the worker, its pid and its exit signal or code;
- a stop was not requested (SIGTERM, SIGINT, SIGUSR1 reach the rank's handler while it waits):
  a batch that comes within :data:`STOP_GRACE_S` seconds of the request is still delivered, so
  the run saves at its next stop check as usual; otherwise the run ends without a checkpoint;
- the wait is within ``data.timeout_s``: workers that are alive but deliver nothing (a hung
  file system, a stalled remote source, a worker stopped with SIGSTOP), or a read in the
  rank's own process that does not return, end the run after that long, naming the worker (its
  pid and state: stopped, blocked in the kernel, ...) or where the read is stuck.

Each ends with a :class:`LoaderError` whose message is one line, so the job exits non-zero and a
scheduler can requeue it. A thread stuck in a read cannot be ended; it is left behind (a
daemon) and the process exits without it, unless the read is stuck inside the kernel
(uninterruptible I/O on a hard-mounted file system), which no signal ends either.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("blip_recipes.data")

#: Seconds between the checks while a rank waits for a batch.
POLL_S = 0.5
#: ``data.timeout_s`` of the loaders that get no watchdog of their own (the evaluation loaders,
#: :func:`watched_batches`); every recipe sets it from its config (:func:`set_wait_timeout`).
_wait_timeout_s = 600.0
#: Seconds a rank still waits for a batch after a stop request (Slurm's default grace before
#: SIGKILL is 30 s).
STOP_GRACE_S = 30.0


class LoaderError(RuntimeError):
    """The loader cannot deliver batches; the message says what and where in one line."""


class Process(Protocol):
    pid: int | None

    @property
    def exitcode(self) -> int | None: ...


def describe_exit(exitcode: int) -> str:
    """How a process ended, in words: ``died with SIGKILL (out of memory? ...)``, ``exited with
    code 1``."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    if -exitcode == signal.SIGKILL:
        name += " (out of memory? the kernel's OOM killer sends SIGKILL; see dmesg)"
    return f"died with {name}"


_STATES = {
    "T": "stopped by a signal (SIGSTOP, SIGTSTP: it resumes only on SIGCONT)",
    "t": "stopped by a debugger",
    "D": "blocked in the kernel (uninterruptible I/O: a hung file system?)",
    "R": "running",
    "S": "sleeping",
    "Z": "exited",
}


def process_state(pid: int | None) -> str:
    """What process ``pid`` is doing, in words, from ``/proc/<pid>/stat`` ("" where unknown)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""
    return _STATES.get(state, f"state {state}")


def stuck_at(thread: threading.Thread | None) -> str:
    """Where ``thread`` is now: ``file.py:123 in function``, and the innermost frame of the
    caller's code it came from when that is another one (the first frame of this package, or
    outside Python's library and installed packages, that is not this module); "" when it is not
    running."""
    frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
    if frame is None:
        return ""
    libraries = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})

    def at(f: Any) -> str:
        return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} in {f.f_code.co_name}"

    def library(f: Any) -> bool:
        name = f.f_code.co_filename
        installed = name.startswith(libraries) and f"{os.sep}blip_recipes{os.sep}" not in name
        return installed or name == __file__ or name.startswith("<")

    ours = frame
    while ours is not None and library(ours):
        ours = ours.f_back
    if ours is None or ours is frame:
        return at(frame)
    return f"{at(frame)}, called from {at(ours)}"


class Watchdog:
    """The checks of the module docstring for one rank's loader.

    Args:
        timeout_s: the longest wait for one batch (``data.timeout_s``).
        stop_requested: called at every check; True once the run was asked to stop.
        rank: named in the messages.
    """

    def __init__(
        self, timeout_s: float, stop_requested: Callable[[], bool] | None = None, rank: int = 0
    ) -> None:
        self.timeout_s, self.stop_requested, self.rank = timeout_s, stop_requested, rank
        self.start()

    def start(self) -> None:
        """A new wait begins (call before waiting for each batch)."""
        self._since = time.monotonic()
        self._stop_seen: float | None = None

    def check(
        self,
        workers: Sequence[Process],
        awaited: int | None = None,
        fetching: threading.Thread | None = None,
    ) -> None:
        """Raise :class:`LoaderError` if a worker of ``workers`` (worker ``i`` at index ``i``)
        died, or the wait went on too long (see the module docstring).

        Args:
            workers: the loader's worker processes (none: batches are made in this process).
            awaited: the worker whose batch is next, when the loader knows it.
            fetching: the thread that makes or receives the batch (named when there are no
                workers: where it is stuck).
        """
        dead = [
            f"worker {i} (pid {w.pid}) {describe_exit(w.exitcode)}"
            for i, w in enumerate(workers)
            if w.exitcode is not None
        ]
        if dead:
            raise LoaderError(f"rank {self.rank}: data loader {'; '.join(dead)}")
        now = time.monotonic()
        waited = now - self._since
        if self._stop_seen is None and self.stop_requested is not None and self.stop_requested():
            self._stop_seen = now
            logger.warning(
                "rank %d: stop requested while waiting %.0f s for a batch from the data loader; "
                "waiting at most %.0f s more",
                self.rank,
                waited,
                min(STOP_GRACE_S, self.timeout_s - waited),
            )
        if self._stop_seen is not None and now - self._stop_seen >= STOP_GRACE_S:
            raise LoaderError(
                f"rank {self.rank}: stopped while waiting for a batch: no batch from the data "
                f"loader in {waited:.0f} s, {now - self._stop_seen:.0f} s after the stop "
                "request; exiting without a checkpoint (a resume starts from the newest one)"
            )
        if waited >= self.timeout_s:
            raise LoaderError(
                f"rank {self.rank}: no batch from the data loader in {waited:.0f} s "
                f"(data.timeout_s={self.timeout_s:g}): {self._stalled(workers, awaited, fetching)}"
            )

    @staticmethod
    def _stalled(workers: Sequence[Process], awaited: int | None,
                 fetching: threading.Thread | None) -> str:  # fmt: skip
        """What delivers nothing, in words."""
        states = [process_state(w.pid) for w in workers]
        stopped = any(state.startswith("stopped") for state in states)

        def worker(i: int) -> str:
            return f"worker {i} (pid {workers[i].pid}{', ' + states[i] if states[i] else ''})"

        hint = "" if stopped else " (a hung file system or remote source?)"
        if not workers:
            where = stuck_at(fetching)
            return (
                "data.num_workers=0 makes batches in the rank's own process, and its read has not "
                f"returned{' (at ' + where + ')' if where else ''}; a hung file system or remote "
                "source?"
            )
        if awaited is not None and 0 <= awaited < len(workers):
            return f"{worker(awaited)}, whose batch is next, is alive but delivers nothing{hint}"
        return (
            f"its {len(workers)} worker(s) are alive but deliver nothing: "
            f"{', '.join(worker(i) for i in range(len(workers)))}{hint}"
        )


class WatchedFetch:
    """Items of ``iterator`` fetched in a daemon thread; :meth:`get` waits for the next one
    with a check every :data:`POLL_S` seconds (see the module docstring).

    Args:
        iterator: what to fetch from (only this thread calls ``next`` on it).
        ahead: how many items the thread fetches before they are asked for; 0 fetches each item
            only while :meth:`get` waits for it, one at a time, as if the caller fetched it.
        name: the thread's name.
    """

    def __init__(self, iterator: Iterator, ahead: int, name: str = "batch-fetch") -> None:
        self._iterator = iterator
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._asked = threading.Semaphore(ahead)
        self._closing = threading.Event()
        self._final: tuple[str, Any] | None = None
        self.thread = threading.Thread(target=self._fetch, name=name, daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        while True:
            while not self._asked.acquire(timeout=POLL_S):
                if self._closing.is_set():
                    return
            if self._closing.is_set():
                return
            try:
                result: tuple[str, Any] = ("item", next(self._iterator))
            except StopIteration:
                result = ("end", None)
            except BaseException as e:  # raised in the caller's thread by get()
                result = ("error", e)
            self._results.put(result)
            if result[0] != "item":
                return

    def get(self, check: Callable[[], None]) -> Any:
        """The next item. Raises what ``next(iterator)`` raised (``StopIteration`` at its end,
        again on every later call), or what ``check`` (called every :data:`POLL_S` seconds of
        the wait) raises."""
        if self._final is None:
            self._asked.release()
            while True:
                try:
                    kind, item = self._results.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    check()
            if kind == "item":
                return item
            self._final = (kind, item)
        kind, item = self._final
        if kind == "end":
            raise StopIteration
        raise item

    def close(self, timeout: float = 0) -> None:
        """Stop fetching: a thread waiting to be asked ends at once, one inside ``next`` when
        that returns; wait up to ``timeout`` seconds for it (one stuck in a read is left behind:
        it is a daemon)."""
        self._closing.set()
        self._asked.release()  # wake it
        if timeout > 0 and self.thread is not threading.current_thread():
            self.thread.join(timeout)


def set_wait_timeout(timeout_s: float) -> None:
    """``data.timeout_s`` for :func:`watched_batches` without a timeout of its own."""
    global _wait_timeout_s
    _wait_timeout_s = timeout_s


def dataloader_workers(iterator: Any) -> list:
    """The worker processes of a ``DataLoader`` iterator (none without workers)."""
    return list(getattr(iterator, "_workers", []))


def dataloader_awaited_worker(iterator: Any) -> int | None:
    """The worker whose batch a ``DataLoader`` iterator hands out next (it hands them out
    round-robin, in order), None when unknown or already received."""
    info = getattr(iterator, "_task_info", {}).get(getattr(iterator, "_rcvd_idx", None))
    return info[0] if info is not None and len(info) == 1 else None


def release_dataloader_workers(iterator: Any) -> None:
    """Leave a dead ``DataLoader`` worker to the watchdog: torch's SIGCHLD handler would raise
    wherever the rank is (mid-step, mid-save, or while it kills stuck workers itself)."""
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        _remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


def watched_batches(loader: Iterable, timeout_s: float | None = None) -> Iterator:
    """The batches of ``loader`` (a ``DataLoader``), each wait for one bounded as the training
    loader's are (see the module docstring; no stop check: the evaluation loaders are not part
    of the stop protocol): a dead worker ends it at once, no batch within ``timeout_s``
    (default: :func:`set_wait_timeout`'s, ``data.timeout_s``) ends it naming the worker whose
    batch is next, or where the read is stuck; then every worker gets SIGKILL.

    Raises:
        LoaderError: as above, in one line.
    """
    iterator = iter(loader)
    release_dataloader_workers(iterator)
    workers = dataloader_workers(iterator)
    fetch = WatchedFetch(iterator, 1 if workers else 0, name="eval-batches")
    watchdog = Watchdog(timeout_s if timeout_s is not None else _wait_timeout_s)

    def check() -> None:
        try:
            watchdog.check(workers, dataloader_awaited_worker(iterator), fetch.thread)
        except LoaderError:
            for worker in workers:  # stopped ones too; the fetch thread then sees them gone
                if worker.is_alive():
                    worker.kill()
            raise

    try:
        while True:
            watchdog.start()
            try:
                item = fetch.get(check)
            except StopIteration:
                return
            yield item
    finally:
        fetch.close()
