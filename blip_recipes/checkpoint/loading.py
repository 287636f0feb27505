"""Reading a DCP checkpoint into objects: whether a folder is a finished checkpoint, its top-level
keys, the name and shape check done before anything is read, and the load itself (Statefuls or
plain dicts filled in place). Knows no model.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.checkpoint.coordination import no_dist
from blip_recipes.checkpoint.integrity import METADATA_FILE, CheckpointCorruptError, _describe
from blip_recipes.checkpoint.safe_read import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_metadata,
    single_process_io,
)
from blip_recipes.checkpoint.states import MODEL, ModelWrapper

StateLike = Union[Stateful, dict[str, Any]]


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or tensor shapes differ from the objects it is loaded into."""


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


def state_dicts(states: Mapping[str, StateLike]) -> dict[str, Any]:
    """The state dicts of ``states`` (a Stateful's ``state_dict()``, a plain dict as it is)."""
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
    nested = state_dicts(states)
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
                planner=SafeLoadPlanner(), no_dist=no_dist(),
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


__all__ = [
    "CheckpointMismatchError",
    "StateLike",
    "check_against_metadata",
    "is_complete",
    "load_model_weights",
    "load_states",
    "state_dicts",
    "top_level_keys",
]
