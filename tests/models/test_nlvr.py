"""The two-image NLVR model: structure, the merge layers, and the pretrained start."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.interop.nlvr import nlvr_from_pretrained
from blip_recipes.models import build_model
from blip_recipes.models.nlvr import build_nlvr_model, pair_med
from blip_recipes.models.row_layout import ENCODER_ROWS


def test_merge_layers_in_the_upper_half_by_default():
    text = pair_med(vocab_size=50, width=16, depth=4, heads=2, ffn_dim=32, vision_width=8)
    assert [layer.cross_attn.merge is not None for layer in text.layers] == [False, False, True,
                                                                              True]  # fmt: skip
    merge = text.layers[3].cross_attn.merge
    assert merge.weight.shape == (16, 32)
    assert text.layers[0].cross_attn.first.norm is None  # one shared residual LayerNorm
    with pytest.raises(ValueError, match="merge_from 5 is outside 0..4"):
        pair_med(vocab_size=50, width=16, depth=4, heads=2, ffn_dim=32, merge_from=5)


def test_logits_shape_and_enc_token():
    torch.manual_seed(0)
    model = build_nlvr_model("blip_pretrain_tiny", vocab_size=100, enc_token_id=7).eval()
    images = torch.randn(6, 3, 32, 32)
    ids = torch.randint(1, 100, (3, 5))
    logits = model.classify(model.encode_image(images), ids, torch.ones(3, 5, dtype=torch.long))
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    again = ids.clone()
    again[:, 0] = 7  # the first token is replaced by [ENC] whatever it was
    same = model.classify(model.encode_image(images), again, torch.ones(3, 5, dtype=torch.long))
    assert torch.equal(logits, same)


def test_pretrained_start_equals_the_itm_encoder_on_twin_images():
    """Started from a pretraining model, with averaging layers only, a pair of one image twice
    gives exactly the pretrained multimodal encoder's states: both image attentions are copies
    of the pretrained cross-attention and their mean is that attention."""
    torch.manual_seed(0)
    pretrained = build_model("blip_pretrain_tiny", vocab_size=100, enc_token_id=99).eval()
    nlvr = build_nlvr_model("blip_pretrain_tiny", vocab_size=100, merge_from=2,
                            drop_path_rate=0.0).eval()  # fmt: skip
    state = nlvr_from_pretrained(pretrained.state_dict())
    missing, unexpected = nlvr.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["cls_head.0.bias", "cls_head.0.weight",
                                                   "cls_head.2.bias", "cls_head.2.weight"]  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 100, (2, 6))
    ids[:, 0] = pretrained.enc_token_id
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        embeds = pretrained.visual_encoder(images)
        expected = pretrained.text(ids, mask, embeds, ENCODER_ROWS).hidden_states
        got = nlvr.text(ids, mask, embeds, embeds)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
