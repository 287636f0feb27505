import math

import pytest
import torch

from blip_recipes.benchmarking.baseline_hf import build_hf_baseline
from blip_recipes.benchmarking.inputs import synthetic_batches
from blip_recipes.models import build_model

VOCAB, B, Q = 120, 8, 64
TOKENS = dict(pad_token_id=0, enc_token_id=VOCAB - 1, dec_token_id=VOCAB - 2)


def _baseline():
    torch.manual_seed(0)
    return build_hf_baseline(
        "blip_pretrain_tiny", image_size=32, queue_size=Q, device=torch.device("cpu"),
        bf16=False, vocab_size=VOCAB, embed_dim=256, seed=0, **TOKENS,
    )  # fmt: skip


def _batch():
    return synthetic_batches(B, 32, VOCAB, {"pad": 0, "cls": 2, "sep": 3}, torch.device("cpu"))[0]


def test_same_trainable_sizes_as_ours_and_reference_weight_sharing():
    step = _baseline()
    model = step.model
    ours = build_model(
        "blip_pretrain_tiny", vocab_size=VOCAB, embed_dim=256, queue_size=Q, **TOKENS
    )
    baseline_params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in baseline_params) == sum(p.numel() for p in ours.parameters())
    enc, dec = model.text_encoder.encoder.layer[0], model.text_decoder.bert.encoder.layer[0]
    assert dec.crossattention is enc.crossattention and dec.output is enc.output
    assert dec.attention is not enc.attention
    assert (model.text_decoder.cls.predictions.decoder.weight
            is model.text_encoder.embeddings.word_embeddings.weight)  # fmt: skip
    assert not any(p.requires_grad for p in model.visual_encoder_m.parameters())


def test_step_losses_match_the_reference_magnitudes_and_state_moves():
    step = _baseline()
    model = step.model
    before = next(model.visual_encoder_m.parameters()).detach().clone()
    queue_before = model.image_queue.clone()
    losses = step.train_step(_batch(), alpha=0.4)
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["loss_ita"] - math.log(B + Q)) < 1.0  # near-uniform over B + Q at init
    assert 0.4 < losses["loss_itm"] < 1.2  # about log 2 with a random head on a 64-wide model
    assert 0.5 * math.log(VOCAB) < losses["loss_lm"] < 1.5 * math.log(VOCAB)
    assert int(model.queue_ptr) == B
    assert not torch.equal(model.image_queue[:, :B], queue_before[:, :B])
    torch.testing.assert_close(model.image_queue[:, B:], queue_before[:, B:])
    step.train_step(_batch(), alpha=0.4)  # the EMA runs before the momentum forward
    after = next(model.visual_encoder_m.parameters())
    assert not torch.equal(before, after)
    assert int(model.queue_ptr) == 2 * B


def test_synthetic_batches_look_like_loader_batches():
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (B, 3, 32, 32)
    assert ids.shape == mask.shape == (B, 30) and (ids[:, 0] == 2).all()
    lengths = mask.sum(1)
    assert ((8 <= lengths) & (lengths <= 30)).all()
    assert (ids.gather(1, (lengths - 1)[:, None]) == 3).all()
    assert (ids[mask == 0] == 0).all() and (ids < VOCAB - 2).all()


def test_itm_with_a_zero_head_is_exactly_log_2():
    step = _baseline()
    torch.nn.init.zeros_(step.model.itm_head.weight)
    torch.nn.init.zeros_(step.model.itm_head.bias)
    losses = step.train_step(_batch(), alpha=0.0)
    assert losses["loss_itm"] == pytest.approx(math.log(2), abs=1e-6)
