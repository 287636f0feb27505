"""The stop protocol of a training rank: stop signals recorded, agreed by every rank, put in words.

A stop is asked for by SIGTERM (Slurm's preemption and time limit, ``kill``), SIGINT (Ctrl-C) or
SIGUSR1 (Slurm's early warning, ``--signal=USR1@120``), by ``blip run``'s launcher before this
rank started (``STOP_REQUEST_ENV``), or by the launcher's death (this rank's parent is gone).
:class:`StopRequests` records them from the first moment of set-up; the training loop asks
:meth:`StopRequests.agreed` every ``checkpoint.signal_check_every`` steps, and every rank sees the
same answer (a CPU MAX all-reduce), saves a checkpoint and ends together::

    stop = StopRequests.install()           # first thing in setup
    ...                                      # init_distributed
    stop.refuse_start_if_requested(dist)    # nothing was saved yet: exit 0, nothing to save
    while step < total_steps:
        if step % every == 0 and stop.agreed(dist):
            break                            # then save
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

#: Signals that ask a run to save a checkpoint at the next stop check and exit 0. The rank handles
#: them; its loader workers ignore them; ``blip run``'s launcher forwards them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

#: Set in the launcher's environment once it was asked to stop: ranks it starts after that (a
#: restarted worker group) inherit it and stop at their first check instead of training on.
STOP_REQUEST_ENV = "BLIP_STOP_REQUESTED"

ANOTHER_RANK = -1
"""`StopRequests.signal` of a rank that heard of the stop only through the agreement."""


class StoppedBeforeStartError(Exception):
    """A stop signal arrived before training started: nothing to save, exit 0."""


class StopRequests:
    """This rank's stop request: the first stop signal it got (or inherited), or a lost launcher.

    Slurm signals every process of the job, torchrun each rank's process group, ``blip run``'s
    launcher forwards the first signal it gets: a rank usually hears of a stop once or twice, and
    its loader workers ignore all three. A second SIGINT on this rank raises KeyboardInterrupt
    (stop now, without the checkpoint). Under a launcher (``RANK`` and ``WORLD_SIZE`` in the
    environment) the parent process is remembered: if it is gone at a stop check (the launcher
    was SIGKILLed, so nothing will forward a signal or reap this rank), that counts as a stop
    request too (SIGHUP).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        """The signal number of the stop, `ANOTHER_RANK`, or None while none was asked for."""
        self.launcher_pid: int | None = None
        self._received: list[int] = []

    @classmethod
    def install(cls) -> StopRequests:
        """Handle the stop signals in this process from now on (call it first in set-up)."""
        stop = cls()

        def request_stop(signum: int, _frame: Any) -> None:
            if stop._received and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop._received.append(signum)
            if stop.signal is None:
                stop.signal = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        inherited = os.environ.get(STOP_REQUEST_ENV, "")
        if inherited.isdigit() and stop.signal is None:
            stop.signal = int(inherited)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            stop.launcher_pid = os.getppid()
        return stop

    def requested(self) -> bool:
        """True once this rank knows of a stop (no collective: a stuck wait may ask it)."""
        return self.signal is not None

    def launcher_gone(self) -> bool:
        """True when this rank's launcher (its parent at start-up) is no longer its parent."""
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def agreed(self, dist_state: Any) -> bool:
        """True on every rank once any rank got a stop signal or lost its launcher: a CPU MAX
        all-reduce over ``dist_state.dp_group`` (no GPU sync). Collective: every rank calls it
        at the same steps."""
        if self.signal is None and self.launcher_gone():
            self.signal = int(signal.SIGHUP)  # the launcher hung up
        flag = torch.tensor([1 if self.signal is not None else 0])
        if dist_state.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dist_state.dp_group)
        if flag.item() and self.signal is None:
            self.signal = ANOTHER_RANK
        return bool(flag.item())

    def refuse_start_if_requested(self, dist_state: Any) -> None:
        """End set-up without saving when a stop came before training started (every rank
        agrees, so none is left waiting for the others).

        Raises:
            StoppedBeforeStartError: naming the stop; the recipe's ``main`` exits 0.
        """
        if self.agreed(dist_state):
            raise StoppedBeforeStartError(
                f"{self.reason()}: stopped before training started, nothing to save"
            )

    def reason(self) -> str:
        """Why the run stops, in words (logs and the end-of-run summary)."""
        if self.signal == ANOTHER_RANK:
            return "stop requested on another rank"
        if self.signal == signal.SIGHUP and self.launcher_gone():
            return f"launcher (pid {self.launcher_pid}) is gone"
        try:
            return signal.Signals(self.signal).name  # type: ignore[arg-type]
        except ValueError:
            return f"signal {self.signal}"
