"""Reference NLVR `.pth` names <-> ours, and the start from a pretraining checkpoint."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.interop.nlvr import (
    nlvr_from_pretrained,
    nlvr_reference_to_ours,
    ours_to_nlvr_reference,
    read_nlvr_weights,
)
from blip_recipes.models import build_model
from blip_recipes.models.nlvr import build_nlvr_model

# written out from the reference's models/nlvr_encoder.py and blip_nlvr.py, layer 1 of 2
REFERENCE_LAYER_1 = {
    f"text_encoder.encoder.layer.1.{name}.{p}"
    for name in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "attention.output.LayerNorm",
        "crossattention.self0.query", "crossattention.self0.key", "crossattention.self0.value",
        "crossattention.self1.query", "crossattention.self1.key", "crossattention.self1.value",
        "crossattention.output.dense0", "crossattention.output.dense1",
        "crossattention.output.LayerNorm", "crossattention.output.merge_layer",
        "intermediate.dense", "output.dense", "output.LayerNorm",
    )
    for p in ("weight", "bias")
}  # fmt: skip


def _model():
    torch.manual_seed(0)
    return build_nlvr_model("blip_pretrain_tiny", vocab_size=100)


def test_reference_names_round_trip(tmp_path):
    ours = _model().state_dict()
    reference = ours_to_nlvr_reference(ours)
    layer_1 = {k for k in reference if k.startswith("text_encoder.encoder.layer.1.")}
    assert layer_1 == REFERENCE_LAYER_1
    assert (
        "cls_head.2.weight" in reference and "text_encoder.embeddings.LayerNorm.weight" in reference
    )
    assert not any("merge_layer" in k for k in reference if ".layer.0." in k)  # averaging layer
    reference["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    back = nlvr_reference_to_ours(reference)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    torch.save({"model": reference}, tmp_path / "model_base_nlvr.pth")
    read, kind = read_nlvr_weights(tmp_path / "model_base_nlvr.pth")
    assert kind == "reference_nlvr" and read.keys() == ours.keys()


def test_unplaced_reference_key_is_named():
    reference = ours_to_nlvr_reference(_model().state_dict())
    reference["text_encoder.encoder.layer.0.crossattention.self2.query.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="crossattention.self2.query.weight"):
        nlvr_reference_to_ours(reference)


def test_pretrained_cross_attention_copied_to_both_images(tmp_path):
    torch.manual_seed(0)
    pretrained = build_model("blip_pretrain_tiny", vocab_size=100).state_dict()
    state = nlvr_from_pretrained(pretrained)
    source = pretrained["text.layers.1.cross_attn.key.weight"]
    for branch in ("first", "second"):
        copy = state[f"text.layers.1.cross_attn.{branch}.key.weight"]
        assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    assert torch.equal(state["text.layers.1.cross_attn.norm.weight"],
                       pretrained["text.layers.1.cross_attn.norm.weight"])  # fmt: skip
    assert not any(k.startswith(("lm_head.", "itm_head.", "temp")) or "causal" in k for k in state)
    torch.save(pretrained, tmp_path / "ours.pt")
    read, kind = read_nlvr_weights(tmp_path / "ours.pt")
    assert kind == "pretrained" and read.keys() == state.keys()
