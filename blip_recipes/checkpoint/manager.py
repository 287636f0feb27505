"""Saving training checkpoints with torch.distributed.checkpoint (DCP), synchronously or in a
background thread, and pruning old ones; knows no model. Reading and resuming live in
:mod:`~blip_recipes.checkpoint.loading` and :mod:`~blip_recipes.checkpoint.resume`, write
failures in :mod:`~blip_recipes.checkpoint.write_errors`.

Layout: ``<folder>/step-<N>/`` holds DCP's shard files, the ``extra_files`` (e.g. the resolved
config), ``.metadata`` (written by DCP after every rank's shards, atomically: tmp + rename) and,
last, ``checksums.json`` (size and CRC-32 of every other file, written by rank 0 after a barrier,
atomically). A folder counts as a checkpoint (*complete*) once ``.metadata`` exists, so a save
cut short by a crash or preemption is never resumed from; it is deleted when the same step is
saved again or pruned later. The manifest makes it *verifiable*: resume (``latest_intact``)
checks the newest checkpoint against it and falls back to an older intact one when it is
damaged; see :mod:`blip_recipes.checkpoint.integrity` for the exact states and the format.

Two more guards at save time: weights with a NaN or Inf are never written
(:class:`NonFiniteCheckpointError`), and an ``OSError`` while writing (a full disk) removes the
partial folder, leaves earlier checkpoints alone and raises one clear
:class:`CheckpointWriteError`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from blip_recipes.checkpoint.coordination import Coordinator, no_dist, rank
from blip_recipes.checkpoint.integrity import _describe, _human, nonfinite_tensors
from blip_recipes.checkpoint.loading import StateLike, is_complete, state_dicts
from blip_recipes.checkpoint.resume import CheckpointFolder
from blip_recipes.checkpoint.states import MODEL, MOMENTUM
from blip_recipes.checkpoint.write_errors import NonFiniteCheckpointError, raise_write_error

logger = logging.getLogger(__name__)


def _log_saved(step: int, path: Path, seconds: float) -> None:
    """Rank 0: one line per finished save (step, size on disk as rank 0 sees it, seconds)."""
    if rank() != 0:
        return
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    logger.info("checkpoint step-%d saved: %s in %.1f s -> %s", step, _human(size), seconds, path)


class CheckpointManager(CheckpointFolder):
    """Saves ``step-N`` checkpoints into ``folder``, prunes old ones, and (as a
    :class:`~blip_recipes.checkpoint.resume.CheckpointFolder`) finds the newest intact one.

    Construct it on every rank (it creates a gloo process group for its own coordination, and
    one for async saves). Saving, :meth:`latest_intact`, :meth:`verify`, :meth:`wait` and
    :meth:`close` are collective: every rank calls them in the same order, with the same step
    and the same top-level keys. Decisions (which checkpoint to resume from, whether the
    weights are finite, whether a write failed) are taken once and shared, so all ranks agree.

    Args:
        folder: where ``step-N`` folders go (``<output_dir>/checkpoints``).
        keep_latest_k: keep this many newest complete checkpoints; 0 keeps all.
        async_save: save in a background thread after a synchronous copy of the state to CPU,
            on a dedicated gloo group (``dcp.async_save`` on the default group hangs once
            training goes on issuing collectives). The checksum manifest is written in the same
            background thread right after DCP finishes. The previous async save is awaited
            before the next save starts and in :meth:`close`.
        process_group: group for async saves; None creates ``dist.new_group(backend="gloo")``.
        finite_keys: top-level keys whose floating-point tensors must be finite to save (the
            model and the momentum encoders and queues); empty disables the check.
    """

    def __init__(
        self,
        folder: Union[str, Path],
        keep_latest_k: int = 0,
        async_save: bool = False,
        process_group: Optional[dist.ProcessGroup] = None,
        finite_keys: Sequence[str] = (MODEL, MOMENTUM),
    ) -> None:
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save
        self.finite_keys = tuple(finite_keys)
        self._pending: Optional[Future] = None
        self._pending_step: Optional[int] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pg = process_group
        self._ctrl: Optional[dist.ProcessGroup] = None
        if not no_dist():
            from blip_recipes.parallel.distributed import collective_timeout

            # small CPU collectives (paths, flags, checksums) work on any default backend
            self._ctrl = dist.new_group(backend="gloo", timeout=collective_timeout())
            if async_save and self._pg is None:
                self._pg = dist.new_group(backend="gloo", timeout=collective_timeout())
        super().__init__(folder, Coordinator(self._ctrl))

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        states: Mapping[str, StateLike],
        extra_files: Optional[Mapping[str, str]] = None,
    ) -> Path:
        """Save ``states`` as ``step-<step>`` (collective); returns its folder.

        An existing complete checkpoint of the same step is never overwritten (the call only
        logs); an incomplete one is removed first. ``extra_files`` (name -> text) are written by
        rank 0 before DCP starts, so they are in place when the metadata marks completion.
        ``checksums.json`` follows DCP's files. With ``async_save`` the call returns after the
        state is staged in CPU memory.

        Raises:
            NonFiniteCheckpointError: a tensor under ``finite_keys`` holds a NaN or Inf on some
                rank; nothing is written.
            CheckpointWriteError: an OSError (full disk...) while writing; the partial folder
                is removed, earlier checkpoints are untouched.
        """
        self.wait()
        t0 = time.perf_counter()
        path = self.step_dir(step)
        if is_complete(path):
            logger.warning("checkpoint %s already exists; not overwriting it", path)
            return path
        state_dict = state_dicts(states)
        self._check_finite(step, state_dict)
        try:
            self._coord.rank0(lambda: self._prepare(path, extra_files))
            if self.async_save:
                pending = dcp.async_save(
                    state_dict, checkpoint_id=str(path), process_group=self._pg,
                    no_dist=no_dist(),
                )  # fmt: skip
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
                self._pending = self._executor.submit(self._finish_async, pending, path, t0)
                self._pending_step = step
                if rank() == 0:
                    logger.info(
                        "checkpoint step-%d: staged in %.1f s, writing in the background",
                        step, time.perf_counter() - t0,
                    )  # fmt: skip
                return path
            dcp.save(state_dict, checkpoint_id=str(path), no_dist=no_dist())
            self._coord.write_manifest(path)
        except (OSError, RuntimeError, CheckpointException) as e:
            raise_write_error(step, path, self.folder, e)
        _log_saved(step, path, time.perf_counter() - t0)
        self._prune(step)
        return path

    @staticmethod
    def _prepare(path: Path, extra_files: Optional[Mapping[str, str]]) -> None:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        for name, text in (extra_files or {}).items():
            (path / name).write_text(text)

    def _finish_async(self, pending: Any, path: Path, t0: Optional[float] = None) -> None:
        """Background thread: wait for DCP's async save, then write the manifest (on the
        async group, which nothing else uses meanwhile)."""
        upload: Future = getattr(pending, "upload_completion", pending)
        upload.result()
        self._coord.write_manifest(path, self._pg)
        if t0 is not None:
            _log_saved(int(path.name.split("-")[-1]), path, time.perf_counter() - t0)

    def _check_finite(self, step: int, state_dict: Mapping[str, Any]) -> None:
        """Refuse (on every rank) to save when any rank holds a non-finite weight."""
        if not self.finite_keys:
            return
        bad = nonfinite_tensors(state_dict, self.finite_keys)
        ranks = self._coord.any_rank(bool(bad))
        if not ranks:
            return
        try:
            newest: Any = self._select_intact()[0]
        except Exception as e:  # only the message depends on it
            newest = f"unknown ({_describe(e)})"
        names = ""
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            names = f" ({', '.join(bad[:3])}{more} on rank {rank()})"
        remains = (
            f"the newest intact checkpoint remains {newest}: resume from it "
            "(checkpoint.resume=auto), e.g. with a lower learning rate"
            if newest is not None
            else "no intact checkpoint exists yet"
        )
        message = (
            f"refusing to save checkpoint step-{step}: non-finite (NaN/Inf) weights on "
            f"rank(s) {', '.join(map(str, ranks))}{names}; nothing was written and {remains}"
        )
        if bad or rank() == 0:
            logger.error("%s", message)
        raise NonFiniteCheckpointError(message)

    def wait(self) -> None:
        """Block until the pending async save (if any) and its manifest are written, then prune.

        Raises:
            CheckpointWriteError: the pending save failed with an OSError.
        """
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending, self._pending_step = None, None
        assert step is not None
        try:
            pending.result()
        except (OSError, RuntimeError, CheckpointException) as e:
            raise_write_error(step, self.step_dir(step), self.folder, e)
        self._prune(step)

    def _prune(self, just_written: int) -> None:
        """Rank 0 removes complete checkpoints beyond the newest ``keep_latest_k`` and incomplete
        leftovers older than ``just_written``; never ``just_written`` itself."""
        if rank() != 0:
            return
        dirs = self._step_dirs()
        doomed = [p for s, p in dirs if s < just_written and not is_complete(p)]
        if self.keep_latest_k > 0:
            complete = [(s, p) for s, p in dirs if is_complete(p)]
            doomed += [p for s, p in complete[: -self.keep_latest_k] if s != just_written]
        for p in doomed:
            logger.info("removing old checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        """Finish the pending async save and release this manager's gloo groups; call before
        shutting down the process group (a group still referenced keeps its gloo threads alive,
        and a later fork of this process, e.g. a DataLoader worker, can deadlock on them)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._ctrl = self._pg = self._coord.group = None
