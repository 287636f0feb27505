"""Read checkpoints without running code from them.

A DCP checkpoint holds three kinds of pickles: ``.metadata`` (plain ``pickle``), every
non-tensor value (``torch.save`` of ints, floats, strings, dicts, bytes...) and, inside those,
the per-rank blobs (RNG states, loader positions). DCP reads the first two with ``pickle.load``
and ``torch.load(weights_only=False)``, which run whatever a crafted pickle names (a class whose
``__reduce__`` calls ``os.system``). Here all three are read through allow-lists instead:

* ``.metadata``: :class:`SafeFileSystemReader` unpickles only DCP's own metadata classes, torch
  sizes, dtypes and layouts, and paths;
* values and per-rank blobs: :func:`safe_torch_load` is ``torch.load(weights_only=True)``
  (tensors and plain containers), plus the NumPy array types the RNG state of checkpoints
  written before per-rank states became plain tensors holds.

Anything else is refused with :class:`UnsafeCheckpointError` (one line naming the global), and
nothing from the pickle runs.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from blip_recipes.checkpoint.errors import CheckpointCorruptError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(CheckpointCorruptError):
    """A checkpoint holds a pickled object that is not a tensor or plain value; not loaded."""


def _refusal(what: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {what}: it holds a pickled {name}, not a tensor or plain value "
        "(loading it could run code); nothing from it was executed"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals DCP metadata is made of."""

    def __init__(self, file: Any, what: str) -> None:
        super().__init__(file)
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refusal(self.what, f"{module}.{name}")


@contextmanager
def single_process_io() -> Iterator[None]:
    """Around a ``dcp.load``/``dcp.save`` with ``no_dist=True``: DCP warns "torch.distributed is
    disabled ... assuming the intent is to load in a single process" on every such call, even
    when the caller asked for exactly that. Harmless (one process reads/writes every shard), so
    only that message is silenced, only inside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
            category=UserWarning,
        )  # fmt: skip
        yield


def read_metadata(path: Union[str, Path], rank: Any = None) -> Metadata:
    """The DCP metadata of the checkpoint folder ``path``, unpickled through the allow-list.

    Raises:
        UnsafeCheckpointError: it names anything outside the allow-list.
        FileNotFoundError: no ``.metadata`` file.
    """
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    file = Path(path) / name
    with open(file, "rb") as f:
        metadata = _MetadataUnpickler(f, str(file)).load()
    if not isinstance(metadata, Metadata):
        raise CheckpointCorruptError(f"{file}: not DCP metadata ({type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` whose metadata is read by :func:`read_metadata` (tensors are
    already read with ``weights_only=True`` by DCP)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path, kwargs.get("rank"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _numpy_globals() -> list[Any]:
    """What a pickled NumPy array of plain numbers names (old RNG states hold one)."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's refusal names what a pickle asked for


def safe_torch_load(data: Union[bytes, io.BytesIO], what: str) -> Any:
    """``torch.load`` of tensors and plain containers only (``weights_only=True``).

    Raises:
        UnsafeCheckpointError: the pickle names anything else (nothing of it runs).
        CheckpointCorruptError: the bytes are not a readable torch pickle.
    """
    buffer = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found:
            raise _refusal(what, found.group(1)) from None
        raise CheckpointCorruptError(f"{what}: unreadable ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointCorruptError(f"{what}: unreadable ({str(e).splitlines()[0]})") from e


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values go through :func:`safe_torch_load`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = safe_torch_load(value, f"checkpoint entry {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
