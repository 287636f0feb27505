"""Best-effort console: a closed stdout or stderr never stops a run.

A run's console is often a pipe (``blip run ... 2>&1 | tee log``) or a terminal that can go away.
When its reader dies (Ctrl-C reaches ``tee`` too, an ssh session drops), every later write raises
``BrokenPipeError`` (or ``OSError`` EIO for a hung-up terminal, ``ValueError`` for a closed file).
Training, the stop-and-save protocol, the logs and the checkpoints must not depend on that.

:func:`guard_console` wraps ``sys.stdout`` and ``sys.stderr`` in :class:`BestEffortStream`: on the
first failed write or flush the stream stops writing, its file descriptor is pointed at
``os.devnull`` (so Python's flush at exit, and any other writer of that descriptor, succeeds
instead of turning exit 0 into 120 or 1, as the Python docs recommend for ``BrokenPipeError``),
and one warning goes to the log, which still reaches ``logs/rank<r>.log``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

logger = logging.getLogger(__name__)

#: What a dead console raises: EPIPE (reader gone), EIO (terminal hung up), a closed file.
CONSOLE_ERRORS = (OSError, ValueError)


class BestEffortStream:
    """A text stream whose writes and flushes never raise; after the first failure it drops
    everything (see the module docstring). Other attributes are the wrapped stream's."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self._name = name
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self._stream.write(text)
            except CONSOLE_ERRORS as e:
                self._fail(e)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except CONSOLE_ERRORS as e:
                self._fail(e)

    def _fail(self, error: BaseException) -> None:
        self.failed = True  # first: the warning below may come back through this stream
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
            self._stream.flush()  # what was buffered now goes to devnull
        except CONSOLE_ERRORS:
            pass  # no descriptor (an in-memory stream): dropping writes is enough
        logger.warning(
            "console: %s is closed (%s: %s); console output stops here, the log files, metrics "
            "and checkpoints continue",
            self._name, type(error).__name__, error,
        )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_console() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` best-effort (idempotent). Call it before logging
    handlers are made: a ``StreamHandler`` keeps the stream it was given."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, BestEffortStream):
            setattr(sys, name, BestEffortStream(stream, name))
