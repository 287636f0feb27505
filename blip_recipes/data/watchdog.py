"""The bound on a rank's wait for its next batch: dead workers, stalls and stop requests.

A rank that waits for a batch from its loader worker processes checks, every :data:`POLL_S`
seconds, that

- every worker still runs: one that died (``kill -9``, the kernel's OOM killer, a crash) ends
  the run at once, naming the worker, its pid and its exit signal or code;
- a stop was not requested (SIGTERM, SIGINT, SIGUSR1 reach the rank's handler while it waits):
  a batch that comes within :data:`STOP_GRACE_S` seconds of the request is still delivered, so
  the run saves at its next stop check as usual; otherwise the run ends without a checkpoint;
- the wait is within ``data.timeout_s``: workers that are alive but deliver nothing (a hung
  file system, a stalled remote source) end the run after that long.

Each ends with a :class:`LoaderError` whose message is one line, so the job exits non-zero and a
scheduler can requeue it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

logger = logging.getLogger("blip_recipes.data")

#: Seconds between the checks while a rank waits for a batch.
POLL_S = 0.5
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

    def check(self, workers: Sequence[Process]) -> None:
        """Raise :class:`LoaderError` if a worker of ``workers`` (worker ``i`` at index ``i``)
        died, or the wait went on too long (see the module docstring)."""
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
            pids = ", ".join(str(w.pid) for w in workers)
            raise LoaderError(
                f"rank {self.rank}: no batch from the data loader in {waited:.0f} s "
                f"(data.timeout_s={self.timeout_s:g}); its {len(workers)} worker(s) (pid {pids}) "
                "are alive but deliver nothing (a hung file system or remote source?)"
            )
