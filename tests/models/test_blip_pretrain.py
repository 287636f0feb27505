"""BlipPretrain: parameter counts, sharing, init, one full step, the packed multimodal pass."""

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
from blip_recipes.models.heads import project_features
from blip_recipes.models.row_layout import DECODER_ROWS
from blip_recipes.objectives import pretrain as objective
from blip_recipes.training.momentum import MomentumState
from blip_recipes.training.pretrain import pretrain_losses
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
    assert model.embed_dim == 8 and model.enc_token_id == 7
    assert not hasattr(model, "queue_size")  # the momentum state's, not the model's
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


def _step(model, momentum, images, ids, mask, seed=0, alpha=0.4, negative_kv="select"):
    momentum.update(model)
    targets = momentum.targets(images, ids, mask)
    return pretrain_losses(
        model, images, ids, mask, targets, alpha, torch.Generator().manual_seed(seed), negative_kv
    )


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


def three_pass_losses(model, images, ids, mask, targets, alpha, generator):
    """The reference's formulation: text pass, a 3B-row ITM pass over gathered images, a
    B-row decoder pass (each MED layer run three times, image keys/values recomputed)."""
    image_embeds = model.visual_encoder(images)
    image_feat = project_features(model.vision_proj, image_embeds[:, 0])
    text_feat = project_features(model.text_proj, model.text(ids, mask).hidden_states[:, 0])
    temp = model.temperature()
    itc = objective.itc_loss(image_feat, text_feat, targets.image_feat_m, targets.text_feat_m,
                             targets.image_queue, targets.text_queue, temp, alpha)  # fmt: skip
    neg_image, neg_text = objective.sample_hard_negatives(
        itc.sim_i2t.detach(), itc.sim_t2i.detach(), generator
    )
    own = torch.arange(ids.shape[0])
    text_rows, image_rows = torch.cat([own, own, neg_text]), torch.cat([own, neg_image, own])
    enc = objective.replace_first_token(ids, model.enc_token_id)
    itm_hidden = model.text(enc[text_rows], mask[text_rows], image_embeds[image_rows])
    itm = objective.itm_loss(model.itm_head(itm_hidden.hidden_states[:, 0]))
    dec = objective.replace_first_token(ids, model.dec_token_id)
    dec_hidden = model.text(dec, mask, image_embeds, DECODER_ROWS).hidden_states
    logits = model.lm_head(dec_hidden[:, :-1], model.text.embeddings.word_embeddings.weight)
    lm = objective.lm_loss(logits, objective.lm_labels(dec, model.pad_token_id), 0.1)
    return itc.loss, itm.loss, lm


@pytest.mark.parametrize("negative_kv,chunks", [("select", 3), ("select", 0), ("recompute", 0)])
def test_one_multimodal_pass_equals_three_passes(tiny_model_inputs, negative_kv, chunks):
    """Losses and every gradient of the packed pass equal the three-pass formulation (fp32,
    dropout off), including padded captions (causal fast path) and repeated negatives, whether
    the negatives' keys/values are selected from the batch's or recomputed, and whether the LM
    loss is chunked inside the pass or computed from full fp32 logits (chunks=0)."""
    lm_loss = objective.ChunkedLMLoss(chunks) if chunks else None
    model, images, ids, mask = tiny_model_inputs
    momentum = MomentumState.build("blip_pretrain_tiny", train_mode=False, **TINY)
    momentum.copy_from(model)
    targets = momentum.targets(images, ids, mask)
    assert (mask == 0).any()  # some captions are padded
    results = []
    for compute in ("packed", "three"):
        model.zero_grad()
        generator = torch.Generator().manual_seed(1)
        if compute == "packed":
            out = pretrain_losses(model, images, ids, mask, targets, 0.4, generator, negative_kv,
                                  lm_loss)  # fmt: skip
            losses = (out.loss_ita, out.loss_itm, out.loss_lm)
        else:
            losses = three_pass_losses(model, images, ids, mask, targets, 0.4, generator)
        sum(losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((torch.stack([x.detach() for x in losses]), grads))
    (packed, packed_grads), (three, three_grads) = results
    assert torch.allclose(packed, three, atol=1e-6, rtol=1e-6)
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, three_grads[name], atol=1e-6, rtol=1e-5), name


def test_each_med_layer_runs_twice_per_step(tiny_model_inputs):
    model, images, ids, mask = tiny_model_inputs
    momentum = MomentumState.build("blip_pretrain_tiny", **TINY)
    calls = {i: 0 for i in range(len(model.text.layers))}
    for i, layer in enumerate(model.text.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    _step(model, momentum, images, ids, mask).loss.backward()
    assert set(calls.values()) == {2}  # unimodal text pass + one multimodal pass


def _gather_scatter_ops(text_depth: int, negative_kv: str = "select") -> dict[str, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name.startswith(("index", "gather", "scatter")):
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model("blip_pretrain_tiny", **{**TINY, "text_depth": text_depth}).train()
    momentum = MomentumState.build("blip_pretrain_tiny", **{**TINY, "text_depth": text_depth})
    momentum.copy_from(model)
    images = torch.randn(4, 3, 32, 32)
    ids, mask = make_text(4)
    with Count():
        _step(model, momentum, images, ids, mask, negative_kv=negative_kv).loss.backward()
    return counts


def test_no_gather_or_scatter_per_med_layer():
    """Index/gather/scatter ops of a step do not grow with the MED depth. With the negatives'
    keys/values selected (the default) nothing with a gradient is indexed at all: the two
    index ops pick the negative texts' ids and masks, and no backward scatters (the selection's
    backward is a matmul); recomputing them gathers the negative images' tokens once per step."""
    shallow, deep = _gather_scatter_ops(2), _gather_scatter_ops(6)
    assert shallow == deep == {"index": 2}
    recompute = _gather_scatter_ops(6, "recompute")
    assert recompute == _gather_scatter_ops(2, "recompute") == {"index": 3, "index_put": 1}


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


def test_calling_the_model_names_its_entry_points(tiny_model_inputs):
    model, images, *_ = tiny_model_inputs
    with pytest.raises(TypeError, match="encode_image, encode_text"):
        model(images)
