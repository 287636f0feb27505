"""Map-style annotation sources (BLIP JSON, JSONL, synthetic) and retrieval eval annotations.

A map-style source has ``len(source)`` and ``source.get(index, rng) -> (image_ref, caption,
origin)``, where ``image_ref`` is a path, bytes or a PIL image (opened lazily by the transform),
``caption`` the raw text (one drawn with ``rng`` when the annotation holds a list) and ``origin``
names the sample in warnings. ``source.image_id(index)`` is the sample's image as a dense int in
``[0, source.num_images)``: two samples share it iff they show the same image (JSON/JSONL: the
record's ``image_id`` field when present, else its image path, numbered in order of first
appearance over the source's files; synthetic: the sample index).
"""

from __future__ import annotations

import json
import logging
import os
import random
from array import array
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from blip_recipes.config.sections import DataSourceConfig
from blip_recipes.data.packed import PackedStrings

logger = logging.getLogger("blip_recipes.data")


class MapSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    @property
    def num_images(self) -> int: ...

    def get(self, index: int, rng: random.Random) -> tuple[object, str, str]: ...

    def image_id(self, index: int) -> int: ...


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is."""


def _image_and_caption(record, where: str) -> tuple[str, object]:
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object with 'image' and 'caption'")
    if "image" not in record:
        if "url" in record:
            raise AnnotationError(
                f"{where}: has 'url' but no 'image'. BLIP pretraining reads local files: download "
                "the images first (e.g. with img2dataset), then write each local path, relative to "
                "data.sources.N.image_root, into an 'image' field (or build tar shards with "
                "tools/build_shards.py)"
            )
        raise AnnotationError(f"{where}: missing 'image' (keys: {sorted(record)})")
    if "caption" not in record:
        raise AnnotationError(f"{where}: missing 'caption' (keys: {sorted(record)})")
    return record["image"], record["caption"]


def _pick_caption(caption, rng: random.Random) -> str:
    if isinstance(caption, list):
        return rng.choice(caption) if caption else ""
    return caption if isinstance(caption, str) else ""


def _image_key(record: dict, image: object, where: str) -> object:
    """What identifies the record's image: its ``image_id`` field when present, else its path."""
    if "image_id" not in record:
        return ("image", image)
    key = record["image_id"]
    if not isinstance(key, (int, str)) or isinstance(key, bool):
        raise AnnotationError(
            f"{where}: 'image_id' must be an integer or a string, got {type(key).__name__}"
        )
    return key


def iter_records(path: str) -> Iterator[tuple[str, object, object]]:
    """(image path, caption or captions, image key) of every record of a BLIP annotation file.

    The image key is the record's ``image_id`` (int or str) when present, else ``("image",
    path)``: equal keys mean the same image. ``.jsonl`` files are read a line at a time, anything
    else as one JSON list.

    Raises:
        AnnotationError: naming the file and the record or line that is not an annotation.
        OSError: when the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path} line {number}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise AnnotationError(f"{where}: not JSON ({e})") from None
                    image, caption = _image_and_caption(record, where)
                    yield image, caption, _image_key(record, image, where)
            return
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            hint = " (JSON Lines files need the .jsonl suffix)" if e.msg == "Extra data" else ""
            raise AnnotationError(f"{path}: not a JSON list of annotations: {e}{hint}") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of annotations")
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        image, caption = _image_and_caption(record, where)
        yield image, caption, _image_key(record, image, where)


def iter_annotations(path: str) -> Iterator[tuple[str, object]]:
    """(image path, caption or captions) of every record of a BLIP annotation file (see
    :func:`iter_records`)."""
    for image, caption, _ in iter_records(path):
        yield image, caption


class DenseIds:
    """Numbers hashable keys 0, 1, 2, ... in order of first appearance."""

    def __init__(self) -> None:
        self._ids: dict[object, int] = {}

    def __call__(self, key: object) -> int:
        return self._ids.setdefault(key, len(self._ids))

    def __len__(self) -> int:
        return len(self._ids)


def _compact_ids(ids) -> np.ndarray:
    """Dense ids as int32 (4 bytes a sample) when they fit, else int64."""
    dtype = np.int32 if len(ids) < 2**31 else np.int64
    return np.asarray(ids, dtype=dtype)


class JsonSource:
    """BLIP JSON annotations: lists of ``{"image": path, "caption": text | [texts]}`` from files.

    Records are kept compactly (:class:`~blip_recipes.data.packed.PackedStrings`: each record as
    the JSON text of ``[image, caption]``, zlib-compressed in blocks) with int32 image ids, a few
    dozen bytes a COCO-like record instead of several hundred as Python objects (measurements in
    ``docs/data.md``). Loading still parses each file whole (``json.load``), so the peak while
    loading is that of the file's objects; JSON Lines files avoid it.

    Args:
        paths: annotation files, concatenated in order.
        image_root: folder the image paths are relative to (absolute paths are kept).
    """

    def __init__(self, paths: list[str], image_root: str = "") -> None:
        self.image_root = image_root
        records = PackedStrings()
        dense, ids = DenseIds(), array("q")
        for path in paths:
            for image, caption, key in iter_records(path):
                records.append(json.dumps([image, caption], ensure_ascii=False))
                ids.append(dense(key))
        self.records = records.finish()
        self.image_ids = _compact_ids(ids)
        self.num_images = len(dense)
        self.name = f"json[{', '.join(os.path.basename(p) for p in paths)}]"

    def __len__(self) -> int:
        return len(self.records)

    @property
    def nbytes(self) -> int:
        """Bytes of annotation data held (records and image ids)."""
        return self.records.nbytes + self.image_ids.nbytes

    def image_id(self, index: int) -> int:
        return int(self.image_ids[index])

    def get(self, index: int, rng: random.Random) -> tuple[object, str, str]:
        image, caption = json.loads(self.records[index])
        path = os.path.join(self.image_root, image)
        return path, _pick_caption(caption, rng), path


def _parse_line(line: bytes, where: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for an annotation line, else ``(None, what is wrong)`` naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, (
            f"{where}: not JSON ({e.msg} at character {e.pos + 1}); expected one object per "
            "line with 'image' and 'caption'"
        )
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 text ({e.reason} at byte {e.start})"
    try:
        _image_and_caption(record, where)
    except AnnotationError as e:
        return None, str(e)
    return record, None


class JsonlSource:
    """JSON Lines annotations (one object per line), indexed by byte offsets and parsed on access.

    Only the line offsets (int64) and image ids (int32) stay in memory, 12 bytes a sample, so
    annotation files far larger than what ``json.load`` could hold work. Every line is parsed
    once up front for its image id. The first line of each file must be an annotation (else
    :class:`AnnotationError` names the file, the line and what was expected); any other line
    that is not one is counted with a warning naming the first, and becomes a bad sample
    (named by file and line) when read, each its own image.
    """

    def __init__(self, paths: list[str], image_root: str = "") -> None:
        self.image_root = image_root
        self.paths = list(paths)
        offsets, ids, dense = array("q"), array("q"), DenseIds()
        file_starts = [0]
        self.bad_lines: dict[int, tuple[str, str]] = {}  # index -> (file and line, problem)
        for path in self.paths:
            bad_before, first_bad = len(self.bad_lines), None
            with open(path, "rb") as f:
                pos = 0
                first = True
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        where = f"{path} line {number}"
                        record, problem = _parse_line(line, where)
                        if first and problem:
                            raise AnnotationError(problem)
                        first = False
                        key: object = ("line", where)
                        if problem:
                            self.bad_lines[len(offsets)] = (where, problem[len(where) + 2 :])
                            first_bad = first_bad or problem
                        else:
                            try:
                                key = _image_key(record, record["image"], where)
                            except AnnotationError:
                                pass
                        offsets.append(pos)
                        ids.append(dense(key))
                    pos += len(line)
            if first_bad:
                logger.warning(
                    "%s: %d line(s) are not annotations and will be bad samples; first: %s",
                    path, len(self.bad_lines) - bad_before, first_bad,
                )  # fmt: skip
            file_starts.append(len(offsets))
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.file_starts = np.asarray(file_starts, dtype=np.int64)
        self.image_ids = _compact_ids(ids)
        self.num_images = len(dense)
        self.name = f"jsonl[{', '.join(os.path.basename(p) for p in paths)}]"

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes of index held (line offsets and image ids)."""
        return self.offsets.nbytes + self.file_starts.nbytes + self.image_ids.nbytes

    def image_id(self, index: int) -> int:
        return int(self.image_ids[index])

    def get(self, index: int, rng: random.Random) -> tuple[object, str, str]:
        if index in self.bad_lines:
            from blip_recipes.data.transforms import BadImage

            where, problem = self.bad_lines[index]
            error = BadImage(f"{where}: {problem}")
            error.origin, error.reason = where, problem
            raise error
        file_id = int(np.searchsorted(self.file_starts, index, side="right")) - 1
        path = self.paths[file_id]
        with open(path, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline()
        try:
            image, caption = _image_and_caption(json.loads(line), f"{path} sample {index}")
        except (AnnotationError, json.JSONDecodeError) as e:
            from blip_recipes.data.transforms import BadImage

            raise BadImage(f"bad annotation: {e}") from e
        image_path = os.path.join(self.image_root, image)
        return image_path, _pick_caption(caption, rng), image_path


def build_map_source(cfg: DataSourceConfig, seed: int) -> MapSource:
    """The map-style source of one ``[[data.sources]]`` table (not for ``shards``)."""
    if cfg.kind == "synthetic":
        from blip_recipes.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.num_samples, seed, cfg.image_size)
    missing = [p for p in cfg.paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data source kind '{cfg.kind}': annotation file(s) not found: {', '.join(missing)} "
            "(data.sources.N.paths lists local BLIP JSON/JSONL files)"
        )
    if cfg.kind == "json":
        return JsonSource(cfg.paths, cfg.image_root)
    if cfg.kind == "jsonl":
        return JsonlSource(cfg.paths, cfg.image_root)
    raise ValueError(f"source kind '{cfg.kind}' is not map-style")


def load_retrieval_annotations(
    path: str, image_root: str = ""
) -> tuple[list[str], list[str], list[int], list[list[int]]]:
    """COCO-Karpathy-style eval annotations -> ``(image_paths, captions, txt2img, img2txt)``.

    The file is a JSON list of ``{"image": path, "caption": [texts]}`` (a single string is also
    accepted). Captions are kept raw (apply :func:`pre_caption` as the recipe needs).

    Returns:
        image_paths: one per image, joined with ``image_root``.
        captions: all captions, image by image.
        txt2img: for each caption, the index of its image.
        img2txt: for each image, the indices of its captions.
    """
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    images, captions, txt2img, img2txt = [], [], [], []
    for i, record in enumerate(records):
        image, caps = _image_and_caption(record, f"{path} record {i}")
        caps = [caps] if isinstance(caps, str) else list(caps)
        images.append(os.path.join(image_root, image))
        img2txt.append(list(range(len(captions), len(captions) + len(caps))))
        txt2img.extend([i] * len(caps))
        captions.extend(caps)
    return images, captions, txt2img, img2txt
