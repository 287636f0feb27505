"""Save and load training checkpoints with torch.distributed.checkpoint (DCP); knows no model.

Layout: ``<folder>/step-<N>/`` holds DCP's shard files, the ``extra_files`` (e.g. the resolved
config) and, written last by DCP (atomically, tmp + rename), ``.metadata``. A folder counts as a
checkpoint only once ``.metadata`` exists, so a save cut short by a crash or preemption is
never resumed from; it is deleted when the same step is saved again or pruned later.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.checkpoint.states import MODEL, ModelWrapper

logger = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")

StateLike = Union[Stateful, dict[str, Any]]


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or tensor shapes differ from the objects it is loaded into."""


def is_complete(path: Union[str, Path]) -> bool:
    """True when ``path`` is a finished DCP checkpoint (its metadata file, written last, exists)."""
    return (Path(path) / METADATA_FILE).is_file()


def top_level_keys(path: Union[str, Path]) -> set[str]:
    """Top-level state keys a checkpoint holds (``model``, ``momentum``...), from its metadata."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key.split(".", 1)[0] for key in metadata}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
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
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA_FILE})")
    nested = _state_dicts(states)
    flat, mapping = flatten_state_dict(nested)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, state in states.items():
        for key in getattr(state, "optional_keys", lambda: [])():
            full = f"{name}.{key}"
            for k in [k for k in flat if k == full or k.startswith(full + ".")]:
                if k not in metadata:
                    del flat[k], mapping[k]
    if strict:
        check_against_metadata(path, flat, set(states))
    dcp.load(flat, checkpoint_id=str(path), no_dist=_no_dist())
    loaded = unflatten_state_dict(flat, mapping)
    for name, state in states.items():
        value = loaded.get(name, {})
        if isinstance(state, Stateful):
            state.load_state_dict(value)
        elif isinstance(state, dict):
            state.update(value)


def load_model_weights(path: Union[str, Path], model: nn.Module, key: str = MODEL) -> None:
    """Initialise ``model`` (sharded or not) from the weights of another run's checkpoint only.

    What ``checkpoint.init_from`` uses: optimizer, schedule, data position and counters of that
    run are ignored; names and shapes must match exactly (clear error otherwise).
    """
    load_states(path, {key: ModelWrapper(model)})


class CheckpointManager:
    """Saves ``step-N`` checkpoints into ``folder``, finds the newest complete one, prunes old ones.

    Construct it on every rank (it may create a process group). Saving and loading are
    collective: every rank calls them with the same step and the same top-level keys.

    Args:
        folder: where ``step-N`` folders go (``<output_dir>/checkpoints``).
        keep_latest_k: keep this many newest complete checkpoints; 0 keeps all.
        async_save: save in a background thread after a synchronous copy of the state to CPU,
            on a dedicated gloo group (``dcp.async_save`` on the default group hangs once
            training goes on issuing collectives). The previous async save is awaited before
            the next save starts and in :meth:`close`.
        process_group: group for async saves; None creates ``dist.new_group(backend="gloo")``.
    """

    def __init__(
        self,
        folder: Union[str, Path],
        keep_latest_k: int = 0,
        async_save: bool = False,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.folder = Path(folder)
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save
        self._pending: Optional[Any] = None
        self._pending_step: Optional[int] = None
        self._pg = process_group
        if async_save and self._pg is None and dist.is_available() and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")

    def step_dir(self, step: int) -> Path:
        """Folder of the checkpoint of ``step``."""
        return self.folder / f"step-{step}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return [s for s, p in self._step_dirs() if is_complete(p)]

    def latest_complete(self) -> Optional[Path]:
        """The newest complete checkpoint, or None (what ``resume = "auto"`` resumes from)."""
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

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
        With ``async_save`` the call returns after the state is staged in CPU memory.
        """
        self.wait()
        path = self.step_dir(step)
        if is_complete(path):
            logger.warning("checkpoint %s already exists; not overwriting it", path)
            return path
        _barrier()  # nobody looks at the folder while rank 0 prepares it
        if _rank() == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            for name, text in (extra_files or {}).items():
                (path / name).write_text(text)
        _barrier()
        state_dict = _state_dicts(states)
        if self.async_save:
            self._pending = dcp.async_save(
                state_dict, checkpoint_id=str(path), process_group=self._pg, no_dist=_no_dist()
            )
            self._pending_step = step
        else:
            dcp.save(state_dict, checkpoint_id=str(path), no_dist=_no_dist())
            self._prune(step)
        return path

    def wait(self) -> None:
        """Block until the pending async save (if any) is written, then prune."""
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending, self._pending_step = None, None
        future: Future = getattr(pending, "upload_completion", pending)
        future.result()
        assert step is not None
        self._prune(step)

    def load(
        self, path: Union[str, Path], states: Mapping[str, StateLike], strict: bool = True
    ) -> None:
        """Load ``states`` from ``path`` in place (see :func:`load_states`)."""
        self.wait()
        load_states(path, states, strict=strict)

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
        """Finish the pending async save; call before shutting down the process group."""
        self.wait()
