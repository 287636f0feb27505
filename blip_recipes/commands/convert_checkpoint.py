"""Convert BLIP checkpoints between the reference .pth, Hugging Face folders, DCP and flat files.

    blip convert model_base.pth outputs/from_ref/step-0            # -> DCP
    blip convert hf_blip/ outputs/from_hf/step-0 --queue-size 57600
    blip convert outputs/blip_base hf_out --to hf                   # -> HF
    blip convert outputs/blip_base blip_base.safetensors            # -> flat
    blip convert outputs/blip_base model_base.pth --to reference

SOURCE: a DCP checkpoint of blip_pretrain (or its run folder: newest complete step), a Hugging Face
BLIP folder (BlipForImageTextRetrieval / BlipForConditionalGeneration, or a folder holding both),
a reference BLIP .pth ({"model": ...} or bare), or a consolidated .pt / .safetensors. A VQA
model (a blip_finetune_vqa checkpoint, a reference BLIP_VQA .pth, a BlipForQuestionAnswering
folder) converts to --to hf, reference, pt or safetensors.
DEST format: --to, else from the suffix (.pt/.pth/.bin: pt, .safetensors, otherwise a DCP folder).
A DCP output holds "model" and "momentum" (weights + queues when the source has them, else a copy
of the online weights and fresh queues): start a run from it with checkpoint.init_from=DEST.
A reference output loads strictly into the reference BLIP_Pretrain (its pretrain.py --checkpoint);
a reference source's momentum cross-attention is kept through DCP / .pt / .safetensors and
written back. Outputs are written beside DEST and renamed into place when complete.
An HF output also gets a model card (DEST/README.md: the step, the run's config and data sources
and its last metrics when the source is a run's DCP checkpoint; set its license before publishing).

:func:`convert_checkpoint` is the conversion itself (reading with :mod:`blip_recipes.interop`,
the momentum state from :mod:`blip_recipes.training.init_checkpoint`); it picks the format,
guards the source and stages the output, so a failed conversion leaves the destination as it was.
Heavy imports wait until a conversion runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from blip_recipes.cli.help import HelpFormatter

logger = logging.getLogger(__name__)

FORMATS = ("dcp", "hf", "pt", "safetensors", "reference")
"""Output formats of :func:`convert_checkpoint`."""


def output_format(dest: str | Path, to: str | None = None) -> str:
    """`to`, or the format implied by the destination's suffix (a folder means DCP)."""
    if to is not None:
        if to not in FORMATS:
            raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
        return to
    suffix = Path(dest).suffix
    return {".pt": "pt", ".pth": "pt", ".bin": "pt", ".safetensors": "safetensors"}.get(
        suffix, "dcp"
    )


def convert_checkpoint(
    source: str | Path,
    dest: str | Path,
    to: str | None = None,
    model_name: str | None = None,
    tokenizer: Any = None,
    queue_size: int | None = None,
    seed: int = 0,
    momentum: bool = True,
    strict: bool = False,
    trust_pickle: bool = False,
    tokenizer_section: dict[str, Any] | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Convert any supported checkpoint into one output format (what `tools/convert_checkpoint.py`
    runs).

    Args:
        source: DCP checkpoint / run folder, HF folder(s), reference `.pth`, or our `.pt` /
            `.safetensors`.
        dest: output path: a folder for "dcp" and "hf", a file otherwise.
        to: "dcp" (`{"model", "momentum"}`, for `checkpoint.init_from`), "hf" (`dest/retrieval`
            and `dest/captioning`), "pt" / "safetensors" (one flat state dict of ours),
            "reference" (reference BLIP `{"model": ...}` `.pth`); default from `dest`'s suffix.
        model_name: builder preset for what shapes cannot tell (heads, eps) when the source does
            not record it.
        tokenizer: the tokenizer of the run (token ids; tokenizer files for "hf"); default the
            one recorded with the source when it can be built locally.
        queue_size: queue length of the momentum state written to "dcp" (the run's
            `momentum.queue_size`); default the source's, else the preset's.
        seed: seed of freshly initialised queues when the source has none.
        momentum: include momentum weights and queues ("dcp", "pt", "safetensors", "reference").
        strict: every model tensor must come from the source.
        trust_pickle: allow arbitrary objects in torch pickles.
        tokenizer_section: `[tokenizer]` settings recorded beside a "dcp" output (e.g.
            `{"kind": "wordpiece", "path": ...}`); default what the source recorded.
        overwrite: replace an existing `dest` (file or non-empty folder); otherwise that is an
            error. Either way the output is written to a temporary sibling and renamed into
            place at the end, so a failed conversion leaves `dest` as it was.
        overrides: builder arguments (e.g. `vision_heads=16`).

    Returns:
        The written path.

    Raises:
        FileExistsError: `dest` exists and `overwrite` is false.
        ValueError: `dest` is the source or holds it (replacing it would delete the source).
    """
    from blip_recipes.interop.exporters import export_hf, save_consolidated, save_reference
    from blip_recipes.interop.files import staged_output
    from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
    from blip_recipes.interop.readers import read_weights
    from blip_recipes.training.init_checkpoint import (
        build_momentum_from_weights,
        save_training_checkpoint,
    )

    fmt = output_format(dest, to)
    dest = Path(dest)
    if dest.suffix == "" and fmt in ("pt", "safetensors"):
        dest = dest.with_suffix(".pt" if fmt == "pt" else ".safetensors")
    resolved, src = dest.resolve(), Path(source).resolve()
    if dest.exists() and (resolved == src or resolved in src.parents):
        raise ValueError(f"{dest} is the source {source} or holds it; write somewhere else")
    weights = read_weights(source, trust_pickle=trust_pickle)
    if tokenizer is None:
        tokenizer = tokenizer_from_weights(weights)
    model = build_model_from_weights(weights, model_name, tokenizer, strict, **overrides)
    state = cross = None
    if momentum and fmt != "hf":
        state = build_momentum_from_weights(model, weights, seed=seed, queue_size=queue_size)
        cross = weights.momentum_cross_attn
    with staged_output(dest, overwrite) as tmp:
        if fmt == "dcp":
            tok = tokenizer_section or weights.tokenizer
            save_training_checkpoint(model, state, tmp, tok, cross)
        elif fmt == "hf":
            from blip_recipes.interop.hf import write_model_card

            export_hf(model, tmp, tokenizer)
            write_model_card(tmp, source)  # README.md: config, data, step, last metrics
        elif fmt == "reference":
            if state is not None and not cross:
                logger.info("%s: the momentum cross-attention (unused in training) is a copy of "
                            "the online cross-attention", dest)  # fmt: skip
            save_reference(model, tmp, state, cross)
        else:
            save_consolidated(model, tmp, state, cross)
    return dest


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
        from blip_recipes.interop.vqa import convert_vqa, vqa_source_state

        vqa_state = vqa_source_state(args.source, args.trust_pickle)
        if vqa_state is not None:  # a VQA model: its own converter
            sep = tokenizer.sep_token_id if tokenizer is not None else None
            out = convert_vqa(vqa_state, args.dest, output_format(args.dest, args.to),
                              overwrite=args.force, sep_token_id=sep, **overrides)  # fmt: skip
            print(f"wrote {out}")
            return 0
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
