"""BLIP URL annotations -> the input file of img2dataset, which downloads them into shards.

BLIP's web-data annotation files (JSON lists, or JSON Lines with a ``.jsonl`` suffix) hold
``{"url": ..., "caption": ...}`` records. :func:`write_img2dataset_input` writes their ``url`` and
``caption`` columns as CSV, TSV or JSON Lines (chosen by the output suffix), the formats that
img2dataset reads with ``--input_format csv|tsv|jsonl`` and no extra dependency. A caption list
keeps its first caption (img2dataset stores one caption per sample). The resulting shards are
read by the ``shards`` data source as they are: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per
sample and ``NNNNN_stats.json`` per shard (the dataset size).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from blip_recipes.data.sources import AnnotationError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


@dataclass
class ConversionStats:
    rows: int = 0
    """Rows written."""
    skipped: int = 0
    """Records without a usable url or caption."""
    caption_lists: int = 0
    """Records whose caption list was cut to its first caption."""


def input_format(out: str) -> str:
    """img2dataset's ``--input_format`` for an output path (by suffix)."""
    for suffix, fmt in FORMATS.items():
        if out.endswith(suffix):
            return fmt
    raise ValueError(f"{out}: the output must end in one of {', '.join(FORMATS)}")


def iter_url_records(path: str) -> Iterator[dict]:
    """The JSON records of a BLIP annotation file (``.jsonl``: one per line; else a list)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise AnnotationError(f"{path} line {number}: not JSON ({e})") from None
            return
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: not a JSON list of annotations: {e}") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of annotations")
    yield from records


def url_caption_rows(paths: Iterable[str], stats: ConversionStats) -> Iterator[tuple[str, str]]:
    """``(url, caption)`` of every usable record of the annotation files."""
    for path in paths:
        for record in iter_url_records(path):
            url = record.get("url") if isinstance(record, dict) else None
            caption = record.get("caption") if isinstance(record, dict) else None
            if isinstance(caption, list):
                stats.caption_lists += 1
                caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
            if not isinstance(url, str) or not url.strip():
                stats.skipped += 1
                continue
            if not isinstance(caption, str) or not caption.strip():
                stats.skipped += 1
                continue
            yield url.strip(), " ".join(caption.split())


def write_img2dataset_input(paths: list[str], out: str) -> ConversionStats:
    """Write the ``url``/``caption`` table of BLIP annotation files for img2dataset."""
    fmt = input_format(out)
    stats = ConversionStats()
    rows = url_caption_rows(paths, stats)
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for url, caption in rows:
                f.write(json.dumps({"url": url, "caption": caption}, ensure_ascii=False) + "\n")
                stats.rows += 1
        else:
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerow(["url", "caption"])
            for url, caption in rows:
                writer.writerow([url, caption])
                stats.rows += 1
    os.replace(tmp, out)
    return stats


def img2dataset_command(input_file: str, output_folder: str, processes: int = 16) -> str:
    """The img2dataset command line that turns ``input_file`` into 384-pixel webdataset shards."""
    return (
        f"img2dataset --url_list {input_file} --input_format {input_format(input_file)} "
        f"--url_col url --caption_col caption --output_format webdataset "
        f"--output_folder {output_folder} --processes_count {processes} --thread_count 64 "
        "--resize_mode keep_ratio --image_size 384 --resize_only_if_bigger True "
        "--encode_format jpg --encode_quality 95 --number_sample_per_shard 10000 "
        "--enable_wandb False"
    )


__all__ = [
    "ConversionStats",
    "img2dataset_command",
    "input_format",
    "url_caption_rows",
    "write_img2dataset_input",
]
