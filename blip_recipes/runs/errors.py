"""How every recipe ends on an error: one line on the console, the traceback in the rank log.

A recipe's ``main`` wraps its work in :func:`exit_status_for_error`, which turns an exception
into the process's exit status and the message a user reads:

- user errors (exit 2): a setting, file or folder that is wrong (``ConfigError``, a missing or
  existing file, a folder in use, no permission);
- runtime failures (exit 1): everything else, including a peer rank that stopped answering
  (``job.collective_timeout_s``) and a run folder that was removed or taken over.

The message is one line, ``<recipe>: <what>``; the full traceback goes only to the handlers
that write files (``<output_dir>/logs/rank<r>.log``), or to stderr when none is attached yet
(a failure before the output folder is known, a recipe that keeps no rank log), except for a
peer that stopped answering or left: where this rank waited adds nothing to that line, and the
peer's own line says what happened.
"""

from __future__ import annotations

import logging
import sys
import traceback

from blip_recipes.config import ConfigError

#: Exceptions that are the user's to fix: exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class RunStoppedError(RuntimeError):
    """A runtime condition that ends the run with exit 1 and a message that says it all (no
    exception type in front)."""


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_traceback(error: BaseException, name: str) -> None:
    """The traceback of ``error`` into the rank log file (stderr when there is none)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    handlers = _file_handlers()
    if not handlers:
        sys.stderr.write(text)
        return
    record = logging.LogRecord(name, logging.ERROR, __file__, 0, "%s", (text,), None)
    for handler in handlers:
        handler.handle(record)


def one_line(error: BaseException) -> str:
    """The exception as one line: its message (first line), prefixed by its type unless it is
    one of ours whose message stands alone."""
    from blip_recipes.parallel.distributed import (
        describe_collective_timeout,
        is_collective_timeout,
    )

    if is_collective_timeout(error):
        return describe_collective_timeout(error)
    lines = str(error).strip().splitlines()
    text = " / ".join(line.strip() for line in lines if line.strip())[:2000]
    if isinstance(error, (RunStoppedError, ConfigError)):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def exit_status_for_error(error: BaseException, prog: str, logger: logging.Logger) -> int:
    """Report ``error`` in one line (``prog: ...``), its traceback to the rank log; return the
    exit status (2 for :data:`USER_ERRORS`, else 1)."""
    from blip_recipes.parallel.distributed import is_collective_timeout

    status = 2 if isinstance(error, USER_ERRORS) else 1
    if _file_handlers() or not is_collective_timeout(error):
        log_traceback(error, logger.name)
    logger.error("%s: %s", prog, one_line(error))
    return status


__all__ = ["USER_ERRORS", "RunStoppedError", "exit_status_for_error", "log_traceback", "one_line"]
