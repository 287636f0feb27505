"""Stop signals in `blip run` itself: forwarded to every rank while torchrun runs them
(`StopForwarder`), recorded while `blip run` is still starting (`install_early_stop_handlers`),
and kept for a rank that is still starting (`ranks_start_with_stop_signals_blocked`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence

from blip_recipes.runs.stop import STOP_REQUEST_ENV, STOP_SIGNALS


def child_process_groups() -> list[int]:
    """Children of this process that lead their own process group (Linux ``/proc``).

    torchrun starts every rank with ``start_new_session=True``, so a signal to the launcher's
    process group does not reach the ranks; signalling each rank's group also reaches its loader
    workers (as torchrun itself does), which ignore stop signals.
    """
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[1]) == me and int(fields[2]) == int(entry):
            found.append(int(entry))
    return found


class StopForwarder:
    """Stop signals in `blip run`'s launcher (the torchrun agent's process), while it runs.

    The first one is sent on to every rank (their process groups), which save a checkpoint at
    their next stop check and exit 0; the agent keeps monitoring them as usual and returns
    normally once all have exited 0, so `blip run` exits 0. It also sets ``STOP_REQUEST_ENV``,
    so that a worker group torchrun restarts after this point stops at its first check.

    Later SIGTERM/SIGUSR1 are ignored: under Slurm one stop often arrives twice (slurmstepd
    signals every process of the step and srun forwards the signal it got as well), which must
    not cut the save short. A later SIGINT (a second Ctrl-C) raises torchrun's
    ``SignalException``: the agent sends SIGINT to the ranks and SIGKILLs them after
    ``--shutdown-timeout`` seconds (stop now, without the checkpoint).

    Every forwarded signal is preceded by SIGCONT, so that a stopped rank (SIGSTOP, a debugger,
    a suspended job) runs again and hears it. With ``stop_timeout_s`` (``job.stop_timeout_s``),
    ranks still running that long after the first stop signal are killed (SIGCONT, SIGKILL) with
    one line, and `blip run` exits 1: a stop always ends the job within a bound.
    """

    def __init__(
        self, signals: Sequence[signal.Signals] = STOP_SIGNALS, stop_timeout_s: float | None = None
    ) -> None:
        self.signals = tuple(signals)
        self.stop_timeout_s = stop_timeout_s
        self.received: signal.Signals | None = None
        self.killed = False
        self._previous: dict[signal.Signals, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopForwarder:
        if threading.current_thread() is threading.main_thread():  # else signal.signal raises
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        os.environ.pop(STOP_REQUEST_ENV, None)

    def _handle(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            if sig != signal.SIGINT:
                return
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException(f"Process {os.getpid()} got signal: {sig} again", sigval=sig)
        self.received = sig
        os.environ[STOP_REQUEST_ENV] = str(int(sig))
        try:
            os.write(  # not print(): a handler may interrupt a write to sys.stderr
                2,
                f"blip run: {sig.name}: every rank saves a checkpoint at its next stop check and "
                f"exits (a second Ctrl-C stops them now, without it)\n".encode(),
            )
        except OSError:  # a dead console (the `| tee` that got the same Ctrl-C) stops nothing
            pass
        signal_groups(child_process_groups(), (signal.SIGCONT, sig))
        if self.stop_timeout_s is not None:
            self._timer = threading.Timer(self.stop_timeout_s, self._kill_ranks)
            self._timer.daemon = True
            self._timer.start()

    def _kill_ranks(self) -> None:
        """The stop timeout ran out: kill every rank still running (their groups)."""
        groups = child_process_groups()
        if not groups:
            return
        self.killed = True
        name = self.received.name if self.received is not None else "the stop signal"
        try:
            os.write(
                2,
                f"blip run: {len(groups)} rank(s) still running {self.stop_timeout_s:g} s after "
                f"{name} (job.stop_timeout_s); killing them (SIGKILL) without their checkpoint\n"
                .encode(),
            )  # fmt: skip
        except OSError:
            pass
        signal_groups(groups, (signal.SIGCONT, signal.SIGKILL))


def signal_groups(groups: Sequence[int], signals: Sequence[signal.Signals]) -> None:
    """Send each of ``signals``, in order, to each process group (gone ones are skipped)."""
    for pgid in groups:
        for sig in signals:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass


early_stop: list[signal.Signals] = []


def _record_early_stop(signum: int, _frame: object) -> None:
    """A stop signal while `blip run` itself starts (imports, config checks), before the ranks or
    the in-process recipe have handlers: remembered, never fatal."""
    if not early_stop:
        early_stop.append(signal.Signals(signum))
        os.environ[STOP_REQUEST_ENV] = str(int(signum))  # an in-process recipe reads it


def install_early_stop_handlers() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record_early_stop)


@contextlib.contextmanager
def ranks_start_with_stop_signals_blocked() -> Iterator[None]:
    """Every rank torchrun starts inside begins with the stop signals blocked.

    A stop forwarded to a rank that was just started, before its interpreter has run the first
    lines of ``rank_entry.py``, would kill it (the default action of SIGTERM and SIGUSR1), and
    the job would exit 1. A blocked signal instead waits, across ``exec``, until
    ``rank_entry.py`` has installed its handlers and unblocks it; none is lost. The signal mask
    is the spawning thread's, so it is set around torchrun's ``Popen`` of each rank only (the
    launcher itself keeps receiving stop signals).
    """
    from torch.distributed.elastic.multiprocessing.subprocess_handler import (
        subprocess_handler,
    )

    handler = subprocess_handler.SubprocessHandler
    original = handler._popen

    def popen_blocked(self, args, env):  # type: ignore[no-untyped-def]
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return original(self, args, env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    handler._popen = popen_blocked  # type: ignore[method-assign]
    try:
        yield
    finally:
        handler._popen = original  # type: ignore[method-assign]
