"""Reference `.pth` layout round trip; BERT and DeiT/timm initialisation loaders."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.interop import (
    bert_init_state_dict,
    load_state_dict_file,
    ours_to_reference,
    reference_to_ours,
    vit_init_state_dict,
)
from blip_recipes.models import vit
from tests.models.tiny_blip import TINY, make_model, make_text, momentum_state

transformers = pytest.importorskip("transformers")


def test_reference_layout_round_trip_is_exact(tmp_path):
    model = make_model()
    state = momentum_state(queue_size=8, seed=1)
    state.copy_from(model)
    queues = {"image_queue": state.image_queue, "text_queue": state.text_queue,
              "queue_ptr": state.queue_ptr}  # fmt: skip
    ref = ours_to_reference(model.state_dict(), state.encoders.state_dict(), queues)
    assert ref["temp"].shape == ()
    assert torch.equal(ref["text_encoder.embeddings.word_embeddings.weight"],
                       ref["text_decoder.bert.embeddings.word_embeddings.weight"])  # fmt: skip
    assert "text_encoder_m.encoder.layer.0.crossattention.self.key.weight" in ref
    assert not torch.equal(ref["text_encoder.encoder.layer.0.attention.self.query.weight"],
                           ref["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    torch.save({"model": ref}, tmp_path / "model_base.pth")
    back = reference_to_ours(load_state_dict_file(tmp_path / "model_base.pth"))
    ours = model.state_dict()
    assert set(back.model) == set(ours)
    assert all(torch.equal(back.model[k], v) for k, v in ours.items())
    momentum = state.encoders.state_dict()
    assert set(back.momentum) == set(momentum)
    assert all(torch.equal(back.momentum[k], v) for k, v in momentum.items())
    assert torch.equal(back.queues["image_queue"], state.image_queue)
    model.load_state_dict(back.model, strict=True)
    state.encoders.load_state_dict(back.momentum, strict=True)


def test_bert_init_matches_bert_model_without_token_types():
    config = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=40)  # fmt: skip
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
        bert.cls.predictions.bias.normal_()
    sd = bert_init_state_dict(bert.state_dict(), vocab_size=TINY["vocab_size"], seed=0)
    assert not any("token_type" in k or "crossattention" in k for k in sd)
    model = make_model()
    cross_before = model.text.layers[0].cross_attn.key.weight.clone()
    result = model.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    word = model.text.embeddings.word_embeddings.weight
    assert word.shape[0] == 100 and torch.equal(
        word[:90], bert.bert.embeddings.word_embeddings.weight
    )
    assert model.lm_head.bias[90:].eq(0).all()
    assert torch.equal(model.lm_head.bias[:90], bert.cls.predictions.bias)
    assert torch.equal(model.text.layers[1].causal_self_attn.query.weight,
                       model.text.layers[1].self_attn.query.weight)  # fmt: skip
    assert torch.equal(model.text.layers[0].cross_attn.key.weight, cross_before)
    ids, mask = make_text(3)
    ids = ids.clamp_max(89)
    with torch.no_grad():
        ours = model.text(ids, mask).hidden_states
        theirs = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_vit_init_drops_head_and_interpolates_pos_embed(tmp_path):
    source = vit(patch_size=16, image_size=64, width=48, depth=2, heads=2)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 48), torch.zeros(10)
    sd["dist_token"] = torch.zeros(1, 1, 48)
    pos = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([pos[:, :1], torch.zeros(1, 1, 48), pos[:, 1:]], dim=1)
    torch.save({"model": sd}, tmp_path / "deit.pth")
    mapped = vit_init_state_dict(tmp_path / "deit.pth", image_size=32)
    assert mapped["visual_encoder.pos_embed"].shape == (1, 5, 48)
    assert torch.equal(mapped["visual_encoder.pos_embed"][:, 0], pos[:, 0])
    model = make_model()
    result = model.load_state_dict(mapped, strict=False)
    assert result.unexpected_keys == []
    assert not any(k.startswith("visual_encoder.") for k in result.missing_keys)
