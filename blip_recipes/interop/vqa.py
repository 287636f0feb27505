"""VQA weights: the reference `BLIP_VQA` `.pth`, `transformers`' `BlipForQuestionAnswering`, ours.

Key spaces (ours = `BlipVQA`):

- ours: `visual_encoder.*`, `question_encoder.*` (MED, bidirectional self-attention),
  `answer_decoder.*` (MED, causal self-attention), `lm_head.*`;
- reference: `visual_encoder.*`, `text_encoder.*` (BERT names), `text_decoder.bert.*`,
  `text_decoder.cls.predictions.*` (+ `position_ids` buffers);
- transformers: the same with `vision_model.*` (HF ViT names) for `visual_encoder.*`.

`vqa_from_pretrain` starts a VQA model from a pretraining model (ours, in any layout
`read_weights` reads), as the reference's `load_checkpoint` does with `strict=False`: the
question encoder takes the text encoder (bidirectional self-attention, cross-attention, FFN,
embeddings), the answer decoder the captioning decoder (causal self-attention and the shared
cross-attention, FFN and embeddings, copied), the LM head the LM head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from blip_recipes.interop._names import LM_HEAD, TEXT_DECODER, TEXT_ENCODER, VIT_TO_HF, map_prefixed
from blip_recipes.interop.files import (
    CheckpointLayoutError,
    dcp_tensor_shapes,
    detect_layout,
    hf_subfolders,
    latest_dcp_step,
    read_dcp,
    read_hf_folder,
    read_state_dict_file,
    staged_output,
)

_PARTS = ("visual_encoder.", "question_encoder.", "answer_decoder.", "lm_head.")
_HEAD = "text_decoder.cls.predictions."


def _text_parts(state: dict, vision: str, vision_pairs: list | None) -> dict:
    """Ours -> reference (`vision_pairs` None) or HF key space (`vision_pairs` = VIT_TO_HF)."""
    if vision_pairs is None:
        out = {vision + k[len("visual_encoder.") :]: v for k, v in state.items()
               if k.startswith("visual_encoder.")}  # fmt: skip
    else:
        out = map_prefixed(state, "visual_encoder.", vision, vision_pairs)
    out |= map_prefixed(state, "question_encoder.", "text_encoder.", TEXT_ENCODER)
    out |= map_prefixed(state, "answer_decoder.", "text_decoder.bert.", TEXT_DECODER)
    out |= map_prefixed(state, "lm_head.", _HEAD, LM_HEAD)
    if "answer_decoder.embeddings.word_embeddings.weight" in state:
        out[_HEAD + "decoder.weight"] = state["answer_decoder.embeddings.word_embeddings.weight"]
    if "lm_head.bias" in state:
        out[_HEAD + "decoder.bias"] = state["lm_head.bias"]
    return out


def _ours_from(state: dict, vision: str, vision_pairs: list | None) -> dict:
    if vision_pairs is None:
        out = {"visual_encoder." + k[len(vision) :]: v for k, v in state.items()
               if k.startswith(vision)}  # fmt: skip
    else:
        out = map_prefixed(state, vision, "visual_encoder.", vision_pairs, reverse=True)
    out |= map_prefixed(state, "text_encoder.", "question_encoder.", TEXT_ENCODER, reverse=True)
    out |= map_prefixed(state, "text_decoder.bert.", "answer_decoder.", TEXT_DECODER, reverse=True)
    out |= map_prefixed(state, _HEAD, "lm_head.", LM_HEAD, reverse=True)
    return out


def _check_placed(source: str, layout: str, original: dict, ours: dict, back: dict) -> None:
    unplaced = [k for k in original if k not in back and not k.endswith("position_ids")]
    if unplaced:
        raise CheckpointLayoutError(
            f"{source}: read as {layout}, but {len(unplaced)} key(s) have no place in the BLIP "
            f"VQA model: {', '.join(unplaced[:8])}"
        )
    if not any(k.startswith("answer_decoder.") for k in ours):
        raise CheckpointLayoutError(
            f"{source}: read as {layout}, but it has no answer decoder (text_decoder.bert.*): "
            "not a VQA model"
        )


def ours_to_reference_vqa(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipVQA` state dict -> the reference `BLIP_VQA.state_dict()` keys (what its strict
    `load_state_dict` expects; save as `{"model": ...}`)."""
    out = _text_parts(state, "visual_encoder.", None)
    positions = state.get("question_encoder.embeddings.position_embeddings.weight")
    if positions is not None:
        for name in ("text_encoder", "text_decoder.bert"):
            out[f"{name}.embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
    return out


def reference_vqa_to_ours(
    state: dict[str, torch.Tensor], source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """A reference `BLIP_VQA` state dict -> ours.

    Raises:
        CheckpointLayoutError: keys with no place in the VQA model, or no answer decoder.
    """
    ours = _ours_from(state, "visual_encoder.", None)
    _check_placed(source, "a reference BLIP VQA checkpoint", state, ours,
                  ours_to_reference_vqa(ours))  # fmt: skip
    return ours


def ours_to_hf_vqa(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipVQA` state dict -> `BlipForQuestionAnswering` state dict."""
    return _text_parts(state, "vision_model.", VIT_TO_HF)


def hf_vqa_to_ours(
    state: dict[str, torch.Tensor], source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """A `BlipForQuestionAnswering` state dict -> ours.

    Raises:
        CheckpointLayoutError: keys with no place in the VQA model, or no answer decoder.
    """
    ours = _ours_from(state, "vision_model.", VIT_TO_HF)
    _check_placed(source, "HF BlipForQuestionAnswering", state, ours, ours_to_hf_vqa(ours))
    return ours


def vqa_from_pretrain(pretrain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pretraining (`BlipPretrain`) state dict -> the `BlipVQA` start (module docstring).

    The shared MED tensors are copied into both text models (they are trained apart)."""
    text = {k[len("text.") :]: v for k, v in pretrain.items() if k.startswith("text.")}
    out = {k: v for k, v in pretrain.items() if k.startswith(("visual_encoder.", "lm_head."))}
    for key, value in text.items():
        if ".causal_self_attn." not in key:  # the encoder: all but the causal self-attention
            out[f"question_encoder.{key}"] = value
        if ".self_attn." not in key:  # the decoder: all but the bidirectional one
            out[f"answer_decoder.{key}"] = value
    return out


def classify_vqa_state_dict(state: dict[str, Any]) -> str:
    """ "ours", "ours_pretrain", "reference", "hf" or "unknown" for a flat state dict."""
    keys = list(state)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("answer_decoder.") or has("question_encoder."):
        return "ours"
    if has("text.layers.") or has("text.embeddings."):
        return "ours_pretrain"
    pretraining_heads = has("itm_head.") or has("vision_proj.") or has("text_proj.")
    if pretraining_heads:  # a pretraining or retrieval model: read as one, then started from
        return "unknown"
    if has("vision_model.") and has("text_decoder.") and has("text_encoder."):
        return "hf"
    if has("visual_encoder.") and has("text_decoder.bert.") and has("text_encoder."):
        return "reference"
    return "unknown"


def read_vqa_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Our `BlipVQA` state dict from any VQA layout, or the VQA start of a pretraining model.

    Reads: a DCP checkpoint of ours (a VQA run's step, or a pretraining one), a reference
    `BLIP_VQA` `.pth`, a `BlipForQuestionAnswering` folder or file, a consolidated file of ours;
    anything else `blip_recipes.interop.readers.read_weights` reads as a pretraining model
    (reference pretraining `.pth`, HF retrieval/captioning folders) goes through
    :func:`vqa_from_pretrain`.

    Raises:
        CheckpointLayoutError: one line naming the path and what could not be placed.
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout == "dcp":
        step_dir = latest_dcp_step(path)
        assert step_dir is not None
        flat = read_dcp(step_dir, ("model",))
        state = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
        source = str(step_dir)
    elif layout == "hf":
        state, source = {}, str(path)
        for folder in hf_subfolders(path):
            state |= read_hf_folder(folder)[1]
    else:
        state, source = read_state_dict_file(path, trust_pickle), str(path)
    kind = classify_vqa_state_dict(state)
    if kind == "ours":
        return {k: v for k, v in state.items() if k.startswith(_PARTS)}
    if kind == "reference":
        return reference_vqa_to_ours(state, source)
    if kind == "hf":
        return hf_vqa_to_ours(state, source)
    from blip_recipes.interop.readers import read_weights, weights_from_state_dict

    if kind == "ours_pretrain":
        return vqa_from_pretrain(weights_from_state_dict(state, source).model)
    return vqa_from_pretrain(read_weights(path, trust_pickle).model)


def hf_vqa_config(model: Any, sep_token_id: int | None = None) -> Any:
    """A `transformers.BlipConfig` describing a `BlipVQA` (dropout 0, the vision LayerNorm eps
    copied: 1e-6 in the reference, where HF's default is 1e-5; `sep_token_id` ends generation).

    Raises:
        ValueError: the ViT is wider than the text model (ViT-L): transformers' VQA model gives
            its encoder and decoder one cross-attention width, so it cannot hold this model.
    """
    from transformers import BlipConfig

    vit, encoder = model.visual_encoder, model.question_encoder
    block, layer = vit.blocks[0], encoder.layers[0]
    if layer.cross_attn.key.in_features != encoder.width:
        raise ValueError(
            f"BlipForQuestionAnswering needs the ViT as wide as the text model "
            f"({layer.cross_attn.key.in_features} != {encoder.width}): not exportable"
        )
    patch = vit.patch_embed.proj.kernel_size[0]
    text_config = dict(
        vocab_size=encoder.embeddings.word_embeddings.num_embeddings,
        hidden_size=encoder.width,
        encoder_hidden_size=layer.cross_attn.key.in_features,
        intermediate_size=layer.ffn.fc1.out_features,
        num_hidden_layers=len(encoder.layers),
        num_attention_heads=layer.self_attn.heads,
        max_position_embeddings=encoder.embeddings.position_embeddings.num_embeddings,
        layer_norm_eps=layer.ffn.norm.eps,
        bos_token_id=model.dec_token_id,
        pad_token_id=model.pad_token_id,
        label_smoothing=model.label_smoothing,
    )
    if sep_token_id is not None:
        text_config["sep_token_id"] = sep_token_id
    vision_config = dict(
        hidden_size=vit.width,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.heads,
        image_size=int(round(vit.num_patches**0.5)) * patch,
        patch_size=patch,
        layer_norm_eps=vit.norm.eps,
    )
    return BlipConfig(text_config=text_config, vision_config=vision_config)


def to_hf_vqa(model: Any, sep_token_id: int | None = None) -> Any:
    """A `BlipForQuestionAnswering` with `model`'s weights (eval mode, CPU, fp32)."""
    from transformers import BlipForQuestionAnswering

    config = hf_vqa_config(model, sep_token_id)
    hf = BlipForQuestionAnswering(config).eval()
    state = {k: v.detach().float().cpu() for k, v in ours_to_hf_vqa(model.state_dict()).items()}
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise CheckpointLayoutError(
            f"BlipForQuestionAnswering export: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    return hf


def export_hf_vqa(model: Any, out_dir: str | Path, sep_token_id: int | None = None) -> Path:
    """Save `model` as a `BlipForQuestionAnswering` folder (`save_pretrained`)."""
    out_dir = Path(out_dir)
    to_hf_vqa(model, sep_token_id).save_pretrained(out_dir)
    return out_dir


def vqa_source_state(
    path: str | Path, trust_pickle: bool = False
) -> dict[str, torch.Tensor] | None:
    """Our `BlipVQA` state dict when `path` holds a VQA model (a VQA run's DCP checkpoint, a
    reference `BLIP_VQA` file, a `BlipForQuestionAnswering` folder or file, a file of ours), else
    None (a pretraining or other model: `blip convert`'s usual path)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "dcp":
        step_dir = latest_dcp_step(path)
        keys = dcp_tensor_shapes(step_dir) if step_dir is not None else {}
        if not any(k.startswith("model.answer_decoder.") for k in keys):
            return None
    elif layout == "hf":
        architectures = []
        for folder in hf_subfolders(path):
            if (folder / "config.json").is_file():
                config = json.loads((folder / "config.json").read_text())
                architectures += config.get("architectures") or []
        if "BlipForQuestionAnswering" not in architectures:
            return None
    elif classify_vqa_state_dict(read_state_dict_file(path, trust_pickle)) in (
        "unknown",
        "ours_pretrain",  # a pretraining file of ours converts as itself, not as a VQA start
    ):
        return None
    return read_vqa_weights(path, trust_pickle)


_HEADS_BY_WIDTH = {768: 12, 1024: 16}
"""Attention heads of the released widths (heads are not visible in the weights' shapes)."""


def vqa_model_from_state(state: dict[str, torch.Tensor], **overrides: Any) -> Any:
    """A `BlipVQA` shaped like `state` (sizes read from the tensors; heads 12 for 768 wide, 16 for
    1024, else `vision_heads=` / `text_heads=` overrides) with its weights loaded."""
    from blip_recipes.models.vqa import build_vqa_model

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    vision_width = state["visual_encoder.cls_token"].shape[-1]
    text_width = state["question_encoder.embeddings.word_embeddings.weight"].shape[1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    patches = state["visual_encoder.pos_embed"].shape[1] - 1
    args: dict[str, Any] = dict(
        vocab_size=state["question_encoder.embeddings.word_embeddings.weight"].shape[0],
        image_size=int(round(patches**0.5)) * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_depth=count("visual_encoder.blocks."),
        vision_heads=_HEADS_BY_WIDTH.get(vision_width, max(1, vision_width // 64)),
        text_width=text_width,
        text_depth=count("question_encoder.layers."),
        text_heads=_HEADS_BY_WIDTH.get(text_width, max(1, text_width // 64)),
        text_ffn_dim=state["question_encoder.layers.0.ffn.fc1.weight"].shape[0],
        max_positions=state["question_encoder.embeddings.position_embeddings.weight"].shape[0],
        mlp_ratio=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / vision_width,
    )
    model = build_vqa_model("blip_pretrain_base", **{**args, **overrides})
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_vqa(
    state: dict[str, torch.Tensor],
    dest: str | Path,
    fmt: str,
    overwrite: bool = False,
    sep_token_id: int | None = None,
    **overrides: Any,
) -> Path:
    """Write a VQA model as "hf" (`BlipForQuestionAnswering` folder), "reference" (`{"model":
    ...}` for the reference's `BLIP_VQA`), "pt" or "safetensors" (our keys); staged, so a failed
    conversion leaves `dest` as it was.

    Raises:
        ValueError: "dcp" (a VQA run's own checkpoints are the DCP form; start runs from them).
    """
    if fmt == "dcp":
        raise ValueError(
            "a VQA model converts to hf, reference, pt or safetensors; for checkpoint.init_from "
            "use the VQA run's checkpoint (or the file itself: it is read in any layout)"
        )
    model = vqa_model_from_state(state, **overrides) if fmt == "hf" else None
    with staged_output(dest, overwrite) as tmp:
        if fmt == "hf":
            export_hf_vqa(model, tmp, sep_token_id)
        elif fmt == "reference":
            torch.save({"model": ours_to_reference_vqa(state)}, tmp)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
        else:
            torch.save(state, tmp)
    return Path(dest)


__all__ = [
    "classify_vqa_state_dict",
    "convert_vqa",
    "export_hf_vqa",
    "hf_vqa_config",
    "hf_vqa_to_ours",
    "ours_to_hf_vqa",
    "ours_to_reference_vqa",
    "read_vqa_weights",
    "reference_vqa_to_ours",
    "to_hf_vqa",
    "vqa_from_pretrain",
    "vqa_model_from_state",
    "vqa_source_state",
]
