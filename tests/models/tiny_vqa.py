"""A tiny VQA model and inputs shared by the VQA tests (no downloads)."""

from __future__ import annotations

import torch

from blip_recipes.models.vqa import BlipVQA, build_vqa_model
from tests.models.tiny_blip import CLS_ID, DEC_ID, ENC_ID, PAD_ID, SEP_ID, VOCAB

TINY_VQA = dict(
    vocab_size=VOCAB,
    image_size=32,
    vision_width=32,
    vision_heads=2,
    text_width=32,
    text_heads=2,
    text_ffn_dim=64,
    max_positions=40,
    enc_token_id=ENC_ID,
    dec_token_id=DEC_ID,
    drop_path_rate=0.0,
)


def make_vqa(seed: int = 0, noise: float = 0.05, **overrides) -> BlipVQA:
    """The tiny VQA model with random (non-degenerate) weights, eval mode."""
    torch.manual_seed(seed)
    model = build_vqa_model("blip_pretrain_tiny", **{**TINY_VQA, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise)
    return model.eval()


def make_tokens(
    batch: int, length: int, seed: int = 1, min_length: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] words [SEP] [PAD]...` (B, L) with varied lengths (row 0 full) and the mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length), generator=gen)
    lengths = torch.randint(min_length, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    return ids.masked_fill(mask == 0, PAD_ID), mask


def answer_logits(model, states, mask, ids, ids_mask, **kwargs):
    """`model.answer_logits` unflattened to (R, La - 1, V)."""
    flat = model.answer_logits(states, mask, ids, ids_mask, **kwargs)
    return flat.view(ids.shape[0], ids.shape[1] - 1, -1)


__all__ = [
    "CLS_ID",
    "DEC_ID",
    "ENC_ID",
    "PAD_ID",
    "SEP_ID",
    "TINY_VQA",
    "answer_logits",
    "make_tokens",
    "make_vqa",
]
