"""The webdataset tar format, read without extracting and written atomically.

A shard holds samples as consecutive members sharing a key: ``KEY.jpg|jpeg|png|webp`` and
``KEY.txt`` (the caption) or ``KEY.json`` (with a ``caption`` string or list), which is also the
layout of img2dataset's ``--output_format webdataset`` output. Reading groups members by key,
reports damage found while scanning (:class:`ShardDamage`) and gives each sample a stable image
id from its shard and key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

from blip_recipes.data.remote import is_remote, local_path, open_shard

logger = logging.getLogger("blip_recipes.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_key(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1 :].lower()


class ShardDamage(NamedTuple):
    """A part of a shard that could not be read: from byte ``start`` to the next intact member
    header at ``end`` (None: to the end of the file), and why."""

    start: int
    end: int | None
    reason: str

    def describe(self) -> str:
        where = f"byte {self.start}"
        rest = "the rest of the shard" if self.end is None else f"skipped to byte {self.end}"
        return f"{self.reason} at {where} ({rest})"


def _scanning_tarinfo(problems: list[tuple[int, Exception]], base: int) -> type[tarfile.TarInfo]:
    """A TarInfo class recording (offset + ``base``, error) of every header block that did not
    parse: tarfile skips them quietly (``ignore_zeros``) or, without it, ends the archive there
    without a word."""

    class Scanning(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            at = base + tar.offset
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as e:
                problems.append((at, e))
                raise

    return Scanning


def _header_damage(problems, start: int, end: int | None) -> ShardDamage | None:
    """The damage among the unparsed header blocks in ``[start, end)``, if any (blocks of zeros
    alone are padding, or the end-of-archive marker)."""
    bad = [(at, e) for at, e in problems if at >= start and (end is None or at < end)]
    zeros = [at for at, e in bad if isinstance(e, tarfile.EOFHeaderError)]
    padding = (tarfile.EOFHeaderError, tarfile.EmptyHeaderError)  # zero block, end of file
    broken = [(at, e) for at, e in bad if not isinstance(e, padding)]
    if broken:
        at, e = broken[0]
        if isinstance(e, tarfile.TruncatedHeaderError):
            return ShardDamage(at, None, "truncated (the file ends inside a member header)")
        return ShardDamage(at, end, f"damaged tar header ({e})")
    if end is not None:  # zero blocks between members: a zeroed region (or concatenated tars)
        return ShardDamage(start, end, "zeroed bytes between members") if zeros else None
    if len(zeros) < 2:  # the end-of-archive marker is two zero blocks
        return ShardDamage(start, None, "truncated (no end-of-archive marker)")
    return None


def iter_tar_samples(
    path: str, offset: int = 0, on_damage: Callable[[ShardDamage], None] | None = None
) -> Iterator[tuple[str, dict, int, int]]:
    """Yield ``(key, {ext: bytes}, start_offset, next_offset)`` for each sample from ``offset``.

    ``path`` is a local file or a remote URL (:mod:`.remote`, read as a forward stream).
    ``offset`` must be a member header offset (0 or a previous ``next_offset``). A damaged
    header is skipped up to the next intact member header; a truncated file ends the shard.
    Each damaged part is passed to ``on_damage`` (default: a warning); a sample with members on
    both sides of one comes out incomplete (a bad sample downstream). A remote shard that
    cannot be read raises :class:`~blip_recipes.data.remote.RemoteShardError`.
    """
    if on_damage is None:

        def on_damage(damage: ShardDamage) -> None:
            logger.warning("shard %s: %s", path, damage.describe())

    size = None
    if is_remote(path):
        f, mode, base = open_shard(path, offset), "r|", offset  # stream offsets start at 0
    else:
        f, mode, base = open(local_path(path), "rb"), "r:", 0
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
    problems: list[tuple[int, Exception]] = []
    with f:
        try:
            tar = tarfile.open(
                fileobj=f, mode=mode, ignore_zeros=True, tarinfo=_scanning_tarinfo(problems, base)
            )
        except tarfile.ReadError as e:
            on_damage(ShardDamage(offset, None, f"not a readable tar file ({e})"))
            return
        key, files, start = None, {}, offset
        expected = offset  # where the next member header should start
        try:
            for info in tar:
                at = base + info.offset
                if at != expected and (damage := _header_damage(problems, expected, at)):
                    on_damage(damage)
                expected = base + tar.offset
                if not info.isfile():
                    continue
                k, ext = _split_key(info.name)
                if k != key:
                    if key is not None:
                        yield key, files, start, at
                    key, files, start = k, {}, at
                files[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            on_damage(ShardDamage(start, None, f"truncated or unreadable ({e})"))
            return
        damage = _header_damage(problems, expected, None)
        if damage is not None and size is not None and expected > size:
            damage = ShardDamage(start, None, "truncated (the file ends inside a member)")
        if damage is not None:
            on_damage(damage)
        if key is not None:
            yield key, files, start, -1  # -1: end of shard


def shard_image_id(shard: str, key: str) -> int:
    """Image id of a shard sample: a stable 63-bit hash of ``"<shard basename>/<key>"`` (BLAKE2b,
    the same in every process and Python version, unlike the salted builtin ``hash``)."""
    text = f"{os.path.basename(shard)}/{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def decode_caption(files: dict) -> object:
    """Caption text (or list) of a shard sample from its ``txt`` member, else the ``caption``
    field of its ``json`` member (img2dataset's ``json`` is per-sample metadata: url, status,
    sizes... only its ``caption`` is used)."""
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace")
    if "json" in files:
        meta = json.loads(files["json"])
        return meta.get("caption", "") if isinstance(meta, dict) else ""
    return ""


def write_shard(path: str, samples: list[tuple[str, bytes, str, str]]) -> None:
    """Write ``(key, image bytes, image extension, caption)`` samples to ``path`` atomically
    (a temporary file renamed at the end, so a shard is never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w") as tar:
        for key, data, ext, caption in samples:
            for name, payload in (
                (f"{key}.{ext}", data),
                (f"{key}.txt", caption.encode("utf-8")),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)


__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardDamage",
    "decode_caption",
    "iter_tar_samples",
    "shard_image_id",
    "write_shard",
]
