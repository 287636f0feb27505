"""What a CapFilt run writes: a unit's kept images as JSONL records or as a tar shard, each file
written to a temporary name and renamed when complete, and the merged annotation file.

JSONL record (one per kept image)::

    {"image": "<path relative to capfilt.image_root>", "caption": ["kept text", ...],
     "capfilt": {"sources": ["web" | "synthetic", ...], "itm": [0.93, ...],
                 "captioner": "<capfilt.captioner>", "filter": "<capfilt.filter>"}}

Shard sample: ``KEY.<ext>`` (the input's image bytes, unchanged) and ``KEY.json`` with the same
fields (``image`` is the image member's name); the shard reader takes the ``caption`` list of the
``.json`` (there is no ``.txt``). Files are byte-for-byte a function of their content (tar members
have mtime 0, uid/gid 0, mode 0644; JSON keys in a fixed order).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from blip_recipes.capfilt.process import KeptImage

ITM_DECIMALS = 6
"""ITM scores are written rounded to this many decimals."""
TMP_MARK = ".tmp-"
"""Temporary files are ``<final name>.tmp-<pid>``; a restarted run deletes leftovers."""


def record(kept: KeptImage, captioner: str, filter_model: str, image: str | None = None) -> dict:
    """The output fields of a kept image (``image`` defaults to the pair's key)."""
    return {
        "image": kept.pair.key if image is None else image,
        "caption": [c.text for c in kept.captions],
        "capfilt": {
            "sources": [c.source for c in kept.captions],
            "itm": [round(c.itm, ITM_DECIMALS) for c in kept.captions],
            "captioner": captioner,
            "filter": filter_model,
        },
    }


def _json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed at the end (a reader never
    sees a half-written file; a killed writer leaves only a ``.tmp-<pid>`` file)."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl_bytes(kept: Iterable[KeptImage], captioner: str, filter_model: str) -> bytes:
    """A unit's JSONL records (one line per kept image)."""
    return b"".join(_json_line(record(k, captioner, filter_model)) for k in kept)


def shard_bytes(kept: Iterable[KeptImage], captioner: str, filter_model: str) -> bytes:
    """A unit's tar shard: per kept image ``KEY.<ext>`` (bytes copied) and ``KEY.json``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for k in kept:
            image = k.pair.image
            if not isinstance(image, bytes):
                raise TypeError(f"{k.pair.origin}: shard output needs the image bytes")
            member = f"{k.pair.key}.{k.pair.image_ext}"
            meta = _json_line(record(k, captioner, filter_model, image=os.path.basename(member)))
            for name, payload in ((member, image), (f"{k.pair.key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def concatenate(parts: Sequence[Path], out: Path) -> int:
    """Concatenate ``parts`` into ``out`` (atomically); returns the bytes written."""
    tmp = out.with_name(f"{out.name}{TMP_MARK}{os.getpid()}")
    size = 0
    with open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return size


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder`` (not recursive)."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if TMP_MARK in path.name and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


__all__ = [
    "ITM_DECIMALS",
    "concatenate",
    "jsonl_bytes",
    "record",
    "remove_leftovers",
    "shard_bytes",
    "write_atomic",
]
