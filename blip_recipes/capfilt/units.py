"""Work units of a CapFilt run: how the inputs are cut into units, which rank runs which unit,
and the web image-text pairs a unit holds.

A unit is one input tar shard, or ``unit_size`` consecutive records of the JSON/JSONL inputs
(the files taken in the order given, as one sequence). Units are numbered 0, 1, ... in input
order; rank ``r`` of ``W`` runs units ``r, r + W, r + 2W, ...``. What a unit produces depends on
the unit alone (never on the rank or the world size), so any layout yields the same output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

InputKind = Literal["json", "jsonl", "shards"]


@dataclass(frozen=True)
class WebPair:
    """One web image and its caption(s).

    Attributes:
        key: the image as the output names it: the annotation's ``image`` path (relative to
            ``capfilt.image_root``), or the shard sample's key.
        image: what to open (a path joined with the image root, or the image bytes of a shard
            sample); None when a shard sample has no image member.
        image_ext: extension of a shard sample's image member ("jpg", ...); "" for annotations.
        captions: the web captions (an annotation's list, or its one caption).
        origin: names the sample in logs and statistics (``file/path`` or ``shard/key``).
    """

    key: str
    image: str | bytes | None
    image_ext: str
    captions: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class WorkUnit:
    """Unit ``index``: a shard (``source`` = its path or URL) or records ``[start, stop)`` of the
    annotation inputs (``source`` = "records START-STOP")."""

    index: int
    kind: InputKind
    source: str
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        """``unit-00042``: the stem of the unit's files."""
        return f"unit-{self.index:05d}"


def input_kind(paths: Sequence[str], kind: str = "auto") -> InputKind:
    """The kind of the inputs: ``kind`` itself, or (auto) from the suffixes, which must agree.

    Raises:
        ValueError: naming the inputs whose kind cannot be told or that mix kinds.
    """
    if kind != "auto":
        return kind  # type: ignore[return-value]
    kinds = set()
    for path in paths:
        base = path.split("?", 1)[0]
        if base.endswith(".jsonl"):
            kinds.add("jsonl")
        elif base.endswith(".json"):
            kinds.add("json")
        elif base.endswith(".tar") or base.startswith("pipe:"):
            kinds.add("shards")
        else:
            raise ValueError(
                f"capfilt.inputs: cannot tell the kind of {path!r} from its suffix (.json, "
                ".jsonl or .tar): set capfilt.input_kind"
            )
    if len(kinds) != 1:
        raise ValueError(
            f"capfilt.inputs mix kinds ({', '.join(sorted(kinds))}): run annotations and shards "
            "separately"
        )
    return kinds.pop()  # type: ignore[return-value]


def _captions(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(c for c in value if isinstance(c, str))
    return ()


class AnnotationInputs:
    """The records of JSON/JSONL annotation files, cut into units of ``unit_size``.

    One pass over the files counts the records and keeps those of the units ``keep`` accepts
    (a rank keeps only its own units' records in memory).

    Args:
        paths: BLIP annotation files (``{"image": path, "caption": text | [texts]}``).
        image_root: folder the image paths are relative to.
        unit_size: records per unit.
        keep: which unit indices' records to hold; None holds every unit's.
        kind: "json" or "jsonl" (recorded in the units).
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_root: str,
        unit_size: int,
        keep: Callable[[int], bool] | None = None,
        kind: InputKind = "json",
    ) -> None:
        from blip_recipes.data.sources import iter_annotations

        if unit_size <= 0:
            raise ValueError(f"capfilt.unit_size must be positive, got {unit_size}")
        self.image_root, self.unit_size, self.kind = image_root, unit_size, kind
        self.records: dict[int, list[tuple[str, object, str]]] = {}
        count = 0
        for path in paths:
            for number, (image, caption) in enumerate(iter_annotations(path)):
                unit = count // unit_size
                if keep is None or keep(unit):
                    where = f"{os.path.basename(path)}:{number}"
                    self.records.setdefault(unit, []).append((str(image), caption, where))
                count += 1
        self.num_records = count

    def units(self) -> list[WorkUnit]:
        """Every unit, in order."""
        n = -(-self.num_records // self.unit_size)
        return [
            WorkUnit(u, self.kind, f"records {u * self.unit_size}-"
                     f"{min(self.num_records, (u + 1) * self.unit_size)}",
                     u * self.unit_size, min(self.num_records, (u + 1) * self.unit_size))
            for u in range(n)
        ]  # fmt: skip

    def pairs(self, unit: WorkUnit) -> Iterator[WebPair]:
        """The unit's web pairs, in record order (the unit must be one this object keeps)."""
        if unit.index not in self.records and unit.stop > unit.start:
            raise KeyError(f"records of {unit.name} were not loaded on this rank")
        for image, caption, where in self.records.get(unit.index, []):
            path = os.path.join(self.image_root, image)
            yield WebPair(image, path, "", _captions(caption), f"{where} ({image})")


def shard_units(paths: Sequence[str]) -> list[WorkUnit]:
    """One unit per shard (brace patterns expanded, local shards checked to exist)."""
    from blip_recipes.data.shard_files import list_shards

    return [WorkUnit(i, "shards", shard) for i, shard in enumerate(list_shards(list(paths)))]


def shard_pairs(unit: WorkUnit) -> Iterator[WebPair]:
    """The web pairs of a shard unit, in member order. A sample without an image member comes
    with ``image=None``; an unreadable caption gives no captions (both are then bad images)."""
    import json

    from blip_recipes.data.tar_format import IMAGE_EXTENSIONS, decode_caption, iter_tar_samples

    name = os.path.basename(unit.source)
    for key, files, _start, _next in iter_tar_samples(unit.source):
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), "")
        try:
            captions = _captions(decode_caption(files))
        except (ValueError, UnicodeError, json.JSONDecodeError):
            captions = ()
        image = files[ext] if ext else None
        yield WebPair(key, image, ext, captions, f"{name}/{key}")


def units_of_rank(units: Sequence[WorkUnit], rank: int, world_size: int) -> list[WorkUnit]:
    """Rank ``rank``'s units: ``rank, rank + world_size, ...`` (round robin over unit order)."""
    return list(units[rank::world_size])


__all__ = [
    "AnnotationInputs",
    "InputKind",
    "WebPair",
    "WorkUnit",
    "input_kind",
    "shard_pairs",
    "shard_units",
    "units_of_rank",
]
