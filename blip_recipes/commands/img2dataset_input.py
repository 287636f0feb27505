"""BLIP URL annotations (``{"url", "caption"}`` JSON/JSONL) -> img2dataset's input file.

    blip data img2dataset-input cc3m.json cc12m.jsonl --out urls.csv

The output suffix picks the format (``.csv``, ``.tsv`` or ``.jsonl``); the img2dataset command
that downloads the images into webdataset shards is printed at the end.
"""

from __future__ import annotations

import argparse
import sys

from blip_recipes.cli.help import HelpFormatter
from blip_recipes.data.img2dataset import img2dataset_command, write_img2dataset_input
from blip_recipes.data.sources import AnnotationError


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("annotations", nargs="+", help="BLIP annotation files (.json or .jsonl)")
    parser.add_argument("--out", required=True, help="output file: .csv, .tsv or .jsonl")
    parser.add_argument(
        "--shards", default="shards", help="output folder shown in the img2dataset command"
    )
    args = parser.parse_args(argv)
    try:
        stats = write_img2dataset_input(args.annotations, args.out)
    except (AnnotationError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats.rows} url/caption rows to {args.out}")
    if stats.skipped:
        print(f"skipped {stats.skipped} record(s) without a url or caption")
    if stats.caption_lists:
        print(f"{stats.caption_lists} caption list(s) kept their first caption")
    print("download them into shards with:\n  " + img2dataset_command(args.out, args.shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
