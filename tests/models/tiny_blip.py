"""Shared tiny models and inputs for the model tests (no downloads)."""

from __future__ import annotations

import torch

from blip_recipes.models import BlipPretrain, build_model

VOCAB = 100
DEC_ID, ENC_ID, PAD_ID, CLS_ID, SEP_ID = 98, 99, 0, 1, 2
TINY = dict(
    vocab_size=VOCAB,
    image_size=32,
    vision_width=48,
    vision_heads=2,
    text_width=32,
    text_heads=2,
    text_ffn_dim=64,
    embed_dim=16,
    max_positions=40,
    queue_size=32,
    enc_token_id=ENC_ID,
    dec_token_id=DEC_ID,
)


def make_model(seed: int = 0, **overrides) -> BlipPretrain:
    """The tiny model with small vocab, random (non-degenerate) weights, eval mode."""
    torch.manual_seed(seed)
    model = build_model("blip_pretrain_tiny", **{**TINY, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "temp":
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def make_text(batch: int, length: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] words [SEP] [PAD]...` ids (B, L) with varied lengths, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length), generator=gen)
    lengths = torch.randint(4, length + 1, (batch,), generator=gen)
    lengths[0] = length
    positions = torch.arange(length)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask
