"""Consecutive skipped steps (non-finite loss or gradient norm), and the stop at their limit.

The optimizer step skips its update when any rank's loss or gradient norm is NaN/Inf (one flag
agreed by every rank). :class:`NonFiniteRun` counts the skipped steps in a row on the device and
ends the run with :class:`NonFiniteLossError` at ``training.max_nonfinite_steps``, checked every
step without making the host wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blip_recipes.runs.errors import RunStoppedError


class NonFiniteLossError(RunStoppedError):
    """Too many consecutive steps produced a non-finite loss."""


class NonFiniteRun:
    """Consecutive skipped steps (``ok`` False), counted on the device and checked every step
    without waiting for the device.

    On CPU the count is read directly (no device to wait for). On CUDA each step's count is
    copied into pinned host memory without blocking and read once the device has finished that
    step (a CUDA event, polled): the run stops at the limit as soon as the device gets there,
    typically a step or two after the host queued it, and the host never waits. Log steps read
    it exactly (they synchronise anyway).
    """

    def __init__(self, device: torch.device, limit: int) -> None:
        self.limit = limit
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self._cuda = device.type == "cuda"
        self._host = torch.zeros((), dtype=torch.long, pin_memory=self._cuda)
        self._event: Any = None

    def update(self, ok: torch.Tensor) -> None:
        """Add one step: ``ok`` is the step's 0-d bool flag agreed by every rank."""
        self.count = (self.count + 1) * (~ok)
        if self._cuda and self._event is None:  # else the previous copy is still on its way
            self._host.copy_(self.count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def reached(self, exact: bool = False) -> int | None:
        """The count when it reached the limit, else None. ``exact``: read the current count
        (a device sync on CUDA; free at log steps)."""
        if not self._cuda or exact:
            count = int(self.count)
        elif self._event is not None and self._event.query():
            count, self._event = int(self._host), None
        else:
            return None
        return count if count >= self.limit else None

    def check(self, step: int, newest_checkpoint: Callable[[], Path | None], exact: bool) -> None:
        """After step ``step``: stop the run when the limit was reached.

        Raises:
            NonFiniteLossError: naming the count, the limit, the step and
                ``newest_checkpoint()`` (what a resume would start from).
        """
        bad_run = self.reached(exact=exact)
        if bad_run is not None:
            raise NonFiniteLossError(
                f"{bad_run} consecutive steps had a non-finite loss or gradient norm (limit "
                f"training.max_nonfinite_steps={self.limit}), up to step {step}; each skipped "
                f"its update. Newest checkpoint: {newest_checkpoint()}"
            )
