"""Reading and writing checkpoint files and folders (no key mapping here; see `readers.py` and
`exporters.py`).

Layouts on disk:
- ``dcp``: a DCP checkpoint folder of the pretraining recipe (``step-N/`` with ``.metadata``;
  top-level keys ``model`` and ``momentum``), or a run / ``checkpoints`` folder holding such steps
  (the newest complete one is used).
- ``hf``: a Hugging Face ``save_pretrained`` folder (config.json + safetensors / .bin, sharded or
  not), or a folder whose subfolders are such folders (retrieval + captioning export).
- ``file``: one ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict (reference BLIP
  ``{"model": ...}`` or bare, or our consolidated export).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

Layout = Literal["dcp", "hf", "file"]
METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointLayoutError(ValueError):
    """A path or state dict in no layout we know, or with keys we cannot place."""


def latest_dcp_step(path: str | Path) -> Path | None:
    """The newest complete ``step-N`` under ``path``, ``path/checkpoints``, or ``path`` itself."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    for folder in (path, path / "checkpoints"):
        if not folder.is_dir():
            continue
        steps = sorted(
            (int(m.group(1)), p)
            for p in folder.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / METADATA_FILE).is_file()
        )
        if steps:
            return steps[-1][1]
    return None


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in _HF_WEIGHTS + _HF_INDEXES
    )


def hf_subfolders(path: str | Path) -> list[Path]:
    """HF folders at ``path`` (itself, or its direct subfolders, sorted by name)."""
    path = Path(path)
    if _is_hf_folder(path):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_dir() and _is_hf_folder(p))
    return []


def detect_layout(path: str | Path) -> Layout:
    """Which of the on-disk layouts ``path`` is.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointLayoutError: a folder that is neither DCP nor HF.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        return "file"
    if latest_dcp_step(path) is not None:
        return "dcp"
    if hf_subfolders(path):
        return "hf"
    entries = sorted(p.name for p in path.iterdir())[:8]
    raise CheckpointLayoutError(
        f"{path} is a folder but neither a DCP checkpoint (no {METADATA_FILE}, no complete "
        f"step-N folders) nor a Hugging Face folder (config.json + weights); it holds: {entries}"
    )


# ------------------------------------------------------------------ writing safely
def _occupied(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged_output(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``dest`` to write a file or folder into; it replaces ``dest``
    only once the block finishes.

    On any failure (or Ctrl-C) the partial output is removed and ``dest`` is untouched. An
    existing ``dest`` (a file or a non-empty folder) is an error unless ``overwrite``; it is
    then moved aside, the new output renamed into place, and the old one deleted.

        with staged_output("model.pth", overwrite=True) as tmp:
            torch.save(state, tmp)

    Raises:
        FileExistsError: ``dest`` exists and ``overwrite`` is false.
    """
    dest = Path(dest)
    if _occupied(dest) and not overwrite:
        raise FileExistsError(f"{dest} exists; pass --force (overwrite=True) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}{dest.suffix}"  # same suffix: writers pick the format from it
    tmp = dest.with_name(f".{dest.stem}.partial-{tag}")
    aside = dest.with_name(f".{dest.stem}.replaced-{tag}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for {dest}")
        if dest.exists() or dest.is_symlink():
            if dest.is_dir() and not _occupied(dest) and tmp.is_dir():
                dest.rmdir()
            else:
                _remove(aside)
                os.replace(dest, aside)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if aside.exists() and not dest.exists():
                os.replace(aside, dest)  # put the old output back
            raise
    except BaseException:
        _remove(tmp)
        raise
    _remove(aside)


# ------------------------------------------------------------------ plain files
def read_state_dict_file(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or a torch pickle (``{"model": ...}`` unwrapped).

    Torch pickles are read with ``weights_only=True``; ``trust_pickle`` allows arbitrary objects
    (only for files from a trusted source).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CheckpointLayoutError(
            f"could not read {path} as a weights-only torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); if you trust the file, allow full unpickling "
            "(trust_pickle=True / --trust-pickle)"
        ) from e
    if isinstance(loaded, dict):
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise CheckpointLayoutError(
            f"{path} does not hold a state dict (got {type(loaded).__name__})"
        )
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointLayoutError(
            f"{path} holds no tensors; top-level keys: {sorted(loaded)[:8]}"
        )
    return tensors


def save_state_dict_file(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a flat state dict to ``.safetensors`` (contiguous, unshared copies; ``metadata`` in
    its header) or a torch file (``metadata`` ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(compact_copies(state_dict), path)


def compact_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies that own just their data, one per distinct tensor: keys that alias the
    same tensor (same storage, offset, shape and strides) alias one copy, so ``torch.save``
    stores shared weights once and ``torch.load`` gives them back shared."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state_dict.items():
        value = value.detach()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 value.stride(), value.dtype, value.device)  # fmt: skip
        if ident not in copies or value.numel() == 0:
            copies[ident] = value.clone()
        out[key] = copies[ident]
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header (empty for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ------------------------------------------------------------------ Hugging Face folders
def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict) of one ``save_pretrained`` folder (sharded or not)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for index_name in _HF_INDEXES:
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state |= read_state_dict_file(path / name)
            return config, state
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            return config, read_state_dict_file(path / name)
    raise FileNotFoundError(f"no weights ({', '.join(_HF_WEIGHTS)}) in {path}")


# ------------------------------------------------------------------ DCP folders
def dcp_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Flattened key -> global shape of every tensor in a DCP checkpoint (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from blip_recipes.checkpoint.safe_read import read_metadata

    metadata = read_metadata(path).state_dict_metadata
    return {k: tuple(m.size) for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}


def read_dcp(
    path: str | Path, prefixes: tuple[str, ...] = ("model", "momentum")
) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of a DCP checkpoint under the top-level ``prefixes``.

    Works without a process group and from a checkpoint saved by any number of ranks. Keys are
    flattened with dots (``model.visual_encoder.cls_token``, ``momentum.image_queue``...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from blip_recipes.checkpoint.safe_read import (
        SafeFileSystemReader,
        read_metadata,
        single_process_io,
    )

    metadata = read_metadata(path).state_dict_metadata
    state = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.split(".", 1)[0] in prefixes
    }
    if not state:
        raise CheckpointLayoutError(
            f"DCP checkpoint {path} has no tensors under {list(prefixes)}; top-level keys: "
            f"{sorted({k.split('.', 1)[0] for k in metadata})}"
        )
    with single_process_io():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    return state


def save_dcp(state: dict[str, Any], path: str | Path) -> Path:
    """Save a (nested) state dict as a DCP checkpoint folder from one process (no group),
    with the checksum manifest training checkpoints carry (`blip checkpoint verify` checks it)."""
    import torch.distributed.checkpoint as dcp

    from blip_recipes.checkpoint.integrity import write_checksums
    from blip_recipes.checkpoint.safe_read import single_process_io

    path = Path(path)
    if (path / METADATA_FILE).exists():
        raise FileExistsError(f"{path} already holds a DCP checkpoint; not overwriting it")
    path.mkdir(parents=True, exist_ok=True)
    with single_process_io():
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    write_checksums(path)
    return path


__all__ = [
    "CheckpointLayoutError",
    "Layout",
    "compact_copies",
    "dcp_tensor_shapes",
    "detect_layout",
    "hf_subfolders",
    "latest_dcp_step",
    "read_dcp",
    "read_hf_folder",
    "read_safetensors_metadata",
    "read_state_dict_file",
    "save_dcp",
    "save_state_dict_file",
    "staged_output",
]
