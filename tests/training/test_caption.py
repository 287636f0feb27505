"""Caption fine-tuning step: prompt-masked labels, the loss against a direct computation, the
decoder entry point against step-by-step decoding, and the start-point weights (224 -> 384 style
position-embedding interpolation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip_recipes.config import Config, ConfigError, LaunchContext, validate
from blip_recipes.data import build_tokenizer
from blip_recipes.models import build_model
from blip_recipes.models.row_layout import DECODER_ROWS
from blip_recipes.models.vit import interpolate_pos_embed
from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.caption import (
    BlipCaptioner,
    CaptionStep,
    as_captioner,
    caption_labels,
    caption_loss,
    captioning_initial_weights,
    freeze_unused_parameters,
    register_caption_entry_point,
)
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from blip_recipes.training.step import DeviceBatch, StepOptions
from tests.models.tiny_blip import DEC_ID, PAD_ID, make_model

PROMPT_LENGTH = 4  # [DEC] a picture of


def captions_batch(seed: int = 0, batch: int = 3, length: int = 12):
    """ids `[CLS] p p p w ... [SEP] [PAD]...` with different caption lengths, and their mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    for row, used in enumerate(range(length - batch + 1, length + 1)):
        ids[row, used - 1] = 2  # [SEP]
        ids[row, used:] = PAD_ID
        mask[row, used:] = 0
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    return images, ids, mask


def test_labels_mask_prompt_and_padding():
    _, ids, _ = captions_batch()
    labels = caption_labels(ids, PROMPT_LENGTH, PAD_ID)
    assert (labels[:, :PROMPT_LENGTH] == -100).all()
    keep = (ids != PAD_ID) & (torch.arange(ids.shape[1]) >= PROMPT_LENGTH)
    assert torch.equal(labels[keep], ids[keep])
    assert (labels[~keep] == -100).all()
    assert keep.sum() == sum(int(m) for m in (ids != PAD_ID).sum(1) - PROMPT_LENGTH)


def test_loss_equals_direct_computation():
    model = as_captioner(make_model())
    images, ids, mask = captions_batch()
    loss = caption_loss(model, images, ids, mask, PROMPT_LENGTH)

    dec = ids.clone()
    dec[:, 0] = DEC_ID
    embeds = model.visual_encoder(images)  # padding-masked attention, all positions' logits
    hidden = model.text(dec, mask, embeds, DECODER_ROWS).hidden_states
    logits = model.lm_head(hidden, model.text.embeddings.word_embeddings.weight)
    terms = []
    for b in range(ids.shape[0]):
        for t in range(PROMPT_LENGTH, int(mask[b].sum())):  # targets: caption words and [SEP]
            terms.append(F.cross_entropy(logits[b, t - 1], dec[b, t], label_smoothing=0.1))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert caption_loss(model, images, ids, mask, 1) != loss  # with the prompt's targets


def test_chunked_lm_loss_equals_the_fp32_logits_loss_and_its_gradients():
    """`parallel.lm_loss=chunked` (`decoder_loss`, inside the model) against full fp32 logits."""
    from blip_recipes.objectives.pretrain import ChunkedLMLoss

    results = []
    for lm_loss in (None, ChunkedLMLoss(chunks=3)):
        model = as_captioner(make_model())
        freeze_unused_parameters(model)
        loss = caption_loss(model, *captions_batch(), PROMPT_LENGTH, lm_loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    assert full_grads.keys() == chunked_grads.keys() and "lm_head.bias" in full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_decoder_logits_match_step_by_step_decoding():
    model = as_captioner(make_model())
    images, ids, mask = captions_batch(batch=2)
    dec = ids.clone()
    dec[:, 0] = DEC_ID
    embeds = model.encode_image(images).embeds
    flat = model.decoder_logits(embeds, dec, mask).view(2, ids.shape[1] - 1, -1)
    for t in (0, 3, 6):
        step, _ = model.next_token_logits(dec[:, : t + 1], embeds)
        torch.testing.assert_close(flat[:, t], step, rtol=1e-5, atol=1e-5)


def test_frozen_parameters_are_exactly_those_the_loss_does_not_reach():
    model = as_captioner(make_model()).train()
    caption_loss(model, *captions_batch(), PROMPT_LENGTH).backward()
    unreached = {n for n, p in model.named_parameters() if p.grad is None}
    frozen = freeze_unused_parameters(model)
    assert set(frozen) == unreached and "itm_head.weight" in frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in unreached)


def test_as_captioner_keeps_module_and_state_dict():
    model = make_model()
    keys = list(model.state_dict())
    captioner = as_captioner(model)
    assert captioner is model and isinstance(model, BlipCaptioner)
    assert list(captioner.state_dict()) == keys
    assert as_captioner(captioner) is captioner


def test_step_updates_and_reports_mean_loss():
    model = as_captioner(make_model()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = CaptionStep(model, optimizer, scheduler, StepOptions(grad_accum_steps=2),
                       prompt_length=PROMPT_LENGTH)  # fmt: skip
    images, ids, mask = captions_batch()
    batches = [DeviceBatch(images, ids, mask), DeviceBatch(images.flip(0), ids, mask)]
    before = model.lm_head.dense.weight.detach().clone()
    result = step(batches, 0)
    assert bool(result.ok) and torch.isfinite(result.grad_norm)
    assert not torch.equal(before, model.lm_head.dense.weight)
    assert model.itm_head.weight.grad is None  # ITM is not run
    with pytest.raises(ValueError, match="expected 2 micro-batches"):
        step(batches[:1], 1)


def tiny_config(tmp_path, image_size: int, init_from=None) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.image_size, cfg.model.embed_dim = "blip_pretrain_tiny", image_size, 32
    cfg.tokenizer.kind = "synthetic"
    cfg.checkpoint.init_from = init_from
    cfg.job.seed = 3
    return cfg


def test_initial_weights_interpolate_the_position_embedding(tmp_path):
    tok = build_tokenizer(tiny_config(tmp_path, 32).tokenizer)
    kwargs = dict(vocab_size=tok.vocab_size, image_size=32, embed_dim=32,
                  enc_token_id=tok.enc_token_id, dec_token_id=tok.dec_token_id)  # fmt: skip
    torch.manual_seed(7)
    source = build_model("blip_pretrain_tiny", **kwargs)
    source.init_weights()
    path = save_training_checkpoint(source, None, tmp_path / "pretrained")
    # 32 px (2 x 2 patches) checkpoint into a 64 px (4 x 4) model
    weights = captioning_initial_weights(tiny_config(tmp_path, 64, str(path)), tok)
    expected_pos = interpolate_pos_embed(source.visual_encoder.pos_embed.detach(), 16)
    assert weights["visual_encoder.pos_embed"].shape == (1, 17, 64)
    torch.testing.assert_close(weights["visual_encoder.pos_embed"], expected_pos)
    for key, value in source.state_dict().items():
        if key != "visual_encoder.pos_embed":
            assert torch.equal(weights[key], value), key
    # without init_from: the seeded initial weights
    fresh = captioning_initial_weights(tiny_config(tmp_path, 64), tok)
    assert not torch.equal(fresh["lm_head.dense.weight"], weights["lm_head.dense.weight"])


def test_initial_weights_of_another_shape_are_refused(tmp_path):
    tok = build_tokenizer(tiny_config(tmp_path, 32).tokenizer)
    source = build_model("blip_pretrain_tiny", vocab_size=tok.vocab_size, embed_dim=16)
    path = save_training_checkpoint(source, None, tmp_path / "other")
    with pytest.raises(ValueError, match="vision_proj.weight"):
        captioning_initial_weights(tiny_config(tmp_path, 32, str(path)), tok)


def fsdp_loss_worker(rank: int, world: int, out_dir: str) -> None:
    """One gloo rank: the loss and gradient norm of an FSDP2-sharded captioner on the full batch."""
    from torch.distributed.device_mesh import init_device_mesh

    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip
    from blip_recipes.training.step import global_grad_norm

    torch.set_num_threads(1)
    model = as_captioner(make_model())
    freeze_unused_parameters(model)
    parallelize_blip(model, None, ParallelConfig(), init_device_mesh("cpu", (world,)))
    register_caption_entry_point(model)
    loss = caption_loss(model, *captions_batch(), PROMPT_LENGTH)
    loss.backward()
    norm = global_grad_norm([p for p in model.parameters() if p.requires_grad])
    torch.save({"loss": loss.detach(), "norm": norm}, f"{out_dir}/rank{rank}.pt")


def test_loss_under_fsdp2_equals_one_process(tmp_path):
    """`decoder_logits` as a registered FSDP2 entry point: the same loss and gradient norm on
    2 gloo ranks as in one process (frozen parameters mixed into the sharded units)."""
    model = as_captioner(make_model())
    freeze_unused_parameters(model)
    loss = caption_loss(model, *captions_batch(), PROMPT_LENGTH)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    spawn_ranks(fsdp_loss_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["norm"], norm, rtol=1e-4, atol=1e-6)


def test_caption_section_checks(tmp_path):
    cfg = Config()
    cfg.caption.num_beams, cfg.caption.min_length, cfg.caption.max_length = 0, 9, 8
    cfg.caption.test_annotation = str(tmp_path / "missing.json")
    cfg.caption.min_lr = 1.0
    with pytest.raises(ConfigError) as err:
        validate(cfg, LaunchContext(checkpoints=False))
    message = str(err.value)
    assert "'caption.num_beams' must be >= 1, got 0" in message
    assert "'caption.min_length' (9) must be between 0 and 'caption.max_length' (8)" in message
    assert "'caption.min_lr' (1.0) must be between 0" in message
    assert f"'caption.test_annotation' {tmp_path / 'missing.json'} does not exist" in message
