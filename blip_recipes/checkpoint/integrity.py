"""Checkpoint integrity: a checksum manifest per checkpoint, verification, and the finite check.

Every ``step-N`` folder written by :class:`~blip_recipes.checkpoint.CheckpointManager` ends with
``checksums.json``, written after DCP's files (atomically, tmp + rename)::

    {
      "format": 1,
      "algorithm": "crc32",
      "files": {
        ".metadata": {"size": 580785, "crc32": "222a86d4"},
        "__0_0.distcp": {"size": 7891168, "crc32": "fbb7c63c"},
        "config.toml": {"size": 1782, "crc32": "7562fe20"}
      }
    }

(``size`` in bytes, ``crc32`` as 8 lowercase hex digits). It lists every other file of the
folder. The hashing is spread over the ranks (file i by rank i mod world size), rank 0 gathers
the results after a barrier and writes the file; asynchronous saves do this in their background
thread once DCP has finished.

What the states of a ``step-N`` folder mean:

* **incomplete**: no ``.metadata`` (DCP writes it last) and no manifest. A save that did not
  finish; never resumed from, removed by later saves.
* **complete**: ``.metadata`` exists, so every rank's shard files were written. This is what
  :func:`~blip_recipes.checkpoint.is_complete` tests (unchanged).
* **intact** (verified): complete, and ``checksums.json`` matches every file (size and CRC-32)
  and lists every shard file the metadata refers to.
* **unverified**: complete without ``checksums.json``: written before checksums existed, or a
  save stopped between ``.metadata`` and the manifest. Its metadata is read and every shard
  file it refers to must exist and be long enough; bit flips cannot be detected. Resume still
  uses it, with a log line saying it cannot be verified.
* **corrupt**: anything else: a missing, truncated or changed file (``.metadata`` included: a
  manifest without it means the file was lost after the save finished), unreadable metadata
  or manifest. Resume skips it for the newest usable older checkpoint and renames it
  ``corrupt-step-N`` (kept for inspection; the step can then be saved again).

Why CRC-32 (``zlib.crc32``): the manifest guards against accidental damage (truncated copies,
lost or half-written files, flipped bits on disk or in transfer), not against tampering, so a
cryptographic hash buys nothing. ``zlib.crc32`` runs at about 4 GB/s on one core, against about
0.9 GB/s for ``blake2b`` and 1.7 GB/s for ``sha256`` (measured on the CPU machines this project
is tested on), so hashing multi-GB shards adds seconds, not minutes. It needs nothing outside the
standard library, releases the GIL (asynchronous saves hash in a background thread) and detects
every burst error of up to 32 bits and any other corruption with probability 1 - 2^-32; a
truncated or grown file is reported as a size mismatch.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from blip_recipes.checkpoint.errors import CheckpointCorruptError  # noqa: F401  (re-exported)

METADATA_FILE = ".metadata"
MANIFEST_FILE = "checksums.json"
MANIFEST_FORMAT = 1
ALGORITHM = "crc32"
STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 8 << 20

PathLike = Union[str, Path]


@dataclass(frozen=True)
class FileSum:
    """Size in bytes and CRC-32 (8 hex digits) of one file."""

    size: int
    crc32: str


def checksum_file(path: PathLike) -> FileSum:
    """Size and CRC-32 of a file, read in 8 MiB chunks (raises OSError if it cannot be read)."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return FileSum(size, f"{crc & 0xFFFFFFFF:08x}")


def checksum_files(folder: PathLike, names: Iterable[str]) -> dict[str, Union[FileSum, str]]:
    """``checksum_file`` of each name in ``folder``; a file that cannot be read maps to a short
    description of why (``missing``, ``unreadable: ...``) instead of raising."""
    out: dict[str, Union[FileSum, str]] = {}
    for name in names:
        try:
            out[name] = checksum_file(Path(folder) / name)
        except FileNotFoundError:
            out[name] = "missing"
        except OSError as e:
            out[name] = f"unreadable ({e.strerror or e})"
    return out


def files_to_checksum(path: PathLike) -> list[str]:
    """The files of a checkpoint folder the manifest covers: all but itself and temporaries."""
    return sorted(
        p.name
        for p in Path(path).iterdir()
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")
    )


def write_manifest(path: PathLike, sums: Mapping[str, Union[FileSum, str]]) -> Path:
    """Write ``checksums.json`` into ``path`` atomically (tmp file, fsync, rename).

    Raises:
        OSError: when a file could not be read (``sums`` holds a reason) or writing failed.
    """
    bad = {name: s for name, s in sums.items() if not isinstance(s, FileSum)}
    if bad:
        name, why = next(iter(bad.items()))
        raise OSError(f"cannot checksum {Path(path) / name}: {why}")
    entries = [
        f'    {json.dumps(name)}: {{"size": {s.size}, "crc32": "{s.crc32}"}}'
        for name, s in sorted(sums.items())
        if isinstance(s, FileSum)
    ]
    text = (
        f'{{\n  "format": {MANIFEST_FORMAT},\n  "algorithm": "{ALGORITHM}",\n  "files": {{\n'
        + ",\n".join(entries)
        + "\n  }\n}\n"
    )  # one file per line, as in the module docstring
    target = Path(path) / MANIFEST_FILE
    tmp = target.with_name(MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def write_checksums(path: PathLike) -> Path:
    """Checksum every file of a finished checkpoint folder and write its manifest, in this
    process (for tools that write DCP checkpoints without the manager)."""
    return write_manifest(path, checksum_files(path, files_to_checksum(path)))


def read_manifest(path: PathLike) -> dict[str, FileSum]:
    """The ``files`` of a checkpoint's manifest (raises ValueError/OSError when unreadable)."""
    data = json.loads((Path(path) / MANIFEST_FILE).read_text())
    if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM:
        raise ValueError(f"not a {ALGORITHM} manifest")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError("no files listed")
    return {name: FileSum(int(e["size"]), str(e["crc32"])) for name, e in files.items()}


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and text[0] else type(e).__name__


@dataclass
class CheckpointReport:
    """What :func:`verify_checkpoint` found in one ``step-N`` folder.

    ``status`` is ``ok`` (intact, verified), ``unverified`` (no manifest, structure fine),
    ``corrupt`` or ``incomplete`` (see the module docstring). ``problems`` name the file and
    what is wrong with it.
    """

    path: Path
    status: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    size: int = 0

    @property
    def ok(self) -> bool:
        """Intact: every file matches the manifest."""
        return self.status == "ok"

    @property
    def usable(self) -> bool:
        """Safe to resume from: intact, or an unverifiable checkpoint whose structure is fine."""
        return self.status in ("ok", "unverified")

    def summary(self) -> str:
        """One line: ``OK (...)`` or ``CORRUPT: what; what``."""
        if self.status == "ok":
            return f"OK ({self.files} files, {_human(self.size)}, {ALGORITHM} verified)"
        if self.status == "unverified":
            return (
                f"UNVERIFIED: no {MANIFEST_FILE} (written without checksums, or the save "
                f"stopped before them); {self.files} shard files present, contents not verifiable"
            )
        return f"{self.status.upper()}: {'; '.join(self.problems)}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Verification:
    """Verification in two halves so the hashing in between can be spread over ranks:
    ``names`` (what to hash), then ``finish(sums)``. Read-only."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.problems: list[str] = []
        self.names: list[str] = []
        self.manifest: dict[str, FileSum] | None = None
        self.needed: dict[str, int] = {}  # shard file -> bytes the metadata needs
        if not (self.path / METADATA_FILE).is_file():
            if (self.path / MANIFEST_FILE).is_file():  # it was finished: the file was lost
                self.status = "corrupt"
                self.problems.append(f"{METADATA_FILE}: missing (listed in {MANIFEST_FILE})")
            else:
                self.status = "incomplete"
                self.problems.append(f"no {METADATA_FILE} (a save that did not finish)")
            return
        self.status = "pending"
        if (self.path / MANIFEST_FILE).is_file():
            try:
                self.manifest = read_manifest(self.path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.problems.append(f"{MANIFEST_FILE}: unreadable ({_describe(e)})")
        try:
            from blip_recipes.checkpoint.safe_read import read_metadata  # imports this module

            storage = read_metadata(self.path).storage_data
            for info in storage.values():
                end = int(info.offset) + int(info.length)
                self.needed[info.relative_path] = max(self.needed.get(info.relative_path, 0), end)
        except Exception as e:  # a truncated or damaged pickle raises many kinds of errors
            self.problems.append(f"{METADATA_FILE}: unreadable metadata ({_describe(e)})")
        if self.manifest is not None:
            self.names = sorted(self.manifest)

    def finish(self, sums: Mapping[str, Union[FileSum, str]]) -> CheckpointReport:
        problems = list(self.problems)
        if self.status != "pending":
            return CheckpointReport(self.path, self.status, problems)
        total = 0
        if self.manifest is not None:
            for name, expected in sorted(self.manifest.items()):
                got = sums.get(name, "not checked")
                if not isinstance(got, FileSum):
                    problems.append(f"{name}: {got}")
                elif got.size != expected.size:
                    what = "truncated" if got.size < expected.size else "grown"
                    problems.append(
                        f"{name}: size mismatch ({got.size} bytes, {expected.size} in "
                        f"{MANIFEST_FILE}: {what})"
                    )
                elif got.crc32 != expected.crc32:
                    problems.append(
                        f"{name}: hash mismatch ({ALGORITHM} {got.crc32}, {expected.crc32} in "
                        f"{MANIFEST_FILE}: contents changed)"
                    )
                else:
                    total += got.size
            for name in sorted(set(self.needed) - set(self.manifest)):
                problems.append(f"{name}: used by {METADATA_FILE} but not in {MANIFEST_FILE}")
            status = "corrupt" if problems else "ok"
            files = len(self.manifest)
        else:
            for name, needed in sorted(self.needed.items()):
                try:
                    size = (self.path / name).stat().st_size
                except FileNotFoundError:
                    problems.append(f"{name}: missing")
                    continue
                except OSError as e:
                    problems.append(f"{name}: unreadable ({e.strerror or e})")
                    continue
                if size < needed:
                    problems.append(
                        f"{name}: size mismatch ({size} bytes, {METADATA_FILE} needs {needed}: "
                        "truncated)"
                    )
                total += size
            status = "corrupt" if problems else "unverified"
            files = len(self.needed)
        return CheckpointReport(self.path, status, problems, files=files, size=total)


def verify_checkpoint(path: PathLike) -> CheckpointReport:
    """Check one ``step-N`` folder against its manifest (in this process, read-only)."""
    check = _Verification(path)
    return check.finish(checksum_files(check.path, check.names))


def step_dirs(folder: PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-N`` folders directly inside ``folder``, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def step_folders(path: PathLike) -> list[Path]:
    """The checkpoints a path names: itself when it is one checkpoint folder (named ``step-N``,
    or holding DCP metadata, a manifest or shard files), else the ``step-N`` folders inside it
    or inside its ``checkpoints/`` (an output folder)."""
    path = Path(path)
    if STEP_DIR.match(path.name) or any(
        (path / name).exists() for name in (METADATA_FILE, MANIFEST_FILE)
    ):
        return [path]
    if path.is_dir() and any(path.glob("*.distcp")):
        return [path]
    for folder in (path, path / "checkpoints"):
        found = step_dirs(folder)
        if found:
            return [p for _, p in found]
    return []


def nonfinite_tensors(state_dicts: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """Names of this rank's floating-point tensors under ``keys`` that hold a NaN or Inf.

    Cheap: one ``torch._foreach_norm`` over the local shards (a DTensor's ``to_local()``, so no
    communication), accumulated in float32, then one host sync. A norm that overflows float32
    (weights around 1e19) counts as non-finite too; such a model is broken anyway.
    """
    from torch.distributed.tensor import DTensor

    names, tensors = [], []
    for key in keys:
        if key not in state_dicts:
            continue
        flat, _ = flatten_state_dict({key: state_dicts[key]})
        for name, value in flat.items():
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                names.append(name)
                tensors.append(value.detach())
    if not tensors:
        return []
    try:
        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without foreach
        norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    device = norms[0].device
    finite = torch.isfinite(torch.stack([n.to(device) for n in norms])).cpu().tolist()
    return [name for name, ok in zip(names, finite) if not ok]
