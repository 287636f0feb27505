"""Reading: any checkpoint users bring, in our key space.

Which mapping a file needs (reference BLIP `.pth`, Hugging Face BLIP folders or state dicts, our
DCP checkpoints and consolidated files) is decided from its layout and key names; the key mapping
itself lives in `reference.py` / `hf.py`. Every source key must find a place, or the read fails
naming the keys that did not.

    weights = read_weights("model_base.pth")          # reference / HF / DCP / our .pt
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip_recipes.config.recorded import MODEL_ARGS_FILE, recorded_model_and_tokenizer
from blip_recipes.interop.files import (
    CheckpointLayoutError,
    detect_layout,
    hf_subfolders,
    latest_dcp_step,
    read_dcp,
    read_hf_folder,
    read_safetensors_metadata,
    read_state_dict_file,
)
from blip_recipes.interop.hf import hf_to_ours, ours_to_hf_captioning, ours_to_hf_retrieval
from blip_recipes.interop.reference import ours_to_reference, reference_to_ours

MOMENTUM_CROSS_ATTN = "momentum_cross_attn"
"""DCP top-level key (and flat-file key prefix) of a reference file's momentum cross-attention,
which our momentum encoder has no slot for: kept so that a reference export gives it back."""
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
_IGNORED_SUFFIXES = ("position_ids",)
_REFERENCE_DROPPABLE = ("idx_queue",)  # retrieval fine-tuning's image-id queue (not pretraining)


@dataclass
class CheckpointWeights:
    """Weights read from any supported layout, in our key space.

    Attributes:
        model: `BlipPretrain` state dict (partial when the source is, e.g. one HF folder).
        momentum: `MomentumEncoders` state dict, or None when the source has none.
        queues: `image_queue` (E, Q), `text_queue` (E, Q), `queue_ptr` (1,) when present.
        source: the path read.
        layout: "dcp", "reference", "hf" or "ours" (a consolidated state dict of ours).
        model_args: `{"name": preset, **builder overrides}` recorded with the checkpoint, if any.
        hf_config: `config.json` of an HF folder (the first one), if any.
        tokenizer: a `[tokenizer]`-section dict recorded with the checkpoint, if any.
        momentum_cross_attn: a reference file's momentum cross-attention, keys
            `text_encoder.layers.#.cross_attn.*` (empty when the source has none).
    """

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    queues: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    layout: str = ""
    model_args: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    momentum_cross_attn: dict[str, torch.Tensor] = field(default_factory=dict)


def unplaced_error(
    source: str, layout: str, keys: list[str], limit: int = 8
) -> CheckpointLayoutError:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return CheckpointLayoutError(
        f"{source}: read as {layout}, but {len(keys)} key(s) have no place in the BLIP "
        f"pretraining model: {', '.join(keys[:limit])}{more}"
    )


def _check_placed(source: str, layout: str, original: dict, produced: dict, drop=()) -> None:
    unplaced = [
        k for k in original
        if k not in produced and not k.endswith(_IGNORED_SUFFIXES) and k not in drop
    ]  # fmt: skip
    if unplaced:
        raise unplaced_error(source, layout, unplaced)


def classify_state_dict(state_dict: dict[str, Any]) -> str:
    """Which key space a flat state dict uses: "ours", "reference", "hf_retrieval",
    "hf_captioning" or "hf_pair" (both HF models merged).

    Raises:
        CheckpointLayoutError: naming the first keys when no layout fits.
    """
    keys = list(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("text.layers.") or has("text.embeddings.") or has("lm_head.") or has("momentum."):
        return "ours"
    if has("vision_model."):
        retrieval, captioning = has("text_encoder.") or has("itm_head."), has("text_decoder.")
        if retrieval and captioning:
            return "hf_pair"
        if retrieval or captioning:
            return "hf_retrieval" if retrieval else "hf_captioning"
    if has("visual_encoder.") or has("text_encoder.") or has("text_decoder.bert."):
        return "reference"
    raise CheckpointLayoutError(
        f"unknown checkpoint layout: none of our, reference BLIP or Hugging Face BLIP names; "
        f"first keys: {', '.join(keys[:8])}"
    )


def split_hf_pair(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A merged HF state dict -> (retrieval part, captioning part); the ViT goes to both."""
    vision = {k: v for k, v in state_dict.items() if k.startswith("vision_model.")}
    captioning = vision | {k: v for k, v in state_dict.items() if k.startswith("text_decoder.")}
    retrieval = {k: v for k, v in state_dict.items() if k not in captioning} | vision
    return retrieval, captioning


def _from_reference(sd: dict, source: str) -> CheckpointWeights:
    split = reference_to_ours(sd)
    produced = ours_to_reference(
        split.model, split.momentum, split.queues, split.momentum_cross_attn
    )
    _check_placed(source, "a reference BLIP checkpoint", sd, produced, _REFERENCE_DROPPABLE)
    return CheckpointWeights(split.model, split.momentum, dict(split.queues), source, "reference",
                             momentum_cross_attn=split.momentum_cross_attn)  # fmt: skip


def _from_hf(retrieval: dict | None, captioning: dict | None, source: str) -> CheckpointWeights:
    model = hf_to_ours(retrieval, captioning)
    if retrieval is not None:
        _check_placed(
            source, "HF BlipForImageTextRetrieval", retrieval, ours_to_hf_retrieval(model)
        )
    if captioning is not None:
        produced = ours_to_hf_captioning(model)
        _check_placed(source, "HF BlipForConditionalGeneration", captioning, produced)
    return CheckpointWeights(model, None, {}, source, "hf")


def _from_ours(sd: dict, source: str) -> CheckpointWeights:
    cross_prefix = f"{MOMENTUM_CROSS_ATTN}."
    model = {k: v for k, v in sd.items()
             if not k.startswith("momentum.") and not k.startswith(cross_prefix)}  # fmt: skip
    momentum = {k[len("momentum.encoders.") :]: v for k, v in sd.items()
                if k.startswith("momentum.encoders.")}  # fmt: skip
    queues = {k: sd[f"momentum.{k}"] for k in QUEUE_KEYS if f"momentum.{k}" in sd}
    weights = CheckpointWeights(model, momentum or None, queues, source, "ours")
    weights.momentum_cross_attn = {k[len(cross_prefix) :]: v for k, v in sd.items()
                                   if k.startswith(cross_prefix)}  # fmt: skip
    return weights


def weights_from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str = "<state dict>"
) -> CheckpointWeights:
    """Map a flat state dict in any known key space to ours (see :func:`classify_state_dict`)."""
    kind = classify_state_dict(state_dict)
    if kind == "ours":
        return _from_ours(state_dict, source)
    if kind == "reference":
        return _from_reference(state_dict, source)
    if kind == "hf_pair":
        return _from_hf(*split_hf_pair(state_dict), source)
    retrieval = state_dict if kind == "hf_retrieval" else None
    captioning = state_dict if kind == "hf_captioning" else None
    return _from_hf(retrieval, captioning, source)


def read_weights(path: str | Path, trust_pickle: bool = False) -> CheckpointWeights:
    """Read a checkpoint in any supported layout into our key space.

    Args:
        path: a DCP checkpoint (or a run folder: newest complete step), a Hugging Face folder
            (or a folder of retrieval + captioning subfolders), a reference BLIP `.pth`, or a
            consolidated `.pt` / `.safetensors` of ours or of HF.
        trust_pickle: allow arbitrary objects in torch pickles.

    Raises:
        CheckpointLayoutError: for unknown layouts, naming the first keys it could not place.
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout == "dcp":
        step_dir = latest_dcp_step(path)
        assert step_dir is not None
        flat = read_dcp(step_dir, ("model", "momentum", MOMENTUM_CROSS_ATTN))
        sd = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
        sd |= {k: v for k, v in flat.items() if not k.startswith("model.")}
        weights = _from_ours(sd, str(step_dir))
        weights.layout = "dcp"
        weights.model_args, weights.tokenizer = recorded_model_and_tokenizer(step_dir)
        return weights
    if layout == "hf":
        retrieval = captioning = config = None
        for folder in hf_subfolders(path):
            folder_config, sd = read_hf_folder(folder)
            kind = classify_state_dict(sd)
            config = config or folder_config
            if kind == "hf_pair":
                retrieval, captioning = split_hf_pair(sd)
            elif kind == "hf_retrieval":
                retrieval = sd
            elif kind == "hf_captioning":
                captioning = sd
            else:
                raise CheckpointLayoutError(
                    f"{folder}: not a BLIP retrieval or captioning model ({kind} keys)"
                )
        weights = _from_hf(retrieval, captioning, str(path))
        weights.hf_config = config
        tok_dir = next((f for f in hf_subfolders(path)
                        if (f / "tokenizer.json").is_file() or (f / "vocab.txt").is_file()), None)  # fmt: skip
        if tok_dir is not None:
            weights.tokenizer = {"kind": "wordpiece", "path": str(tok_dir)}
        return weights
    weights = weights_from_state_dict(read_state_dict_file(path, trust_pickle), str(path))
    recorded = read_safetensors_metadata(path).get(MODEL_ARGS_FILE)
    if recorded:
        weights.model_args = json.loads(recorded)
    return weights


__all__ = [
    "MOMENTUM_CROSS_ATTN",
    "QUEUE_KEYS",
    "CheckpointLayoutError",
    "CheckpointWeights",
    "classify_state_dict",
    "read_weights",
    "split_hf_pair",
    "unplaced_error",
    "weights_from_state_dict",
]
