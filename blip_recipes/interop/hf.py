"""Hugging Face transformers BLIP <-> ours (state dicts only; no hub access).

- `BlipForImageTextRetrieval`: `vision_model.*`, `text_encoder.*` (bidirectional self-attention),
  `vision_proj`, `text_proj`, `itm_head`.
- `BlipForConditionalGeneration`: `vision_model.*`, `text_decoder.bert.*` (causal self-attention)
  and `text_decoder.cls.predictions.*` (LM head; `decoder.weight` is the word embeddings).

A pretraining model maps onto both (shared text tensors are written twice). `temp`, the momentum
weights and the queues have no HF slot. Exported configs must set the vision LayerNorm eps to
1e-6 (HF's default is 1e-5): `hf_blip_config(model)` does.
"""

from __future__ import annotations

from typing import Any

import torch

from blip_recipes.interop._names import (
    LM_HEAD,
    TEXT_DECODER,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    TEXT_FFN,
    VIT_TO_HF,
    map_prefixed,
)

HEADS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
         "itm_head.weight", "itm_head.bias")  # fmt: skip


def ours_to_hf_retrieval(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipPretrain` state dict -> `BlipForImageTextRetrieval` state dict."""
    out = map_prefixed(state_dict, "visual_encoder.", "vision_model.", VIT_TO_HF)
    out |= map_prefixed(state_dict, "text.", "text_encoder.", TEXT_ENCODER)
    out |= {key: state_dict[key] for key in HEADS if key in state_dict}
    return out


def ours_to_hf_captioning(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `BlipPretrain` state dict -> `BlipForConditionalGeneration` state dict."""
    out = map_prefixed(state_dict, "visual_encoder.", "vision_model.", VIT_TO_HF)
    out |= map_prefixed(state_dict, "text.", "text_decoder.bert.", TEXT_DECODER)
    out |= map_prefixed(state_dict, "lm_head.", "text_decoder.cls.predictions.", LM_HEAD)
    prefix = "text_decoder.cls.predictions."
    if "text.embeddings.word_embeddings.weight" in state_dict:
        out[prefix + "decoder.weight"] = state_dict["text.embeddings.word_embeddings.weight"]
    if "lm_head.bias" in state_dict:
        out[prefix + "decoder.bias"] = state_dict["lm_head.bias"]
    return out


def hf_to_ours(
    retrieval: dict[str, torch.Tensor] | None = None,
    captioning: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """HF state dicts -> our `BlipPretrain` keys (a partial state dict; load with strict=False).

    Args:
        retrieval: `BlipForImageTextRetrieval` state dict: ViT, text encoder, heads.
        captioning: `BlipForConditionalGeneration` state dict: ViT, decoder, LM head. Where both
            hold a shared tensor (ViT, embeddings, cross-attention, FFN), `retrieval` wins.

    Returns:
        Our keys; `temp` is never present (no HF slot).
    """
    out: dict[str, torch.Tensor] = {}
    if captioning is not None:
        out |= map_prefixed(captioning, "vision_model.", "visual_encoder.", VIT_TO_HF, True)
        out |= map_prefixed(captioning, "text_decoder.bert.", "text.", TEXT_DECODER, True)
        out |= map_prefixed(
            captioning, "text_decoder.cls.predictions.", "lm_head.", LM_HEAD, reverse=True
        )
    if retrieval is not None:
        out |= map_prefixed(retrieval, "vision_model.", "visual_encoder.", VIT_TO_HF, True)
        out |= map_prefixed(retrieval, "text_encoder.", "text.", TEXT_ENCODER, True)
        out |= {key: retrieval[key] for key in HEADS if key in retrieval}
    return out


def hf_text_model_to_med(
    state_dict: dict[str, torch.Tensor], decoder: bool = False, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A `BlipTextModel` state dict (optionally under `prefix`) -> our MED keys (no `text.`).

    With `decoder=True` its self-attention maps to our causal self-attention.
    """
    pairs = TEXT_DECODER if decoder else TEXT_ENCODER
    return map_prefixed(state_dict, prefix, "", pairs, reverse=True)


def hf_vision_model_to_vit(
    state_dict: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A `BlipVisionModel` state dict (optionally under `prefix`) -> our ViT keys."""
    return map_prefixed(state_dict, prefix, "", VIT_TO_HF, reverse=True)


def hf_blip_config(model: Any, **text_config_overrides: Any) -> Any:
    """A `transformers.BlipConfig` describing `model` (a `BlipPretrain`), for export or parity.

    Vision LayerNorm eps is copied from the model (1e-6 in the reference); dropout is 0 (HF
    defaults); bos = `model.dec_token_id`, pad = `model.pad_token_id`. Extra keyword arguments
    go to the text config (e.g. `label_smoothing=0.1`, `sep_token_id=...`).
    """
    from transformers import BlipConfig

    vit, text = model.visual_encoder, model.text
    block = vit.blocks[0]
    first = text.layers[0]
    cross_kv_width = first.cross_attn.key.in_features
    text_config = dict(
        vocab_size=text.embeddings.word_embeddings.num_embeddings,
        hidden_size=text.width,
        encoder_hidden_size=cross_kv_width,
        intermediate_size=first.ffn.fc1.out_features,
        num_hidden_layers=len(text.layers),
        num_attention_heads=first.self_attn.heads,
        max_position_embeddings=text.embeddings.position_embeddings.num_embeddings,
        layer_norm_eps=first.ffn.norm.eps,
        bos_token_id=model.dec_token_id,
        pad_token_id=model.pad_token_id,
    )
    text_config |= text_config_overrides
    patch = vit.patch_embed.proj.kernel_size[0]
    vision_config = dict(
        hidden_size=vit.width,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.heads,
        image_size=int(round(vit.num_patches**0.5)) * patch,
        patch_size=patch,
        layer_norm_eps=vit.norm.eps,
    )
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_text_hidden_size=model.embed_dim,
    )


__all__ = [
    "TEXT_EMBEDDINGS",
    "TEXT_FFN",
    "hf_blip_config",
    "hf_text_model_to_med",
    "hf_to_ours",
    "hf_vision_model_to_vit",
    "ours_to_hf_captioning",
    "ours_to_hf_retrieval",
]
