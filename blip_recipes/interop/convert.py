"""File-level conversion, any supported checkpoint -> one output format: what `blip convert`
runs. Reading, loading and each writer live in their own modules (`readers.py`, `loading.py`,
`training_checkpoint.py`, `exporters.py`); this one picks the format, guards the source and
stages the output so a failed conversion leaves the destination as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from blip_recipes.interop.exporters import export_hf, save_consolidated, save_reference
from blip_recipes.interop.files import staged_output
from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
from blip_recipes.interop.readers import read_weights
from blip_recipes.interop.training_checkpoint import (
    build_momentum_from_weights,
    save_training_checkpoint,
)

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


__all__ = ["FORMATS", "convert_checkpoint", "output_format"]
