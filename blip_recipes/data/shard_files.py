"""Which shards a source names and how many samples they hold.

Shards are local paths or remote URLs (``s3://``, ``gs://``, ``https://``, ``pipe:CMD``; see
:mod:`.remote`), with ``{000..099}`` brace ranges. The dataset size comes from ``sizes.json`` or
img2dataset's ``NNNNN_stats.json`` beside them (:func:`shard_sizes`).
"""

from __future__ import annotations

import json
import os
import re

from blip_recipes.data.remote import is_remote, local_path, read_small

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00127}`` ranges (zero padding kept) and ``{a,b}`` lists.

    Example:
        >>> expand_braces("s-{000..002}.tar")
        ['s-000.tar', 's-001.tar', 's-002.tar']
    """
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def list_shards(paths: list[str]) -> list[str]:
    """Shard files or URLs of a source: brace patterns expanded, local files checked to exist."""
    shards = [p for pattern in paths for p in expand_braces(pattern)]
    missing = [p for p in shards if not is_remote(p) and not os.path.exists(local_path(p))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    if not shards:
        raise ValueError("no shards listed")
    return shards


def _parent(url: str) -> tuple[str, str]:
    head, sep, name = url.rpartition("/")
    return (head + sep, name)


def shard_sizes(shards: list[str]) -> tuple[dict[str, int], list[str]]:
    """Samples per shard from the files beside the shards: ``sizes.json`` (open_clip's
    ``{"shard-00000.tar": 1000, ...}``), else img2dataset's ``NNNNN_stats.json`` (``successes``).

    Returns ``({shard: size}, [shards of unknown size])``; ``pipe:`` shards are always unknown.
    """
    from concurrent.futures import ThreadPoolExecutor

    folders: dict[str, dict | None] = {}

    def sizes_file(folder: str) -> dict | None:
        if folder not in folders:
            raw = read_small(folder + "sizes.json")
            folders[folder] = json.loads(raw) if raw is not None else None
        return folders[folder]

    def one(shard: str) -> int | None:
        if shard.startswith("pipe:"):
            return None
        folder, name = _parent(shard)
        table = sizes_file(folder)
        if isinstance(table, dict) and name in table:
            return int(table[name])
        stem = name[: -len(".tar")] if name.endswith(".tar") else name
        raw = read_small(f"{folder}{stem}_stats.json")
        if raw is None:
            return None
        stats = json.loads(raw)
        return int(stats["successes"]) if isinstance(stats, dict) and "successes" in stats else None

    for folder in {_parent(s)[0] for s in shards if not s.startswith("pipe:")}:
        sizes_file(folder)
    remote = any(is_remote(s) for s in shards)
    with ThreadPoolExecutor(16 if remote else 1) as pool:
        found = list(pool.map(one, shards))
    known = {s: n for s, n in zip(shards, found) if n is not None}
    return known, [s for s, n in zip(shards, found) if n is None]


def dataset_size(shards: list[str]) -> int | None:
    """Total samples of the shards (see :func:`shard_sizes`); None if any shard's size is unknown."""
    known, unknown = shard_sizes(shards)
    return None if unknown else sum(known.values())


__all__ = ["dataset_size", "expand_braces", "list_shards", "shard_sizes"]
