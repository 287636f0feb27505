"""BlipVQA's entry points: shapes, masks, and the row layouts agreeing with each other."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.models.vqa import BlipVQA
from tests.models.tiny_vqa import answer_logits, make_tokens, make_vqa


@pytest.fixture(scope="module")
def setup():
    model = make_vqa(seed=2)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q_ids, q_mask = make_tokens(3, 9, seed=4)
    with torch.no_grad():
        states = model.encode_question(model.encode_image(images), q_ids, q_mask)
    return model, images, q_ids, q_mask, states


def test_parts_and_no_forward(setup):
    model = setup[0]
    assert model.question_encoder.layers[0].causal_self_attn is None
    assert model.answer_decoder.layers[0].self_attn is None
    assert model.answer_decoder.layers[0].cross_attn.key.in_features == 32
    with pytest.raises(TypeError, match="encode_question"):
        model(torch.zeros(1))
    assert isinstance(model, BlipVQA)


def test_question_states_ignore_trailing_padding(setup):
    model, images, q_ids, q_mask, states = setup
    padded_ids = torch.cat([q_ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    padded_mask = torch.cat([q_mask, torch.zeros(3, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        longer = model.encode_question(model.encode_image(images), padded_ids, padded_mask)
    keep = q_mask.bool()
    assert torch.allclose(longer[:, :9][keep], states[keep], atol=1e-5)


def test_decoder_masks_question_padding(setup):
    model, _, _, q_mask, states = setup
    a_ids, a_mask = make_tokens(3, 5, seed=7)
    noisy = states.clone()
    noisy[~q_mask.bool()] = 100.0  # padded question positions: never attended
    with torch.no_grad():
        clean = answer_logits(model, states, q_mask, a_ids, a_mask)
        changed = answer_logits(model, noisy, q_mask, a_ids, a_mask)
        unmasked = answer_logits(model, noisy, torch.ones_like(q_mask), a_ids, a_mask)
    assert clean.shape == (3, 4, 100)
    assert torch.allclose(clean, changed, atol=1e-5)
    assert not torch.allclose(clean, unmasked, atol=1e-3)


def test_packed_rows_equal_indexed_rows(setup):
    model, _, _, q_mask, states = setup
    a_ids, a_mask = make_tokens(6, 5, seed=8)  # 2 answers per question, question-major
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        packed = answer_logits(model, states, q_mask, a_ids, a_mask)
        indexed = answer_logits(model, states, q_mask, a_ids, a_mask, question_rows=rows)
        copied = answer_logits(model, states[rows], q_mask[rows], a_ids, a_mask)
    valid = a_mask[:, 1:].bool()
    assert torch.allclose(packed[valid], indexed[valid], atol=1e-5)
    assert torch.allclose(copied[valid], indexed[valid], atol=1e-5)


def test_next_token_logits_match_teacher_forcing(setup):
    model, _, _, q_mask, states = setup
    a_ids, a_mask = make_tokens(3, 4, seed=9, min_length=4)
    with torch.no_grad():
        full = answer_logits(model, states, q_mask, a_ids, a_mask)
        prefix = a_ids[:, :3].clone()
        prefix[:, 0] = model.dec_token_id
        step, kv = model.next_token_logits(prefix, states, q_mask)
        again, _ = model.next_token_logits(prefix, None, q_mask, kv)
    assert torch.allclose(step, full[:, 2], atol=1e-5)
    assert torch.equal(step, again)
