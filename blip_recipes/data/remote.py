"""Remote shard URLs: ``s3://``, ``gs://``, ``http(s)://`` through fsspec, and ``pipe:CMD``.

A shard is read as a forward stream from a byte offset (the resume position), never downloaded
whole: fsspec files read in blocks (ranged requests), and ``pipe:CMD`` reads the standard output
of ``CMD`` (run by the shell; bytes before the offset are skipped). A failed read is retried a few
times with exponential backoff, reopening at the byte it stopped at; a missing object, or a read
that still fails, raises :class:`RemoteShardError` naming the URL. fsspec and its protocol
backends (s3fs, gcsfs, aiohttp) are the ``remote`` extra: ``pip install 'blip-recipes[remote]'``.
"""

from __future__ import annotations

import io
import logging
import subprocess
import time
from collections.abc import Callable

logger = logging.getLogger("blip_recipes.data")

ATTEMPTS = 4
BACKOFF_S = 0.5
_CHUNK = 1 << 20


class RemoteShardError(RuntimeError):
    """A remote shard (or size file) cannot be read; the message names its URL."""


def is_remote(url: str) -> bool:
    """Whether ``url`` is a ``pipe:`` command or a ``scheme://`` URL other than ``file://``."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def local_path(url: str) -> str:
    """A local path with any ``file://`` prefix removed."""
    return url[len("file://") :] if url.startswith("file://") else url


def _fsspec(url: str):
    try:
        import fsspec
    except ImportError as e:
        raise RemoteShardError(
            f"cannot read {url}: remote shards need fsspec and its protocol backend "
            "(pip install 'blip-recipes[remote]', i.e. fsspec s3fs gcsfs aiohttp)"
        ) from e
    return fsspec


def _skip(f, n: int) -> None:
    while n > 0:
        got = f.read(min(n, _CHUNK))
        if not got:
            raise EOFError(f"stream ended {n} bytes before the resume offset")
        n -= len(got)


class _Pipe(io.RawIOBase):
    """Standard output of a shell command; a non-zero exit status is an error at end of data."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=_CHUNK
        )

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n if n is not None and n >= 0 else -1)
        if not data and n != 0:
            status = self.proc.wait()
            if status != 0:
                err = self.proc.stderr.read().decode("utf-8", "replace").strip()
                raise OSError(f"command exited with status {status}: {err[-500:]}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        super().close()


def _opener(url: str) -> Callable[[int], io.IOBase]:
    """A function opening ``url`` positioned at a byte offset."""
    if url.startswith("pipe:"):

        def open_pipe(pos: int):
            f = _Pipe(url[len("pipe:") :])
            try:
                _skip(f, pos)
            except BaseException:
                f.close()
                raise
            return f

        return open_pipe
    fsspec = _fsspec(url)

    def open_fsspec(pos: int):
        f = fsspec.open(url, "rb").open()
        try:
            if pos:
                if f.seekable():
                    f.seek(pos)
                else:
                    _skip(f, pos)
        except BaseException:
            f.close()
            raise
        return f

    return open_fsspec


def _fatal(e: BaseException) -> bool:
    return isinstance(e, (FileNotFoundError, PermissionError, RemoteShardError))


class RetryingReader(io.RawIOBase):
    """A forward-only binary stream of ``url`` from ``offset`` that reopens at the current byte
    after a failed read (``attempts`` tries in all, sleeping ``backoff * 2**k`` in between)."""

    def __init__(self, url: str, offset: int = 0, attempts: int = ATTEMPTS, backoff=BACKOFF_S):
        self.url, self.pos = url, offset
        self.attempts, self.backoff = max(1, attempts), backoff
        self._open = _opener(url)
        self._f = None
        self._retry(lambda: None)

    def _retry(self, op):
        for k in range(self.attempts):
            try:
                if self._f is None:
                    self._f = self._open(self.pos)
                return op()
            except Exception as e:  # noqa: BLE001 - any transport error is retried
                self._drop()
                if _fatal(e):
                    raise RemoteShardError(f"cannot read shard {self.url}: {e!r}") from e
                if k + 1 == self.attempts:
                    raise RemoteShardError(
                        f"cannot read shard {self.url} at byte {self.pos} after "
                        f"{self.attempts} attempts: {e!r}"
                    ) from e
                delay = self.backoff * 2**k
                logger.warning("reading %s failed (%r); retrying in %.1fs", self.url, e, delay)
                time.sleep(delay)

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass
            self._f = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        data = self._retry(lambda: self._f.read(n))
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, offset: int = 0, attempts: int = ATTEMPTS) -> RetryingReader:
    """Open a remote shard (see :func:`is_remote`) as a forward stream from byte ``offset``."""
    return RetryingReader(url, offset, attempts)


def read_small(url: str, attempts: int = ATTEMPTS) -> bytes | None:
    """Whole content of a small file (local or remote, not ``pipe:``); None when it does not
    exist."""
    if not is_remote(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    if url.startswith("pipe:"):
        return None
    try:
        with RetryingReader(url, 0, attempts) as f:
            return f.read()
    except RemoteShardError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


__all__ = [
    "RemoteShardError",
    "RetryingReader",
    "is_remote",
    "local_path",
    "open_shard",
    "read_small",
]
