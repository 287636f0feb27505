"""Our ViT / MED / LM head / ITM against transformers' BLIP with the same weights (fp32, eval)."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.interop._names import strip_prefixes
from blip_recipes.interop.hf import (
    hf_blip_config,
    hf_to_ours,
    ours_to_hf_captioning,
    ours_to_hf_retrieval,
)
from blip_recipes.models.row_layout import DECODER_ROWS
from blip_recipes.objectives import pretrain as objective
from tests.models.tiny_blip import DEC_ID, ENC_ID, PAD_ID, SEP_ID, make_model, make_text

transformers = pytest.importorskip("transformers")
TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    model = make_model(seed=3)
    config = hf_blip_config(model, label_smoothing=0.1, sep_token_id=SEP_ID, eos_token_id=SEP_ID)
    retrieval = transformers.BlipForImageTextRetrieval(config).eval()
    captioning = transformers.BlipForConditionalGeneration(config).eval()
    state = model.state_dict()
    retrieval.load_state_dict(ours_to_hf_retrieval(state), strict=True)
    captioning.load_state_dict(ours_to_hf_captioning(state), strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids, mask = make_text(3)
    return model, config, retrieval, captioning, images, ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_vit_matches_blip_vision_model(setup):
    model, config, retrieval, _, images, _, _ = setup
    vision = transformers.BlipVisionModel(config.vision_config).eval()
    vision.load_state_dict(strip_prefixes(retrieval.vision_model.state_dict(), []), strict=True)
    assert config.vision_config.layer_norm_eps == 1e-6
    with torch.no_grad():
        ours = model.visual_encoder(images)
        theirs = vision(pixel_values=images).last_hidden_state
    assert _max_diff(ours, theirs) <= TOL


def test_vit_interpolated_position_embedding_matches(setup):
    model, _, retrieval, _, _, _, _ = setup
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = model.visual_encoder(images)
        theirs = retrieval.vision_model(
            pixel_values=images, interpolate_pos_encoding=True
        ).last_hidden_state
    assert ours.shape == (2, 10, 48)
    assert _max_diff(ours, theirs) <= TOL


def test_med_text_and_multimodal_match_blip_text_model(setup):
    model, config, retrieval, _, _, ids, mask = setup
    text_model = transformers.BlipTextModel(config.text_config, add_pooling_layer=False).eval()
    text_model.load_state_dict(retrieval.text_encoder.state_dict(), strict=True)
    image_embeds = torch.randn(3, 5, 48)
    with torch.no_grad():
        ours_text = model.text(ids, mask).hidden_states
        theirs_text = text_model(input_ids=ids, attention_mask=mask, is_decoder=False)
        ours_mm = model.text(ids, mask, image_embeds).hidden_states
        theirs_mm = text_model(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(3, 5, dtype=torch.long),
            is_decoder=False,
        )
    assert _max_diff(ours_text, theirs_text.last_hidden_state) <= TOL
    assert _max_diff(ours_mm, theirs_mm.last_hidden_state) <= TOL


def test_decoder_and_lm_loss_match_blip_text_lm_head_model(setup):
    model, config, _, captioning, _, ids, mask = setup
    lm_model = transformers.BlipTextLMHeadModel(config.text_config).eval()
    lm_model.load_state_dict(captioning.text_decoder.state_dict(), strict=True)
    assert lm_model.label_smoothing == 0.1
    image_embeds = torch.randn(3, 5, 48)
    dec_ids = objective.replace_first_token(ids, DEC_ID)
    labels = objective.lm_labels(dec_ids, PAD_ID)
    with torch.no_grad():
        hidden = model.text(dec_ids, mask, image_embeds, DECODER_ROWS).hidden_states
        logits = model.lm_head(hidden, model.text.embeddings.word_embeddings.weight)
        loss = objective.lm_loss(logits, labels, 0.1)
        theirs = lm_model(
            input_ids=dec_ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(3, 5, dtype=torch.long),
            labels=labels,
        )
    assert _max_diff(logits, theirs.logits) <= TOL
    assert abs(loss.item() - theirs.loss.item()) <= TOL


def test_itm_logits_and_itc_similarity_match_retrieval_model(setup):
    model, _, retrieval, _, images, ids, mask = setup
    enc_ids = objective.replace_first_token(ids, ENC_ID)
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
        hidden = model.text(enc_ids, mask, image_embeds).hidden_states
        ours_itm = model.itm_head(hidden[:, 0])
        theirs_itm = retrieval(input_ids=enc_ids, pixel_values=images, attention_mask=mask)
        image_feat = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        text_hidden = model.text(ids, mask).hidden_states
        text_feat = torch.nn.functional.normalize(model.text_proj(text_hidden[:, 0]), dim=-1)
        theirs_itc = retrieval(
            input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False
        )
    assert _max_diff(ours_itm, theirs_itm.itm_score) <= TOL
    assert _max_diff(image_feat @ text_feat.t(), theirs_itc.itm_score) <= TOL


def test_hf_to_ours_to_hf_round_trip_is_bit_exact(setup):
    model, _, retrieval, captioning, _, _, _ = setup
    ret_state, cap_state = retrieval.state_dict(), captioning.state_dict()
    ours = hf_to_ours(ret_state, cap_state)
    missing = set(model.state_dict()) - set(ours)
    assert missing == {"temp"}
    for name, back in (
        (ret_state, ours_to_hf_retrieval(ours)),
        (cap_state, ours_to_hf_captioning(ours)),
    ):
        assert set(back) == set(name)
        for key, value in name.items():
            assert torch.equal(back[key], value), key


def test_ours_to_hf_to_ours_round_trip_is_bit_exact(setup):
    model = setup[0]
    state = model.state_dict()
    back = hf_to_ours(ours_to_hf_retrieval(state), ours_to_hf_captioning(state))
    for key, value in state.items():
        if key != "temp":
            assert torch.equal(back[key], value), key
