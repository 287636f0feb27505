"""NLVR weights in: a reference BLIP NLVR2 `.pth` (`BLIP_NLVR`), our own NLVR checkpoints, or a
pretraining checkpoint in any layout `read_weights` knows, turned into a `BlipNLVR` state dict.

Reference NLVR names (BERT layout, `models/nlvr_encoder.py`): per text layer
`crossattention.self0.*` / `crossattention.self1.*` (the attention to image 0 / 1),
`crossattention.output.dense0` / `dense1` (their output projections), one
`crossattention.output.LayerNorm`, and `crossattention.output.merge_layer` in the merging
layers; `cls_head.0` / `cls_head.2` for the head. Ours: `cross_attn.first.*`,
`cross_attn.second.*` (query, key, value, out), `cross_attn.norm`, `cross_attn.merge`,
`cls_head.0` / `cls_head.2`.

From a pretraining checkpoint both image attentions of a layer get copies of the pretrained
cross-attention (its LayerNorm becomes the shared one), as the reference's loader does; the
merge layers and the head keep their initialisation; the decoder, ITC/ITM heads and the
temperature are not used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blip_recipes.interop._names import (
    ENCODER_SELF,
    TEXT_EMBEDDINGS,
    TEXT_FFN,
    Pairs,
    map_prefixed,
)

_BRANCHES = (("first", "self0", "dense0"), ("second", "self1", "dense1"))
NLVR_CROSS: Pairs = [
    pair
    for ours, theirs, dense in _BRANCHES
    for pair in (
        (f"layers.#.cross_attn.{ours}.query", f"encoder.layer.#.crossattention.{theirs}.query"),
        (f"layers.#.cross_attn.{ours}.key", f"encoder.layer.#.crossattention.{theirs}.key"),
        (f"layers.#.cross_attn.{ours}.value", f"encoder.layer.#.crossattention.{theirs}.value"),
        (f"layers.#.cross_attn.{ours}.out", f"encoder.layer.#.crossattention.output.{dense}"),
    )
] + [
    ("layers.#.cross_attn.norm", "encoder.layer.#.crossattention.output.LayerNorm"),
    ("layers.#.cross_attn.merge", "encoder.layer.#.crossattention.output.merge_layer"),
]
"""Our pair cross-attention (relative to `text.`) -> the reference NLVR encoder's names."""
NLVR_TEXT: Pairs = TEXT_EMBEDDINGS + ENCODER_SELF + NLVR_CROSS + TEXT_FFN
_HEAD_KEYS = tuple(f"cls_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
_PRETRAINED_CROSS = ("query", "key", "value", "out")


def is_reference_nlvr(state_dict: dict) -> bool:
    """A reference `BLIP_NLVR` state dict (two image attentions per layer)."""
    return any(".crossattention.self0." in k for k in state_dict)


def is_our_nlvr(state_dict: dict) -> bool:
    """A `BlipNLVR` state dict of ours."""
    return any(".cross_attn.first." in k for k in state_dict)


def nlvr_reference_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference `BLIP_NLVR` state dict -> `BlipNLVR` state dict.

    Raises:
        ValueError: naming the reference keys that found no place.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {k: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    out |= map_prefixed(sd, "text_encoder.", "text.", NLVR_TEXT, reverse=True)
    out |= {k: sd[k] for k in _HEAD_KEYS if k in sd}
    placed = set(ours_to_nlvr_reference(out))
    unplaced = [k for k in sd if k not in placed]
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} key(s) of the reference NLVR checkpoint have no place in the NLVR "
            f"model: {', '.join(unplaced[:8])}"
        )
    return out


def ours_to_nlvr_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`BlipNLVR` state dict -> reference `BLIP_NLVR` names (position_ids buffers left out)."""
    out = {k: v for k, v in state_dict.items() if k.startswith("visual_encoder.")}
    out |= map_prefixed(state_dict, "text.", "text_encoder.", NLVR_TEXT)
    out |= {k: state_dict[k] for k in _HEAD_KEYS if k in state_dict}
    return out


def nlvr_from_pretrained(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pretraining (`BlipPretrain`) state dict -> the `BlipNLVR` tensors it provides.

    ViT, text embeddings, bidirectional self-attention and FFN as they are; each layer's
    cross-attention projections copied to both image attentions (`first`, `second`), its
    LayerNorm to the shared `cross_attn.norm`. Everything else is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        if key.startswith(("visual_encoder.", "text.embeddings.")):
            out[key] = value
            continue
        parts = key.split(".")  # text.layers.<i>.<sublayer>.<name>.<weight|bias>
        if len(parts) < 5 or parts[:2] != ["text", "layers"]:
            continue
        sublayer = parts[3]
        if sublayer in ("self_attn", "ffn"):
            out[key] = value
        elif sublayer == "cross_attn" and parts[4] in _PRETRAINED_CROSS:
            for branch in ("first", "second"):
                out[".".join(parts[:4] + [branch] + parts[4:])] = value.clone()
        elif sublayer == "cross_attn" and parts[4] == "norm":
            out[key] = value
    return out


def read_nlvr_weights(path: str | Path, trust_pickle: bool = False) -> tuple[dict, str]:
    """`BlipNLVR` tensors from `path` and what it was: "reference_nlvr", "nlvr" (ours) or
    "pretrained" (any pretraining layout; see `nlvr_from_pretrained`).

    Args:
        path: a reference NLVR `.pth`, a DCP checkpoint (or run folder) of ours (NLVR or
            pretraining), a consolidated state dict, a Hugging Face BLIP folder, a reference
            pretraining `.pth`.
        trust_pickle: allow arbitrary objects in torch pickles.
    """
    from blip_recipes.interop.files import (
        detect_layout,
        latest_dcp_step,
        read_dcp,
        read_state_dict_file,
    )
    from blip_recipes.interop.readers import read_weights, weights_from_state_dict

    layout = detect_layout(path)
    if layout == "dcp":
        step_dir = latest_dcp_step(path)
        assert step_dir is not None
        flat = read_dcp(step_dir, ("model",))
        sd = {k[len("model.") :]: v for k, v in flat.items()}
        if is_our_nlvr(sd):
            return sd, "nlvr"
        return nlvr_from_pretrained(sd), "pretrained"
    if layout == "file":
        sd = read_state_dict_file(path, trust_pickle)
        if is_reference_nlvr(sd):
            return nlvr_reference_to_ours(sd), "reference_nlvr"
        if is_our_nlvr(sd):
            return sd, "nlvr"
        return nlvr_from_pretrained(weights_from_state_dict(sd, str(path)).model), "pretrained"
    return nlvr_from_pretrained(read_weights(path, trust_pickle).model), "pretrained"


__all__ = [
    "NLVR_CROSS",
    "is_our_nlvr",
    "is_reference_nlvr",
    "nlvr_from_pretrained",
    "nlvr_reference_to_ours",
    "ours_to_nlvr_reference",
    "read_nlvr_weights",
]
