"""Convert BLIP checkpoints between the reference .pth, Hugging Face folders, DCP and flat files.

    blip convert model_base.pth outputs/from_ref/step-0            # -> DCP
    blip convert hf_blip/ outputs/from_hf/step-0 --queue-size 57600
    blip convert outputs/blip_base hf_out --to hf                   # -> HF
    blip convert outputs/blip_base blip_base.safetensors            # -> flat
    blip convert outputs/blip_base model_base.pth --to reference

SOURCE: a DCP checkpoint of blip_pretrain (or its run folder: newest complete step), a Hugging Face
BLIP folder (BlipForImageTextRetrieval / BlipForConditionalGeneration, or a folder holding both),
a reference BLIP .pth ({"model": ...} or bare), or a consolidated .pt / .safetensors.
DEST format: --to, else from the suffix (.pt/.pth/.bin: pt, .safetensors, otherwise a DCP folder).
A DCP output holds "model" and "momentum" (weights + queues when the source has them, else a copy
of the online weights and fresh queues): start a run from it with checkpoint.init_from=DEST.
A reference output loads strictly into the reference BLIP_Pretrain (its pretrain.py --checkpoint);
a reference source's momentum cross-attention is kept through DCP / .pt / .safetensors and
written back. Outputs are written beside DEST and renamed into place when complete.
An HF output also gets a model card (DEST/README.md: the step, the run's config and data sources
and its last metrics when the source is a run's DCP checkpoint; set its license before publishing).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from blip_recipes.cli.help import HelpFormatter


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("source", help="checkpoint to read")
    parser.add_argument("dest", help="where to write (folder for dcp / hf, file otherwise)")
    parser.add_argument("--to", choices=["dcp", "hf", "pt", "safetensors", "reference"],
                        help="output format (default: from DEST's suffix)")  # fmt: skip
    parser.add_argument("--model", help="builder preset for what shapes cannot tell (heads, eps), "
                        "e.g. blip_pretrain_large, when the source does not record it")  # fmt: skip
    parser.add_argument("--tokenizer", help="tokenizer vocab.txt / folder (wordpiece) of the run; "
                        "sets the [ENC]/[DEC]/[SEP] ids and is copied into HF folders")  # fmt: skip
    parser.add_argument(
        "--tokenizer-kind",
        default="wordpiece",
        choices=["wordpiece", "bpe", "synthetic"],
        help="tokenizer kind",
    )
    parser.add_argument(
        "--queue-size", type=int, help="momentum queue length of the run (momentum.queue_size)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fresh queues")
    parser.add_argument("--no-momentum", action="store_true", help="write the online model only")
    parser.add_argument("--strict", action="store_true", help="fail when a model tensor is missing")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary objects in torch pickles (trusted files only)")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DEST file or non-empty folder (the new output "
                        "is written beside it and swapped in once complete)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="builder override, e.g. --set vision_heads=16 (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if not args.force and (dest.is_file() or (dest.is_dir() and any(dest.iterdir()))):
        print(f"error: {dest} exists; pass --force to write over it", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer
    from blip_recipes.interop.convert import convert_checkpoint, output_format
    from blip_recipes.interop.files import CheckpointLayoutError

    overrides = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _value(text)
    tokenizer = section = None
    if args.tokenizer or args.tokenizer_kind == "synthetic":
        section = {"kind": args.tokenizer_kind, "path": args.tokenizer}
        tokenizer = build_tokenizer(TokenizerConfig(kind=args.tokenizer_kind, path=args.tokenizer))
    try:
        out = convert_checkpoint(
            args.source, args.dest, to=args.to, model_name=args.model, tokenizer=tokenizer,
            queue_size=args.queue_size, seed=args.seed, momentum=not args.no_momentum,
            strict=args.strict, trust_pickle=args.trust_pickle, tokenizer_section=section,
            overwrite=args.force, **overrides,
        )  # fmt: skip
    except (CheckpointLayoutError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if output_format(args.dest, args.to) == "hf":
        print(f"wrote {Path(out) / 'README.md'} (model card: set its license before publishing)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
