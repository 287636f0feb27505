"""Reference BLIP `.pth` (`torch.load(path)["model"]`) <-> our model + momentum state.

Reference names: `visual_encoder.*` (same as ours), `text_encoder.*` (BERT names, bidirectional
self-attention), `text_decoder.bert.*` (causal self-attention; shared tensors repeated) and
`text_decoder.cls.predictions.*` (`decoder.weight` is the word embeddings, `decoder.bias` the
head's `bias`), heads, `temp` (0-d), `embeddings.position_ids` buffers (1, P), momentum copies with
an `_m` suffix and the queues.

Our momentum text encoder has no cross-attention (never run, so training cannot tell it apart).
A reference file's `text_encoder_m.*crossattention*` tensors are kept aside as
`ReferenceWeights.momentum_cross_attn`, in the names our momentum encoder would give them
(`text_encoder.layers.#.cross_attn.*`), and written back on export; without them the slots get
copies of the online cross-attention.

Tensors the reference shares (encoder and decoder text weights other than self-attention, the
decoder's word embeddings and bias) are the same tensor object in the exported dict, so
`torch.save` stores each once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        momentum_cross_attn: the momentum text encoder's cross-attention, keys
            `text_encoder.layers.#.cross_attn.*` (empty when the file has none).
    """

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    queues: dict[str, torch.Tensor]
    momentum_cross_attn: dict[str, torch.Tensor] = field(default_factory=dict)


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
    cross = map_prefixed(sd, "text_encoder_m.", "text_encoder.", TEXT_CROSS, reverse=True)
    return ReferenceWeights(model, momentum or None, queues, cross)


def ours_to_reference(
    model: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None = None,
    queues: dict[str, torch.Tensor] | None = None,
    momentum_cross_attn: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our state dicts -> one reference-layout state dict (save as `{"model": ...}`).

    With a full model, momentum and queues the keys are exactly those of the reference
    `BLIP_Pretrain.state_dict()` (what its strict `load_state_dict` expects).

    Args:
        model: `BlipPretrain` state dict.
        momentum: `MomentumEncoders` state dict (keys `visual_encoder.*`, `text_encoder.*`, ...).
        queues: `image_queue`, `text_queue`, `queue_ptr` tensors.
        momentum_cross_attn: the momentum text encoder's cross-attention read from a reference
            file (see `ReferenceWeights`); default copies of the online cross-attention.
    """
    out = _identity(model, "visual_encoder.", "visual_encoder.")
    out |= map_prefixed(model, "text.", "text_encoder.", TEXT_ENCODER)
    out |= map_prefixed(model, "text.", "text_decoder.bert.", TEXT_DECODER)
    out |= map_prefixed(model, "lm_head.", "text_decoder.cls.predictions.", LM_HEAD)
    if "text.embeddings.word_embeddings.weight" in model:
        word = model["text.embeddings.word_embeddings.weight"]
        out["text_decoder.cls.predictions.decoder.weight"] = word
    if "lm_head.bias" in model:
        out["text_decoder.cls.predictions.decoder.bias"] = model["lm_head.bias"]
    positions = model.get("text.embeddings.position_embeddings.weight")
    if positions is not None:
        bert_models = ["text_encoder", "text_decoder.bert"] + (
            ["text_encoder_m"] if momentum is not None else []
        )
        for name in bert_models:  # a buffer (1, P) each, as in the reference
            out[f"{name}.embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
    for head in _HEADS:
        out |= {head + s: model[head + s] for s in _SUFFIXES if head + s in model}
    if "temp" in model:
        out["temp"] = model["temp"].reshape(())
    if momentum is not None:
        out |= _identity(momentum, "visual_encoder.", "visual_encoder_m.")
        out |= map_prefixed(momentum, "text_encoder.", "text_encoder_m.", TEXT_ONLY_ENCODER)
        if momentum_cross_attn:
            cross = map_prefixed(
                momentum_cross_attn, "text_encoder.", "text_encoder_m.", TEXT_CROSS
            )
        else:  # own tensors: the reference does not share them with the online model
            cross = map_prefixed(model, "text.", "text_encoder_m.", TEXT_CROSS)
            cross = {k: v.detach().clone() for k, v in cross.items()}
        out |= cross
        for head in ("vision_proj", "text_proj"):
            out |= {f"{head}_m{s}": momentum[head + s] for s in _SUFFIXES if head + s in momentum}
    out |= dict(queues or {})
    return out
