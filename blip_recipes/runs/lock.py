"""One run per output folder: a lock file that rank 0 holds for the whole run.

Two runs writing into one ``job.output_dir`` (a requeued job while the old one still runs,
workers orphaned by a ``kill -9`` of the launcher, a command pasted twice) interleave their
metrics and delete each other's checkpoints. :class:`RunLock` prevents that:

- ``<output_dir>/.run.lock`` is opened and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``. The
  kernel drops the lock when the holding process dies, however it dies (``kill -9``, OOM killer,
  node reboot for a local disk), so a lock can never outlive its run.
- The file's content is JSON (``host``, ``pid``, ``started`` as ISO time, ``job_id`` from
  ``SLURM_JOB_ID`` when set, ``argv``): only for the messages, never used to decide.
- A second run fails to take the lock and raises :class:`RunLockedError` naming the holder,
  before it writes anything into the folder.
- A lock file whose process is gone (flock free) is stale: it is taken over, with a warning
  naming the dead holder. A job requeued after a preemption therefore starts normally.
- :meth:`RunLock.release` removes the file, then unlocks. A process that opened the old file
  just before the removal notices (the path no longer names the file it locked) and retries.

``flock`` works on local disks, on NFS (Linux emulates it with POSIX byte-range locks) and on
Lustre mounted with ``-o flock``. Where the file system refuses locks, the run goes on with a
warning (refusing only when the recorded holder is a live process on this host).

:func:`acquire_run_lock` is the recipe's entry point: rank 0 takes the lock and the outcome is
broadcast, so that every rank stops together when rank 0 refuses.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger("blip_recipes.runs.lock")

LOCK_FILE = ".run.lock"
"""Name of the lock file inside the output folder."""

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockedError(RuntimeError):
    """Another live run holds the output folder. ``holder`` is its lock record (may be empty)."""

    def __init__(self, message: str, holder: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _record() -> dict[str, Any]:
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        record["job_id"] = job
    record["argv"] = list(sys.argv)
    return record


def _read_record(fd: int) -> Optional[dict[str, Any]]:
    """The JSON content of the open lock file; None when empty or unreadable."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, max(size, 1), 0) if size else b""
        value = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(started: str) -> str:
    try:
        then = _dt.datetime.fromisoformat(started)
        seconds = int((_dt.datetime.now().astimezone() - then).total_seconds())
    except (TypeError, ValueError):
        return ""
    h, rem = divmod(max(seconds, 0), 3600)
    m, s = divmod(rem, 60)
    return f", {h}h{m:02d}m ago" if h else f", {m}m{s:02d}s ago"


def describe_holder(holder: Optional[dict[str, Any]]) -> str:
    """``pid 123 on host gpu7 (job 4711) since 2025-01-01T10:00:00+00:00, 5m00s ago``."""
    if not holder:
        return "another process (it has not written its details yet)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("job_id"):
        text += f" (job {holder['job_id']})"
    started = holder.get("started")
    if started:
        text += f" since {started}{_age(started)}"
    return text


class RunLock:
    """The lock of one output folder; take it with :meth:`acquire`, give it back with
    :meth:`release` (also a context manager).

    Attributes:
        path: the lock file.
        record: what this process wrote into it.
        stale: the record of a dead holder that was taken over (None when there was none).
    """

    def __init__(self, path: Path, fd: Optional[int], record: dict[str, Any]) -> None:
        self.path = path
        self._fd = fd
        self.record = record
        self.stale: Optional[dict[str, Any]] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, output_dir: Union[str, Path], attempts: int = 20) -> RunLock:
        """Create ``output_dir`` if needed and lock it for this process.

        Raises:
            RunLockedError: a live process holds the lock (the message names it).
        """
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        for _ in range(attempts):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _wait_for_record(fd)
                os.close(fd)
                raise RunLockedError(_held_message(folder, path, holder), holder) from None
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                return cls._without_flock(path, fd, e)
            if not _same_file(path, fd):  # released (removed) between our open and flock
                os.close(fd)
                continue
            return cls._take(path, fd)
        raise RunLockedError(
            f"could not take {path}: it was removed and recreated {attempts} times in a row "
            "(another run is starting in the same job.output_dir)"
        )

    @classmethod
    def _take(cls, path: Path, fd: int) -> RunLock:
        previous = _read_record(fd)
        record = _record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        lock = cls(path, fd, record)
        if previous is not None:
            lock.stale = previous
            logger.warning(
                "taking over the stale lock %s of a run that is gone (%s)",
                path,
                describe_holder(previous),
            )
        return lock

    @classmethod
    def _without_flock(cls, path: Path, fd: int, error: OSError) -> RunLock:
        """File systems without flock: refuse only a live holder on this host, else warn."""
        previous = _read_record(fd)
        if (
            previous
            and previous.get("host") == socket.gethostname()
            and isinstance(previous.get("pid"), int)
            and previous["pid"] != os.getpid()
            and _pid_alive(previous["pid"])
        ):
            os.close(fd)
            raise RunLockedError(_held_message(path.parent, path, previous), previous)
        logger.warning(
            "the file system of %s does not support flock (%s): another run in the same folder "
            "on another host cannot be detected",
            path,
            error,
        )
        lock = cls._take(path, fd)
        return lock

    def problem(self) -> Optional[str]:
        """Why this lock no longer guards its folder, or None while it does: the output folder
        or the lock file was removed (or moved), or the path now names another run's lock.
        The recipe asks at every log and save step and stops the run if there is one."""
        if self._fd is None or _same_file(self.path, self._fd):
            return None
        folder = self.path.parent
        if not folder.is_dir():
            return (
                f"job.output_dir {folder} was removed or moved during the run (metrics.jsonl, "
                "logs, run_info.json and checkpoints written there are gone)"
            )
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return (
                f"the run lock {self.path} was removed during the run (another run could start "
                "in the same folder and mix its metrics and checkpoints with this one's)"
            )
        try:
            holder = _read_record(fd)
        finally:
            os.close(fd)
        return (
            f"the run lock {self.path} now belongs to another run ({describe_holder(holder)}); "
            "two runs in one folder would mix their metrics and checkpoints"
        )

    def release(self) -> None:
        """Remove the lock file and unlock (safe to call twice)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(self.path, fd):
                os.unlink(self.path)
        except OSError as e:
            logger.warning("could not remove %s: %s", self.path, e)
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # the kernel would release it anyway; close the descriptor
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _wait_for_record(fd: int, timeout: float = 1.0) -> Optional[dict[str, Any]]:
    """The holder's record; it may be a moment away when the holder has only just locked."""
    deadline = time.monotonic() + timeout
    while True:
        record = _read_record(fd)
        if record is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def _held_message(folder: Path, path: Path, holder: Optional[dict[str, Any]]) -> str:
    text = f"job.output_dir {folder} is in use by another run: {describe_holder(holder)}"
    if holder and holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            text += f" (pid {pid} has exited; processes it started still hold the lock)"
    return (
        f"{text}. Lock file: {path}. Two runs in one folder would mix their metrics and "
        "checkpoints: wait for that run to end, stop it, or choose another job.output_dir."
    )


def acquire_run_lock(output_dir: Union[str, Path], rank: int, world_size: int) -> Optional[RunLock]:
    """Rank 0 locks ``output_dir``; every rank learns the outcome before going on.

    Call it right after the process group is initialised and before anything is written.
    Rank 0's success or failure is broadcast (a CPU tensor, so it works on gloo and on
    ``cpu:gloo,cuda:nccl``), so no rank is left waiting in a later collective.

    Returns:
        The lock on rank 0 (release it in the recipe's cleanup), None on the other ranks.

    Raises:
        RunLockedError: on every rank when rank 0 could not take the lock (rank 0's message
            names the holder; the others point to rank 0). Any other error of rank 0 is
            re-raised there after the broadcast.
    """
    lock: Optional[RunLock] = None
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            lock = RunLock.acquire(output_dir)
        except Exception as e:  # broadcast first, so other ranks do not hang
            error = e
    if world_size > 1:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
            dist.broadcast(flag, src=0)
            if rank != 0 and int(flag.item()):
                raise RunLockedError(
                    f"rank 0 could not lock job.output_dir {output_dir} (its error names the "
                    "run that holds it); stopping with it"
                )
    if error is not None:
        raise error
    return lock


__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "acquire_run_lock", "describe_holder"]
