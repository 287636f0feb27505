"""BlipPretrain: parameter counts, sharing, init, one full step, the shared cross-attention K/V."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.models import (
    blip_pretrain_base,
    blip_pretrain_large,
    blip_pretrain_tiny,
    build_model,
    build_momentum_encoders,
)
from blip_recipes.momentum import MomentumState
from tests.models.tiny_blip import TINY, make_model, make_text


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_counts_match_the_reference():
    with torch.device("meta"):
        base = blip_pretrain_base()
        large = blip_pretrain_large()
        momentum_base = build_momentum_encoders("blip_pretrain_base")
    assert _count(base) == 252_441_919
    assert _count(large) == 474_729_023
    assert _count(base.visual_encoder) == 85_798_656
    assert _count(large.visual_encoder) == 303_301_632
    # reference momentum copies (223.45M) minus the cross-attention it never runs (12 layers)
    cross = sum(p.numel() for layer in base.text.layers for p in layer.cross_attn.parameters())
    assert sum(p.numel() for p in momentum_base.parameters()) == 223_450_880 - cross
    assert not any(p.requires_grad for p in momentum_base.parameters())


def test_large_uses_linear_drop_path_rule():
    with torch.device("meta"):
        large = blip_pretrain_large()
    rates = [block.drop_path.p for block in large.visual_encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[12] == pytest.approx(0.1 * 12 / 23)


def test_shared_tensors_appear_once_and_lm_head_uses_word_embeddings(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params) == len(dict(model.named_parameters()))
    assert not any("lm_head" in n and n.endswith("weight") and "dense" not in n
                   and "norm" not in n for n, _ in model.named_parameters())  # fmt: skip
    hidden = torch.randn(1, 3, model.text.width)
    word = model.text.embeddings.word_embeddings.weight
    before = model.lm_head(hidden, word)
    with torch.no_grad():
        word[5].add_(1.0)
    assert not torch.allclose(before[..., 5], model.lm_head(hidden, word)[..., 5])
    layer = model.text.layers[0]
    assert layer.self_attn is not layer.causal_self_attn
    assert model.temp.shape == (1,)


def test_builders_accept_overrides_and_reject_unknown_names():
    model = blip_pretrain_tiny(vocab_size=120, embed_dim=8, queue_size=16, enc_token_id=7)
    assert model.text.embeddings.word_embeddings.num_embeddings == 120
    assert model.embed_dim == 8 and model.queue_size == 16 and model.enc_token_id == 7
    with pytest.raises(TypeError, match="unknown arguments"):
        build_model("blip_pretrain_tiny", not_a_knob=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("blip_pretrain_huge")


def test_meta_build_to_empty_then_init_weights():
    with torch.device("meta"):
        model = build_model("blip_pretrain_tiny", **TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.temp.item() == pytest.approx(0.07)
    assert model.lm_head.bias.abs().sum() == 0
    qkv = model.visual_encoder.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(0.02, rel=0.2)  # timm: truncation at +-2 (absolute)
    assert model.text.layers[0].ffn.norm.weight.eq(1).all()


@pytest.fixture
def tiny_model_inputs():
    model = make_model()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = make_text(4)
    return model, images, ids, mask


def _step(model, momentum, images, ids, mask, seed=0, alpha=0.4):
    momentum.update(model)
    targets = momentum.targets(images, ids, mask)
    return model(images, ids, mask, targets, alpha, torch.Generator().manual_seed(seed))


def test_one_step_reaches_every_parameter(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    model.train()
    momentum = MomentumState.build("blip_pretrain_tiny", **TINY)
    momentum.copy_from(model)
    out = _step(model, momentum, images, ids, mask)
    for name in ("loss", "loss_ita", "loss_itm", "loss_lm", "itm_acc", "itm_pos_prob"):
        value = getattr(out, name)
        assert value.shape == () and torch.isfinite(value), name
    assert torch.allclose(out.loss, out.loss_ita + out.loss_itm + out.loss_lm)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(p.grad is None for p in momentum.encoders.parameters())


def test_shared_cross_attention_kv_equals_recomputing_it(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    momentum = MomentumState.build("blip_pretrain_tiny", train_mode=False, **TINY)
    momentum.copy_from(model)
    targets = momentum.targets(images, ids, mask)
    results = []
    for share in (True, False):
        model.share_cross_attention_kv = share
        model.zero_grad()
        out = model(images, ids, mask, targets, 0.4, torch.Generator().manual_seed(1))
        out.loss.backward()
        grad = model.text.layers[0].cross_attn.key.weight.grad.clone()
        results.append((out.loss_itm.detach(), out.loss_lm.detach(), grad))
    for on, off in zip(*results):
        assert torch.allclose(on, off, atol=1e-5, rtol=1e-5)


def test_forward_under_bf16_autocast_keeps_losses_fp32(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    momentum = MomentumState.build("blip_pretrain_tiny", **TINY)
    momentum.copy_from(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _step(model, momentum, images, ids, mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_temperature_clamp_in_place_and_straight_through(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    with torch.no_grad():
        model.temp.fill_(1e-5)
    momentum = MomentumState.build("blip_pretrain_tiny", **TINY)
    out = _step(model, momentum, images, ids, mask)
    assert out.temp.item() == pytest.approx(0.001)
    out.loss.backward()
    assert model.temp.grad is not None and model.temp.grad.abs().item() > 0
    model.clamp_temperature_()
    assert model.temp.item() == pytest.approx(0.001)
