"""NoCaps-style caption evaluation: a split's images, the submission file the official
evaluation server takes, and BLEU / CIDEr-D overall and per domain where references are given.

NoCaps images come in three domains by how their objects relate to COCO's classes: `in-domain`
(only COCO classes), `near-domain` (COCO and novel classes), `out-domain` (only novel classes).
The server scores a submission on the whole split and on each domain; here each domain is
scored as a corpus of its own (its images' references define CIDEr's document frequencies), as
scoring the domain's subset alone does. SPICE, which the server also reports, needs Java and is
not computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_recipes.evaluation.caption_metrics import caption_scores

DOMAINS = ("in-domain", "near-domain", "out-domain")
"""NoCaps's domain names, in report order (other names follow, sorted)."""
OVERALL = "overall"


@dataclass
class NocapsData:
    """A split to caption.

    Attributes:
        images: image paths (joined with the image root).
        image_ids: the integer id written with each image's caption.
        references: each image's reference captions, or None for a split without them (test).
        domains: each image's domain, or None when the annotation does not say.
    """

    images: list[str]
    image_ids: list[int]
    references: list[list[str]] | None = None
    domains: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not n:
            raise ValueError("a NoCaps split needs at least one image")
        for name in ("image_ids", "references", "domains"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{n} images but {len(value)} {name}")


def _as_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: image id {value!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: image id {value!r} is not an integer") from None


def _captions(value: Any, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'caption' must be a text or a list of texts")
    return captions


def _from_records(records: list[Any], path: Path) -> tuple[list, list, list, list]:
    """The reference's list format: `{"image", "img_id" | "image_id", "caption"?, "domain"?}`."""
    images, ids, refs, domains = [], [], [], []
    for number, record in enumerate(records):
        where = f"{path} record {number}"
        if not isinstance(record, dict) or "image" not in record:
            raise ValueError(f"{where}: expected an object with an 'image' path")
        key = "img_id" if "img_id" in record else "image_id" if "image_id" in record else None
        if key is None:
            raise ValueError(f"{where}: no image id: expected 'img_id' or 'image_id'")
        images.append(str(record["image"]))
        ids.append(_as_id(record[key], where))
        caps = record.get("caption", record.get("captions"))
        refs.append(None if caps is None else _captions(caps, where))
        domains.append(record.get("domain"))
    return images, ids, refs, domains


def _from_coco(doc: dict, path: Path) -> tuple[list, list, list, list]:
    """The official files: `{"images": [{"id", "file_name", "domain"}], "annotations":
    [{"image_id", "caption"}]}` (annotations absent for the test split)."""
    images, ids, domains = [], [], []
    for number, entry in enumerate(doc["images"]):
        where = f"{path} images[{number}]"
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            raise ValueError(f"{where}: expected an object with 'id' and 'file_name'")
        images.append(str(entry["file_name"]))
        ids.append(_as_id(entry["id"], where))
        domains.append(entry.get("domain"))
    annotations = doc.get("annotations")
    if not annotations:
        return images, ids, [None] * len(ids), domains
    by_id: dict[int, list[str]] = {i: [] for i in ids}
    for number, ann in enumerate(annotations):
        where = f"{path} annotations[{number}]"
        image_id = _as_id(ann.get("image_id") if isinstance(ann, dict) else None, where)
        if image_id not in by_id:
            raise ValueError(f"{where}: image_id {image_id} is not in 'images'")
        by_id[image_id] += _captions(ann.get("caption"), where)
    return images, ids, [by_id[i] or None for i in ids], domains


def load_nocaps_data(annotation: str | os.PathLike, image_root: str = "") -> NocapsData:
    """Read NoCaps-style annotations: the reference's list of `{"image", "img_id"}` records
    (optionally with `"caption"`: text or list, and `"domain"`), or the official
    `{"images": [...], "annotations": [...]}` file.

    References must be given for every image or for none; the same for domains.

    Raises:
        ValueError: naming the file and the first record that does not fit.
    """
    path = Path(annotation)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(doc, dict) and "images" in doc:
        images, ids, refs, domains = _from_coco(doc, path)
    elif isinstance(doc, list):
        images, ids, refs, domains = _from_records(doc, path)
    else:
        raise ValueError(
            f"{path}: expected a list of {{'image', 'img_id'}} records or an object with 'images'"
        )
    for name, values in (("reference captions", refs), ("a domain", domains)):
        given = sum(v is not None for v in values)
        if 0 < given < len(values):
            first = next(i for i, v in enumerate(values) if v is None)
            raise ValueError(
                f"{path}: {given} of {len(values)} images have {name}; image id {ids[first]} "
                "has none (give them for every image or for none)"
            )
    root = Path(image_root) if image_root else None
    return NocapsData(
        images=[str(root / p) if root is not None else p for p in images],
        image_ids=ids,
        references=refs if refs and refs[0] is not None else None,
        domains=[str(d) for d in domains] if domains and domains[0] is not None else None,
    )


def submission(image_ids: list[int], captions: list[str]) -> list[dict[str, Any]]:
    """`[{"image_id": int, "caption": str}]` in split order, one entry per image id (the first
    caption of a repeated id, as the reference's `remove_duplicate`): the server's format."""
    if len(image_ids) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(image_ids)} image ids")
    seen: set[int] = set()
    out = []
    for image_id, caption in zip(image_ids, captions):
        if image_id not in seen:
            seen.add(image_id)
            out.append({"image_id": int(image_id), "caption": str(caption)})
    return out


def write_submission(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the submission JSON beside `path` and rename it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records) + "\n")
    os.replace(tmp, path)
    return path


def _domain_order(domains: list[str]) -> list[str]:
    present = set(domains)
    return [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))


def nocaps_scores(
    captions: list[str], references: list[list[str]], domains: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """BLEU-1..4 and CIDEr-D of one caption per image, overall and per domain.

    Args:
        captions: the generated caption of each image.
        references: each image's reference captions (at least one).
        domains: each image's domain; None reports `overall` only.

    Returns:
        `{"overall": {"Bleu_1".."Bleu_4", "CIDEr", "images"}, "in-domain": {...}, ...}`,
        fractions as coco-caption returns them (CIDEr on its x 10 scale, papers report x 100).
    """
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions for {len(references)} images")
    groups = {OVERALL: list(range(len(captions)))}
    if domains is not None:
        for domain in _domain_order(domains):
            groups[domain] = [i for i, d in enumerate(domains) if d == domain]
    out: dict[str, dict[str, float]] = {}
    for name, rows in groups.items():
        scores = caption_scores({i: captions[i] for i in rows}, {i: references[i] for i in rows})
        out[name] = {**scores, "images": float(len(rows))}
    return out


__all__ = [
    "DOMAINS",
    "OVERALL",
    "NocapsData",
    "load_nocaps_data",
    "nocaps_scores",
    "submission",
    "write_submission",
]
