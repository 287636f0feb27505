"""What a failed save raises: non-finite weights refused before writing, and an OSError while
writing (a full disk, a quota, torch's writer coming up short) turned into one clear message
naming the free space and the previous intact checkpoint, after the partial folder is removed.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

from blip_recipes.checkpoint.coordination import rank
from blip_recipes.checkpoint.integrity import _human, step_dirs
from blip_recipes.checkpoint.loading import is_complete


class NonFiniteCheckpointError(RuntimeError):
    """The weights to be saved hold a NaN or Inf on some rank; nothing was written."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed with an OSError (e.g. a full disk); ``errno`` is kept.

    The partial folder is removed and earlier checkpoints are untouched.
    """

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


_TORCH_WRITER_FAILED = ("inline_container.cc", "PytorchStreamWriter failed")
_NEARLY_FULL = 64 << 10


def find_oserror(e: BaseException, folder: Optional[Path] = None) -> Optional[OSError]:
    """The OSError behind an exception: itself, one of a CheckpointException's per-rank
    failures, or a cause/context. Torch's writer failing counts as ENOSPC when it reports a
    short write or ``folder``'s file system has less than 64 KiB left, else as EIO."""
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        if isinstance(x, RuntimeError) and any(m in str(x) for m in _TORCH_WRITER_FAILED):
            try:  # another rank may have removed the partial folder already: a short write
                full = "unexpected pos" in str(x) or (  # ("unexpected pos") says it too
                    folder is not None and shutil.disk_usage(folder).free < _NEARLY_FULL
                )
            except OSError:
                full = False
            detail = str(x).strip().splitlines()[0]
            return OSError(errno.ENOSPC if full else errno.EIO, f"torch's writer failed: {detail}")
        if isinstance(x, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure
                     for _, failure in sorted(x.failures.items())]  # fmt: skip
        todo += [x.__cause__, x.__context__]
    return None


def raise_write_error(step: int, path: Path, folder: Path, e: BaseException) -> None:
    """Turn an OSError (possibly inside DCP's CheckpointException) while writing ``path`` (a
    step of ``folder``) into one clear :class:`CheckpointWriteError`; remove the partial folder
    (rank 0). Anything else is re-raised as it is."""
    oserror = find_oserror(e, folder)
    if oserror is None:
        raise e
    try:  # before the partial folder goes: what the save ran into
        free = _human(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown space"
    if rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    previous = [p for _, p in step_dirs(folder) if is_complete(p) and p != path]
    code = oserror.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        head = f"{what} while writing checkpoint step-{step} to {path}: {free} free"
    else:
        head = f"could not write checkpoint step-{step} to {path}: {oserror}"
    tail = (
        f"the previous checkpoint {previous[-1]} is intact"
        if previous
        else "there is no previous checkpoint"
    )
    message = f"{head}; {tail} (the partial step-{step} was removed)"
    raise CheckpointWriteError(message, code) from e  # the caller says it, once


__all__ = ["CheckpointWriteError", "NonFiniteCheckpointError", "find_oserror", "raise_write_error"]
