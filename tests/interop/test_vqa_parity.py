"""Our BlipVQA against transformers' BlipForQuestionAnswering with the same weights (fp32, eval):
question states, answer logits, ranking scores and generated answers; and the weight round trips
(ours <-> HF, ours <-> reference BLIP_VQA, pretraining -> VQA)."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.evaluation.vqa import generate_answers, rank_candidates
from blip_recipes.interop.files import CheckpointLayoutError
from blip_recipes.interop.vqa import (
    hf_vqa_to_ours,
    ours_to_hf_vqa,
    ours_to_reference_vqa,
    reference_vqa_to_ours,
    to_hf_vqa,
    vqa_from_pretrain,
)
from tests.models.tiny_blip import make_model
from tests.models.tiny_vqa import (
    DEC_ID,
    ENC_ID,
    PAD_ID,
    SEP_ID,
    answer_logits,
    make_tokens,
    make_vqa,
)

transformers = pytest.importorskip("transformers")
TOL = 3e-5  # fp32 summation order; weights with std ~0.3 give activations ~1


@pytest.fixture(scope="module")
def setup():
    model = make_vqa(seed=11, noise=0.3)
    hf = to_hf_vqa(model, sep_token_id=SEP_ID)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    q_ids, q_mask = make_tokens(3, 8, seed=3)
    enc_ids = q_ids.clone()
    enc_ids[:, 0] = ENC_ID  # transformers puts no [ENC]: give both the same ids
    with torch.no_grad():
        ours = model.encode_question(model.encode_image(images), q_ids, q_mask)
        vision = hf.vision_model(pixel_values=images).last_hidden_state
        theirs = hf.text_encoder(input_ids=enc_ids, attention_mask=q_mask,
                                 encoder_hidden_states=vision).last_hidden_state  # fmt: skip
    return model, hf, images, q_ids, q_mask, enc_ids, ours, theirs


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_question_states_match(setup):
    *_, ours, theirs = setup
    assert _diff(ours, theirs) <= TOL


def test_answer_logits_match(setup):
    model, hf, _, _, q_mask, _, ours, theirs = setup
    q_mask = torch.ones_like(q_mask)  # see test_transformers_cross_attention_ignores_its_mask
    a_ids, a_mask = make_tokens(3, 5, seed=4)
    dec_ids = a_ids.clone()
    dec_ids[:, 0] = DEC_ID
    with torch.no_grad():
        mine = answer_logits(model, ours, q_mask, a_ids, a_mask)
        hf_logits = hf.text_decoder(input_ids=dec_ids, attention_mask=a_mask,
                                    encoder_hidden_states=theirs,
                                    encoder_attention_mask=q_mask).logits  # fmt: skip
    valid = a_mask[:, :-1].bool()
    assert _diff(mine[valid], hf_logits[:, :-1][valid]) <= TOL


def test_transformers_cross_attention_ignores_its_mask(setup):
    """transformers 5's BLIP text attention drops `encoder_attention_mask` (its cross-attention
    reads a keyword that is never passed), so it attends padded question positions; the reference
    and we mask them. Our numbers match transformers' for unpadded questions (the tests here) and
    in generation (where both attend every question position)."""
    model, hf, _, _, q_mask, _, ours, theirs = setup
    assert not bool(q_mask.all())
    a_ids, a_mask = make_tokens(3, 5, seed=4)
    a_ids[:, 0] = DEC_ID
    with torch.no_grad():
        masked = hf.text_decoder(
            input_ids=a_ids,
            attention_mask=a_mask,
            encoder_hidden_states=theirs,
            encoder_attention_mask=q_mask,
        )
        unmasked = hf.text_decoder(input_ids=a_ids, attention_mask=a_mask,
                                   encoder_hidden_states=theirs,
                                   encoder_attention_mask=torch.ones_like(q_mask))  # fmt: skip
        mine = answer_logits(model, ours, q_mask, a_ids, a_mask)
    if not torch.equal(masked.logits, unmasked.logits):
        pytest.skip("this transformers version masks BLIP's cross-attention: compare padded too")
    padded_row = int((~q_mask.bool()).any(1).nonzero()[0])
    assert _diff(mine[padded_row], masked.logits[padded_row, :-1]) > 1e-3


def test_rank_scores_match_the_reference_algorithm_on_transformers(setup):
    model, hf, _, _, q_mask, _, ours, theirs = setup
    q_mask = torch.ones_like(q_mask)  # see test_transformers_cross_attention_ignores_its_mask
    cand_ids, cand_mask = make_tokens(7, 5, seed=5)
    cand_ids[:, 0] = DEC_ID
    k = 4
    with torch.no_grad():
        result = rank_candidates(model, ours, q_mask, cand_ids, cand_mask, k)
        # the reference's rank_answer, written against transformers' decoder
        start = hf.text_decoder(input_ids=torch.full((3, 1), DEC_ID), encoder_hidden_states=theirs,
                                encoder_attention_mask=q_mask).logits[:, 0]  # fmt: skip
        probs = start.softmax(-1).index_select(1, cand_ids[:, 1])
        top_probs, top_ids = probs.topk(k, dim=1)
        ids, mask = cand_ids[top_ids.flatten()], cand_mask[top_ids.flatten()]
        labels = ids.masked_fill(ids == PAD_ID, -100)
        out = hf.text_decoder(input_ids=ids, attention_mask=mask,
                              encoder_hidden_states=theirs.repeat_interleave(k, 0),
                              encoder_attention_mask=q_mask.repeat_interleave(k, 0),
                              labels=labels, reduction="none")  # fmt: skip
        scores = -out.loss.view(3, k)
    assert torch.equal(result.topk, top_ids)
    assert _diff(result.first_probs, top_probs) <= 1e-6
    assert _diff(result.scores, scores) <= TOL
    assert result.best.tolist() == top_ids.gather(1, scores.argmax(1, keepdim=True))[:, 0].tolist()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_answers_match(setup, num_beams):
    model, hf, images, _, q_mask, enc_ids, ours, _ = setup
    with torch.no_grad():
        mine = generate_answers(model, ours, SEP_ID, num_beams=num_beams, max_length=10)
        theirs = hf.generate(input_ids=enc_ids, pixel_values=images, attention_mask=q_mask,
                             num_beams=num_beams, max_length=10, min_length=1,
                             do_sample=False)  # fmt: skip
    for row, ids in zip(theirs.tolist(), mine):
        row = row[1:]  # [DEC]
        row = row[: row.index(SEP_ID)] if SEP_ID in row else row
        row = [t for t in row if t != PAD_ID]
        assert ids.tolist() == row
    assert any(len(ids) > 1 for ids in mine)


def test_weight_round_trips(setup):
    model = setup[0]
    state = model.state_dict()
    hf_state = ours_to_hf_vqa(state)
    assert set(hf_state) == set(setup[1].state_dict()) - {
        k for k in setup[1].state_dict() if k.endswith("position_ids")
    }
    back = hf_vqa_to_ours(hf_state)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    reference = ours_to_reference_vqa(state)
    assert "text_decoder.bert.embeddings.position_ids" in reference
    assert "text_encoder.encoder.layer.0.crossattention.self.key.weight" in reference
    back = reference_vqa_to_ours(reference)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointLayoutError, match="no place in the BLIP VQA model: extra.w"):
        reference_vqa_to_ours({**reference, "extra.w": torch.zeros(1)}, "x.pth")


def test_vqa_from_pretrain_takes_encoder_and_decoder_sides():
    pretrain = make_model(seed=1, vision_width=32)
    state = vqa_from_pretrain(pretrain.state_dict())
    vqa = make_vqa(seed=0)
    result = vqa.load_state_dict(state, strict=True)
    assert not result.missing_keys
    text = pretrain.text.layers[1]
    enc, dec = vqa.question_encoder.layers[1], vqa.answer_decoder.layers[1]
    assert torch.equal(enc.self_attn.query.weight, text.self_attn.query.weight)
    assert torch.equal(dec.causal_self_attn.query.weight, text.causal_self_attn.query.weight)
    assert torch.equal(enc.cross_attn.key.weight, dec.cross_attn.key.weight)
    assert enc.cross_attn.key.weight.data_ptr() != dec.cross_attn.key.weight.data_ptr()


def test_read_vqa_weights_from_files(setup, tmp_path):
    from blip_recipes.interop.vqa import export_hf_vqa, read_vqa_weights

    model = setup[0]
    state = model.state_dict()
    torch.save({"model": ours_to_reference_vqa(state)}, tmp_path / "model_vqa.pth")
    export_hf_vqa(model, tmp_path / "hf", sep_token_id=SEP_ID)
    torch.save({"model": make_model(seed=1, vision_width=32).state_dict()}, tmp_path / "ours.pt")
    for source in (tmp_path / "model_vqa.pth", tmp_path / "hf"):
        read = read_vqa_weights(source)
        assert set(read) == set(state) and all(torch.allclose(read[k], state[k]) for k in state)
    started = read_vqa_weights(tmp_path / "ours.pt")  # a pretraining model: the VQA start
    assert set(started) == set(state)
    from blip_recipes.interop.reference import ours_to_reference

    pretrain = make_model(seed=1, vision_width=32).state_dict()
    torch.save({"model": ours_to_reference(pretrain)}, tmp_path / "model_base.pth")
    started = read_vqa_weights(tmp_path / "model_base.pth")  # a reference pretraining file
    assert set(started) == set(state)
    assert torch.equal(started["answer_decoder.layers.0.causal_self_attn.query.weight"],
                       pretrain["text.layers.0.causal_self_attn.query.weight"])  # fmt: skip


def test_blip_convert_routes_vqa_models(setup, tmp_path):
    from blip_recipes.commands.convert_checkpoint import main as convert

    model, hf = setup[0], setup[1]
    state = model.state_dict()
    torch.save({"model": ours_to_reference_vqa(state)}, tmp_path / "model_vqa.pth")
    heads = ["--set", "vision_heads=2", "--set", "text_heads=2"]
    assert (
        convert([str(tmp_path / "model_vqa.pth"), str(tmp_path / "hf"), "--to", "hf", *heads]) == 0
    )
    loaded = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    for key, value in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert convert([str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "reference"]) == 0
    back = reference_vqa_to_ours(torch.load(tmp_path / "back.pth")["model"])
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert convert([str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 1  # no DCP form: one line
