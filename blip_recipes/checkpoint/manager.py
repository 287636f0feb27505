"""Save and load training checkpoints with torch.distributed.checkpoint (DCP); knows no model.

Layout: ``<folder>/step-<N>/`` holds DCP's shard files, the ``extra_files`` (e.g. the resolved
config), ``.metadata`` (written by DCP after every rank's shards, atomically: tmp + rename) and,
last, ``checksums.json`` (size and CRC-32 of every other file, written by rank 0 after a barrier,
atomically). A folder counts as a checkpoint (*complete*) once ``.metadata`` exists, so a save
cut short by a crash or preemption is never resumed from; it is deleted when the same step is
saved again or pruned later. The manifest makes it *verifiable*: resume (:meth:`latest_intact`)
checks the newest checkpoint against it and falls back to an older intact one when it is
damaged; see :mod:`blip_recipes.checkpoint.integrity` for the exact states and the format.

Two more guards at save time: weights with a NaN or Inf are never written
(:class:`NonFiniteCheckpointError`), and an ``OSError`` while writing (a full disk) removes the
partial folder, leaves earlier checkpoints alone and raises one clear
:class:`CheckpointWriteError`.
"""

from __future__ import annotations

import errno
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.checkpoint.integrity import (
    MANIFEST_FILE,
    METADATA_FILE,
    CheckpointCorruptError,
    CheckpointReport,
    _describe,
    _human,
    _Verification,
    checksum_files,
    files_to_checksum,
    nonfinite_tensors,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)
from blip_recipes.checkpoint.safe_read import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_metadata,
    single_process_io,
)
from blip_recipes.checkpoint.states import MODEL, MOMENTUM, ModelWrapper

logger = logging.getLogger(__name__)

StateLike = Union[Stateful, dict[str, Any]]
T = TypeVar("T")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or tensor shapes differ from the objects it is loaded into."""


class NonFiniteCheckpointError(RuntimeError):
    """The weights to be saved hold a NaN or Inf on some rank; nothing was written."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed with an OSError (e.g. a full disk); ``errno`` is kept.

    The partial folder is removed and earlier checkpoints are untouched.
    """

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


def _log_saved(step: int, path: Path, seconds: float) -> None:
    """Rank 0: one line per finished save (step, size on disk as rank 0 sees it, seconds)."""
    if _rank() != 0:
        return
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    logger.info("checkpoint step-%d saved: %s in %.1f s -> %s", step, _human(size), seconds, path)


def is_complete(path: Union[str, Path]) -> bool:
    """True when ``path`` is a finished DCP checkpoint (its metadata file, written last, exists).

    Complete says every rank's shards were written; whether they are still intact is what
    :func:`~blip_recipes.checkpoint.verify_checkpoint` checks against ``checksums.json``.
    """
    return (Path(path) / METADATA_FILE).is_file()


def _read_metadata(path: Union[str, Path]) -> Any:
    """DCP metadata of a checkpoint; a damaged file raises :class:`CheckpointCorruptError`."""
    try:
        return read_metadata(path)
    except (FileNotFoundError, CheckpointCorruptError):
        raise
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError...
        raise CheckpointCorruptError(
            f"checkpoint {path}: unreadable {METADATA_FILE} ({_describe(e)}); "
            f"run `blip checkpoint verify {path}`"
        ) from e


def top_level_keys(path: Union[str, Path]) -> set[str]:
    """Top-level state keys a checkpoint holds (``model``, ``momentum``...), from its metadata."""
    metadata = _read_metadata(path).state_dict_metadata
    return {key.split(".", 1)[0] for key in metadata}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to send it to the other ranks), else a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


#: What torch's zip writer (``torch.save`` into a file) raises when a write comes up short, as
#: on a full disk: a RuntimeError from C++ (``inline_container.cc``) without the OSError.
_TORCH_WRITER_FAILED = ("inline_container.cc", "PytorchStreamWriter failed")
_NEARLY_FULL = 64 << 10


def _find_oserror(e: BaseException, folder: Optional[Path] = None) -> Optional[OSError]:
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


def _state_dicts(states: Mapping[str, StateLike]) -> dict[str, Any]:
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in states.items()}


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_against_metadata(
    path: Union[str, Path], flat: Mapping[str, Any], prefixes: set[str], limit: int = 5
) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first mismatched keys, before loading.

    Compares the flattened requested state with the checkpoint's metadata: keys we need that it
    lacks, tensors whose (global) shapes differ, and tensors it has under the top-level keys we
    load (``prefixes``) that we lack (a bigger model). Per-rank bytes entries of other ranks are
    not tensors and are not reported.
    """
    metadata = _read_metadata(path).state_dict_metadata
    missing, shapes = [], []
    for key, value in flat.items():
        meta = metadata.get(key)
        if meta is None:
            missing.append(key)
        elif isinstance(value, torch.Tensor):
            if not isinstance(meta, TensorStorageMetadata):
                shapes.append(f"{key} (tensor here, not a tensor in the checkpoint)")
            elif tuple(meta.size) != _shape(value):
                shapes.append(f"{key} checkpoint {tuple(meta.size)} vs ours {_shape(value)}")
    unexpected = [
        k
        for k, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and k.split(".", 1)[0] in prefixes
        if k not in flat
    ]
    if not (missing or shapes or unexpected):
        return
    lines = [f"checkpoint {path} does not match what is being loaded:"]
    for title, keys in (
        ("shape mismatch", shapes),
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not here", unexpected),
    ):
        if keys:
            more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
            lines.append(f"  {title}: {', '.join(keys[:limit])}{more}")
    raise CheckpointMismatchError("\n".join(lines))


def load_states(
    path: Union[str, Path], states: Mapping[str, StateLike], strict: bool = True
) -> None:
    """Load ``states`` (Statefuls or plain dicts, filled in place) from the checkpoint ``path``.

    Any subset of a checkpoint's top-level keys can be loaded. Keys an object lists in
    ``optional_keys()`` (per-rank entries) may be absent; everything else must match in name and
    shape (``strict``), checked before DCP reads anything.

    Raises:
        CheckpointMismatchError: names or shapes differ.
        CheckpointCorruptError: the metadata or a shard file cannot be read (no raw
            ``EOFError``/``UnpicklingError``); ``blip checkpoint verify`` tells which file.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA_FILE})")
    nested = _state_dicts(states)
    flat, mapping = flatten_state_dict(nested)
    metadata = _read_metadata(path).state_dict_metadata
    for name, state in states.items():
        for key in getattr(state, "optional_keys", lambda: [])():
            full = f"{name}.{key}"
            for k in [k for k in flat if k == full or k.startswith(full + ".")]:
                if k not in metadata:
                    del flat[k], mapping[k]
    if strict:
        check_against_metadata(path, flat, set(states))
    try:
        with single_process_io():
            dcp.load(
                flat, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)),
                planner=SafeLoadPlanner(), no_dist=_no_dist(),
            )  # fmt: skip
    except (CheckpointException, CheckpointCorruptError, EOFError, pickle.UnpicklingError,
            OSError, RuntimeError) as e:  # fmt: skip
        cause = e
        if isinstance(e, CheckpointException) and e.failures:
            failure = next(iter(e.failures.values()))
            cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, CheckpointCorruptError):  # an unsafe or unreadable value
            raise type(cause)(f"checkpoint {path}: {cause}") from None
        raise CheckpointCorruptError(
            f"could not read checkpoint {path} ({_describe(cause)}); "
            f"run `blip checkpoint verify {path}` to see which file is damaged"
        ) from e
    loaded = unflatten_state_dict(flat, mapping)
    for name, state in states.items():
        value = loaded.get(name, {})
        try:
            if isinstance(state, Stateful):
                state.load_state_dict(value)
            elif isinstance(state, dict):
                state.update(value)
        except CheckpointCorruptError as e:  # a per-rank blob that is unsafe or unreadable
            raise type(e)(f"checkpoint {path}: {e}") from None


def load_model_weights(path: Union[str, Path], model: nn.Module, key: str = MODEL) -> None:
    """Initialise ``model`` (sharded or not) from the weights of another run's checkpoint only.

    What ``checkpoint.init_from`` uses: optimizer, schedule, data position and counters of that
    run are ignored; names and shapes must match exactly (clear error otherwise).
    """
    load_states(path, {key: ModelWrapper(model)})


class CheckpointManager:
    """Saves ``step-N`` checkpoints into ``folder``, finds the newest intact one, prunes old ones.

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
        self.folder = Path(folder)
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save
        self.finite_keys = tuple(finite_keys)
        self._pending: Optional[Future] = None
        self._pending_step: Optional[int] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pg = process_group
        self._ctrl: Optional[dist.ProcessGroup] = None
        if not _no_dist():
            from blip_recipes.parallel.distributed import collective_timeout

            # small CPU collectives (paths, flags, checksums) work on any default backend
            self._ctrl = dist.new_group(backend="gloo", timeout=collective_timeout())
            if async_save and self._pg is None:
                self._pg = dist.new_group(backend="gloo", timeout=collective_timeout())

    def step_dir(self, step: int) -> Path:
        """Folder of the checkpoint of ``step``."""
        return self.folder / f"step-{step}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        return step_dirs(self.folder)

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return [s for s, p in self._step_dirs() if is_complete(p)]

    def latest_complete(self) -> Optional[Path]:
        """The newest complete checkpoint, or None (not verified: see :meth:`latest_intact`)."""
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    # ------------------------------------------------------------------ collectives
    def _rank0(self, fn: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result (or raise its error there)."""
        result: Any = None
        error: Optional[BaseException] = None
        if _rank() == 0:
            try:
                result = fn()
            except Exception as e:
                error = e
        if _no_dist():
            if error is not None:
                raise error
            return result
        box = [(result, None if error is None else _portable(error))]
        dist.broadcast_object_list(box, src=0, group=group or self._ctrl)
        if error is not None:
            raise error
        result, remote_error = box[0]
        if remote_error is not None:
            raise remote_error
        return result

    def _checksums(
        self, folder: Path, names: list[str], group: Optional[dist.ProcessGroup] = None
    ) -> Any:
        """Checksums of ``names`` in ``folder``, hashed by all ranks (file i by rank i mod
        world size), gathered on rank 0 (None elsewhere)."""
        if _no_dist():
            return checksum_files(folder, names)
        group = group or self._ctrl
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

    def _write_manifest(self, path: Path, group: Optional[dist.ProcessGroup] = None) -> None:
        """After every rank's DCP save returned: checksum all files, rank 0 writes the manifest."""
        if not _no_dist():
            dist.barrier(group=group or self._ctrl)  # every rank's shard files exist
        names = self._rank0(lambda: files_to_checksum(path), group)
        sums = self._checksums(path, names, group)
        self._rank0(lambda: write_manifest(path, sums), group)

    def _any_rank(self, flag: bool) -> list[int]:
        """Ranks on which ``flag`` is true (the same list on every rank)."""
        if _no_dist():
            return [0] if flag else []
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64)
        flags[dist.get_rank()] = int(flag)
        dist.all_reduce(flags, group=self._ctrl)
        return [r for r, f in enumerate(flags.tolist()) if f]

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
        state_dict = _state_dicts(states)
        self._check_finite(step, state_dict)
        try:
            self._rank0(lambda: self._prepare(path, extra_files))
            if self.async_save:
                pending = dcp.async_save(
                    state_dict, checkpoint_id=str(path), process_group=self._pg,
                    no_dist=_no_dist(),
                )  # fmt: skip
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
                self._pending = self._executor.submit(self._finish_async, pending, path, t0)
                self._pending_step = step
                if _rank() == 0:
                    logger.info(
                        "checkpoint step-%d: staged in %.1f s, writing in the background",
                        step, time.perf_counter() - t0,
                    )  # fmt: skip
                return path
            dcp.save(state_dict, checkpoint_id=str(path), no_dist=_no_dist())
            self._write_manifest(path)
        except (OSError, RuntimeError, CheckpointException) as e:
            self._raise_write_error(step, path, e)
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
        self._write_manifest(path, self._pg)
        if t0 is not None:
            _log_saved(int(path.name.split("-")[-1]), path, time.perf_counter() - t0)

    def _check_finite(self, step: int, state_dict: Mapping[str, Any]) -> None:
        """Refuse (on every rank) to save when any rank holds a non-finite weight."""
        if not self.finite_keys:
            return
        bad = nonfinite_tensors(state_dict, self.finite_keys)
        ranks = self._any_rank(bool(bad))
        if not ranks:
            return
        try:
            newest: Any = self._select_intact()[0]
        except Exception as e:  # only the message depends on it
            newest = f"unknown ({_describe(e)})"
        names = ""
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            names = f" ({', '.join(bad[:3])}{more} on rank {_rank()})"
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
        if bad or _rank() == 0:
            logger.error("%s", message)
        raise NonFiniteCheckpointError(message)

    def _raise_write_error(self, step: int, path: Path, e: BaseException) -> None:
        """Turn an OSError (possibly inside DCP's CheckpointException) into one clear
        :class:`CheckpointWriteError`; remove the partial folder (rank 0). Anything else is
        re-raised as it is."""
        oserror = _find_oserror(e, self.folder)
        if oserror is None:
            raise e
        try:  # before the partial folder goes: what the save ran into
            free = _human(shutil.disk_usage(self.folder).free)
        except OSError:
            free = "unknown space"
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = [p for _, p in self._step_dirs() if is_complete(p) and p != path]
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
            self._raise_write_error(step, self.step_dir(step), e)
        self._prune(step)

    # ------------------------------------------------------------------ verifying and loading
    def verify(self, path: Union[str, Path]) -> CheckpointReport:
        """Verify one checkpoint (collective): files are hashed by all ranks, rank 0 compares
        them with the manifest and every rank gets its report."""
        if _no_dist():
            return verify_checkpoint(path)
        check: dict[str, _Verification] = {}

        def plan() -> list[str]:
            check["v"] = _Verification(path)
            return check["v"].names

        names = self._rank0(plan)
        sums = self._checksums(Path(path), names)
        return self._rank0(lambda: check["v"].finish(sums))

    def _select_intact(
        self, skip: Collection[Path] = ()
    ) -> tuple[Optional[Path], list[CheckpointReport]]:
        """Newest usable checkpoint and the reports of the damaged newer ones (collective);
        ``skip``: folders already found unreadable."""
        candidates = self._rank0(
            lambda: [p for _, p in reversed(self._step_dirs())
                     if (is_complete(p) or (p / MANIFEST_FILE).is_file())  # finished once
                     and p not in skip]
        )  # fmt: skip
        damaged: list[CheckpointReport] = []
        for path in candidates:
            report = self.verify(path)
            if report.usable:
                return path, damaged
            damaged.append(report)
        return None, damaged

    @staticmethod
    def _quarantine(path: Path) -> Path:
        """Rename a damaged checkpoint to ``corrupt-step-N`` (kept for inspection; no longer
        named like a checkpoint, so the step can be saved again)."""
        target = path.with_name(f"corrupt-{path.name}")
        n = 1
        while target.exists():
            target = path.with_name(f"corrupt-{path.name}-{n}")
            n += 1
        path.rename(target)
        logger.warning("moved damaged checkpoint %s to %s", path, target.name)
        return target

    def latest_intact(
        self, quarantine: bool = False, skip: Collection[Path] = ()
    ) -> Optional[Path]:
        """The newest checkpoint that verifies (collective): what ``resume = "auto"`` uses.

        Newest first, each complete checkpoint is checked against its ``checksums.json``; a
        damaged one is reported with a warning naming the file and what is wrong, and the next
        older one is tried. A checkpoint without a manifest (older code) is used after a
        structural check, with a log line that it cannot be verified. With ``quarantine`` the
        damaged checkpoints newer than the one chosen are renamed ``corrupt-step-N``. ``skip``:
        folders not to consider (found unreadable by :meth:`load_readable`).

        Returns:
            The chosen folder, or None when there is no complete checkpoint at all.

        Raises:
            CheckpointCorruptError: checkpoints exist but none is usable.
        """
        self.wait()
        chosen, damaged = self._select_intact(skip)
        if _rank() == 0:
            for report in damaged:
                logger.warning(
                    "checkpoint %s is damaged, not resuming from it: %s",
                    report.path,
                    "; ".join(report.problems),
                )
        if chosen is None and damaged:
            lines = [f"no intact checkpoint to resume from in {self.folder}:"]
            lines += [f"  {r.path.name}: {'; '.join(r.problems)}" for r in damaged]
            lines.append(
                "  (`blip checkpoint verify` lists them; move them away or choose another "
                "job.output_dir to start fresh)"
            )
            raise CheckpointCorruptError("\n".join(lines))
        if chosen is not None and _rank() == 0:
            if damaged:
                logger.warning(
                    "falling back to the older checkpoint %s (newer damaged: %s)",
                    chosen,
                    ", ".join(r.path.name for r in damaged),
                )
            if not (chosen / MANIFEST_FILE).is_file():
                logger.warning(
                    "checkpoint %s has no %s and cannot be verified (written before checksums "
                    "existed, or the save stopped before them); its files are all present",
                    chosen,
                    MANIFEST_FILE,
                )
        if chosen is not None and damaged and quarantine:
            self._rank0(lambda: [self._quarantine(r.path) for r in damaged])
        return chosen

    def check_intact(self, path: Union[str, Path]) -> CheckpointReport:
        """Verify one checkpoint (collective) and raise :class:`CheckpointCorruptError` naming
        what is wrong unless it is usable (what an explicit ``resume`` path goes through)."""
        report = self.verify(path)
        if not report.usable:
            raise CheckpointCorruptError(f"checkpoint {path} is damaged: {report.summary()}")
        if report.status == "unverified" and _rank() == 0:
            logger.warning("checkpoint %s cannot be verified: no %s", path, MANIFEST_FILE)
        return report

    def load(
        self, path: Union[str, Path], states: Mapping[str, StateLike], strict: bool = True
    ) -> None:
        """Load ``states`` from ``path`` in place (see :func:`load_states`; collective).

        When some rank fails, every rank raises: the failing ranks their own error, the others
        a :class:`CheckpointCorruptError` when every failure was one (the checkpoint cannot be
        read), else a RuntimeError naming the ranks, so all ranks take the same next step.
        """
        self.wait()
        error: Optional[Exception] = None
        try:
            load_states(path, states, strict=strict)
        except Exception as e:
            error = e
        failed = self._any_rank(error is not None)
        if not failed:
            return
        other = self._any_rank(error is not None and not isinstance(error, CheckpointCorruptError))
        if error is not None:
            raise error
        ranks = ", ".join(map(str, failed))
        if other:
            raise RuntimeError(f"loading checkpoint {path} failed on rank(s) {ranks}")
        raise CheckpointCorruptError(f"checkpoint {path} could not be read on rank(s) {ranks}")

    def load_readable(
        self, path: Path, states: Mapping[str, StateLike], quarantine: bool = False
    ) -> Path:
        """Load ``path`` (what :meth:`latest_intact` chose) into ``states``, falling back to
        older checkpoints while one cannot be read (collective); returns the one loaded.

        Checksums cannot catch everything: a checkpoint without a manifest passes with a
        structural check, and a verified one may still hold a value that is refused
        (:class:`~blip_recipes.checkpoint.safe_read.UnsafeCheckpointError`). Such a checkpoint
        is treated like a damaged one: one warning naming it and why, then the next older
        intact checkpoint (``quarantine``: the unreadable ones are renamed ``corrupt-step-N``
        once one loads). A mismatch (another model or config) is not damage and is raised.

        Raises:
            CheckpointCorruptError: no checkpoint in the folder can be read.
        """
        unreadable: list[tuple[Path, str]] = []
        current: Optional[Path] = path
        while current is not None:
            try:
                self.load(current, states)
                break
            except CheckpointCorruptError as e:
                why = str(e).splitlines()[0]
                unreadable.append((current, why))
                if _rank() == 0:
                    logger.warning("%s; not resuming from %s", why, current.name)
            current = self.latest_intact(quarantine, skip=[p for p, _ in unreadable])
        if current is None:
            lines = [f"no readable checkpoint to resume from in {self.folder}:"]
            lines += [f"  {p.name}: {why}" for p, why in unreadable]
            raise CheckpointCorruptError("\n".join(lines))
        if unreadable:
            if _rank() == 0:
                logger.warning("resuming from the older checkpoint %s (newer unreadable: %s)",
                               current, ", ".join(p.name for p, _ in unreadable))  # fmt: skip
            if quarantine:
                self._rank0(lambda: [self._quarantine(p) for p, _ in unreadable])
        return current

    def _prune(self, just_written: int) -> None:
        """Rank 0 removes complete checkpoints beyond the newest ``keep_latest_k`` and incomplete
        leftovers older than ``just_written``; never ``just_written`` itself."""
        if _rank() != 0:
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
            self._ctrl = self._pg = None
