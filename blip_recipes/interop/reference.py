"""Reference BLIP `.pth` (`torch.load(path)["model"]`) <-> our model + momentum state.

Reference names: `visual_encoder.*` (same as ours), `text_encoder.*` (BERT names, bidirectional
self-attention), `text_decoder.bert.*` (causal self-attention; shared tensors repeated) and
`text_decoder.cls.predictions.*`, heads, `temp` (0-d), momentum copies with an `_m` suffix and
the queues. Our momentum text encoder has no cross-attention (never run); on export the
reference's `text_encoder_m.*crossattention*` slots are filled from the online cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip_recipes.interop._names import (
    LM_HEAD,
    TEXT_CROSS,
    TEXT_DECODER,
    TEXT_ENCODER,
    TEXT_ONLY_ENCODER,
    map_prefixed,
)

_HEADS = ("vision_proj", "text_proj", "itm_head")
_SUFFIXES = (".weight", ".bias")


@dataclass
class ReferenceWeights:
    """A reference checkpoint split into our pieces.

    Attributes:
        model: `BlipPretrain` state dict (partial when the file is).
        momentum: `MomentumEncoders` state dict, or None when the file has no momentum weights.
        queues: `{"image_queue", "text_queue", "queue_ptr"}` present in the file (may be empty).
    """

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    queues: dict[str, torch.Tensor]


def _identity(state: dict, source: str, target: str) -> dict:
    return {target + k[len(source) :]: v for k, v in state.items() if k.startswith(source)}


def reference_to_ours(state_dict: dict[str, torch.Tensor]) -> ReferenceWeights:
    """Split a reference BLIP state dict into our model, momentum and queue state dicts."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    model = _identity(sd, "visual_encoder.", "visual_encoder.")
    model |= map_prefixed(sd, "text_decoder.bert.", "text.", TEXT_DECODER, reverse=True)
    model |= map_prefixed(sd, "text_encoder.", "text.", TEXT_ENCODER, reverse=True)
    model |= map_prefixed(sd, "text_decoder.cls.predictions.", "lm_head.", LM_HEAD, reverse=True)
    for head in _HEADS:
        model |= {head + s: sd[head + s] for s in _SUFFIXES if head + s in sd}
    if "temp" in sd:
        model["temp"] = sd["temp"].reshape(1)

    momentum = _identity(sd, "visual_encoder_m.", "visual_encoder.")
    momentum |= map_prefixed(sd, "text_encoder_m.", "text_encoder.", TEXT_ONLY_ENCODER, True)
    for head in ("vision_proj", "text_proj"):
        momentum |= {head + s: sd[f"{head}_m{s}"] for s in _SUFFIXES if f"{head}_m{s}" in sd}
    queues = {k: sd[k] for k in ("image_queue", "text_queue", "queue_ptr") if k in sd}
    return ReferenceWeights(model, momentum or None, queues)


def ours_to_reference(
    model: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None = None,
    queues: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our state dicts -> one reference-layout state dict (save as `{"model": ...}`).

    Args:
        model: `BlipPretrain` state dict.
        momentum: `MomentumEncoders` state dict (keys `visual_encoder.*`, `text_encoder.*`, ...).
        queues: `image_queue`, `text_queue`, `queue_ptr` tensors.
    """
    out = _identity(model, "visual_encoder.", "visual_encoder.")
    out |= map_prefixed(model, "text.", "text_encoder.", TEXT_ENCODER)
    out |= map_prefixed(model, "text.", "text_decoder.bert.", TEXT_DECODER)
    out |= map_prefixed(model, "lm_head.", "text_decoder.cls.predictions.", LM_HEAD)
    if "text.embeddings.word_embeddings.weight" in model:
        word = model["text.embeddings.word_embeddings.weight"]
        out["text_decoder.cls.predictions.decoder.weight"] = word
    for head in _HEADS:
        out |= {head + s: model[head + s] for s in _SUFFIXES if head + s in model}
    if "temp" in model:
        out["temp"] = model["temp"].reshape(())
    if momentum is not None:
        out |= _identity(momentum, "visual_encoder.", "visual_encoder_m.")
        out |= map_prefixed(momentum, "text_encoder.", "text_encoder_m.", TEXT_ONLY_ENCODER)
        out |= map_prefixed(model, "text.", "text_encoder_m.", TEXT_CROSS)
        for head in ("vision_proj", "text_proj"):
            out |= {f"{head}_m{s}": momentum[head + s] for s in _SUFFIXES if head + s in momentum}
    out |= dict(queues or {})
    return out
