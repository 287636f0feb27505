"""Decisions taken once and shared, so that every rank takes the same next step: rank 0 runs a
function and broadcasts its result (or its error), files are hashed by all ranks and gathered,
a flag raised on any rank is seen by all. Small CPU collectives on a gloo group of the caller's
(any default backend works); without a process group everything runs locally.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from blip_recipes.checkpoint.integrity import checksum_files, files_to_checksum, write_manifest

T = TypeVar("T")


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def no_dist() -> bool:
    """True without an initialised process group."""
    return not (dist.is_available() and dist.is_initialized())


def portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to send it to the other ranks), else a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class Coordinator:
    """Rank-0 decisions and small collectives on ``group`` (None: the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    def rank0(self, fn: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result (or raise its error there)."""
        result: Any = None
        error: Optional[BaseException] = None
        if rank() == 0:
            try:
                result = fn()
            except Exception as e:
                error = e
        if no_dist():
            if error is not None:
                raise error
            return result
        box = [(result, None if error is None else portable(error))]
        dist.broadcast_object_list(box, src=0, group=group or self.group)
        if error is not None:
            raise error
        result, remote_error = box[0]
        if remote_error is not None:
            raise remote_error
        return result

    def checksums(
        self, folder: Path, names: list[str], group: Optional[dist.ProcessGroup] = None
    ) -> Any:
        """Checksums of ``names`` in ``folder``, hashed by all ranks (file i by rank i mod
        world size), gathered on rank 0 (None elsewhere)."""
        if no_dist():
            return checksum_files(folder, names)
        group = group or self.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        mine = checksum_files(folder, names[rank::world])
        parts: Optional[list[Any]] = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=group)
        if parts is None:
            return None
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part or {})
        return merged

    def write_manifest(self, path: Path, group: Optional[dist.ProcessGroup] = None) -> None:
        """After every rank's DCP save returned: checksum all files, rank 0 writes the manifest."""
        if not no_dist():
            dist.barrier(group=group or self.group)  # every rank's shard files exist
        names = self.rank0(lambda: files_to_checksum(path), group)
        sums = self.checksums(path, names, group)
        self.rank0(lambda: write_manifest(path, sums), group)

    def any_rank(self, flag: bool) -> list[int]:
        """Ranks on which ``flag`` is true (the same list on every rank)."""
        if no_dist():
            return [0] if flag else []
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64)
        flags[dist.get_rank()] = int(flag)
        dist.all_reduce(flags, group=self.group)
        return [r for r, f in enumerate(flags.tolist()) if f]


__all__ = ["Coordinator", "no_dist", "portable", "rank"]
