"""MED: rows that must fit their layout, the causal fast path, packed beams."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.models.row_layout import DECODER_ROWS, RowLayout
from tests.models.tiny_blip import make_model, make_text


def test_rows_must_fit_the_layout():
    model = make_model()
    ids, mask = make_text(5)
    embeds = torch.randn(2, 5, model.visual_encoder.width)
    with pytest.raises(ValueError, match="do not fit layout"):
        model.text(ids, mask, embeds, RowLayout.of((2, 1)))


def test_causal_fast_path_equals_the_masked_decoder_at_every_token():
    model = make_model()
    ids, mask = make_text(4)
    assert (mask == 0).any()
    embeds = model.visual_encoder(torch.randn(4, 3, 32, 32))
    masked = model.text(ids, mask, embeds, DECODER_ROWS).hidden_states
    fast = model.text(ids, mask, embeds, DECODER_ROWS, causal_fast_path=True).hidden_states
    tokens = mask.bool()
    assert torch.allclose(fast[tokens], masked[tokens], atol=1e-6)


def test_packed_beams_equal_one_row_per_image():
    model = make_model()
    embeds = model.visual_encoder(torch.randn(2, 3, 32, 32))
    prefixes = torch.randint(3, 90, (6, 5))  # 2 images x 3 beams, image-major
    packed, kv = model.next_token_logits(prefixes, embeds, rows_per_image=3)
    single, _ = model.next_token_logits(prefixes, embeds.repeat_interleave(3, 0))
    assert torch.allclose(packed, single, atol=1e-5)
    again, _ = model.next_token_logits(prefixes, cross_kv=kv, rows_per_image=3)
    assert torch.equal(again, packed)  # cached keys/values give the same logits
