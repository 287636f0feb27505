"""Shared tiny models and inputs for the model tests (no downloads)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from blip_recipes.models import BlipPretrain, build_model
from blip_recipes.training.momentum import MomentumState

VOCAB = 100
DEC_ID, ENC_ID, PAD_ID, CLS_ID, SEP_ID = 98, 99, 0, 1, 2
TINY = dict(
    vocab_size=VOCAB,
    image_size=32,
    vision_width=48,
    vision_heads=2,
    text_width=32,
    text_heads=2,
    text_ffn_dim=64,
    embed_dim=16,
    max_positions=40,
    queue_size=32,
    enc_token_id=ENC_ID,
    dec_token_id=DEC_ID,
)


def make_model(seed: int = 0, **overrides) -> BlipPretrain:
    """The tiny model with small vocab, random (non-degenerate) weights, eval mode."""
    torch.manual_seed(seed)
    model = build_model("blip_pretrain_tiny", **{**TINY, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "temp":
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def make_text(batch: int, length: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] words [SEP] [PAD]...` ids (B, L) with varied lengths, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length), generator=gen)
    lengths = torch.randint(4, length + 1, (batch,), generator=gen)
    lengths[0] = length
    positions = torch.arange(length)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask


def momentum_state(queue_size: int = 8, seed: int = 0, **kwargs) -> MomentumState:
    """A momentum state matching `make_model` with a small queue."""
    overrides = {**TINY, "queue_size": queue_size}
    return MomentumState.build("blip_pretrain_tiny", seed=seed, **overrides, **kwargs)


def enqueue_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: three enqueues of rank-tagged features, then save the queues."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = momentum_state(queue_size=8, seed=0, group=dist.group.WORLD)
        dim = TINY["embed_dim"]
        for step in range(3):
            feats = torch.full((2, dim), float(10 * step + rank))
            state.enqueue(feats, feats + 0.5)
        queues = {"image": state.image_queue, "text": state.text_queue, "ptr": state.queue_ptr}
        torch.save(queues, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_step_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: shard online + momentum per block, run a full step, check EMA and DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip
    from blip_recipes.training.pretrain import pretrain_losses

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = make_model(seed=0).train()
        state = momentum_state(queue_size=8, seed=0, group=mesh.get_group())
        state.copy_from(model)
        parallelize_blip(model, state.encoders, ParallelConfig(), mesh)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.5)
        before = {n: p.full_tensor().clone() for n, p in state.encoders.named_parameters()}
        online = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        state.update(model)
        for name, param in state.encoders.named_parameters():
            partner = online[name.replace("text_encoder.", "text.", 1)]
            expected = 0.995 * before[name] + 0.005 * partner
            assert torch.allclose(param.full_tensor(), expected, atol=1e-6), name
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
        ids, mask = make_text(2, seed=rank)
        model.clamp_temperature_()
        targets = state.targets(images, ids, mask)
        generator = torch.Generator().manual_seed(rank)
        out = pretrain_losses(model, images, ids, mask, targets, 0.4, generator)
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        state.enqueue(targets.image_feat_m, targets.text_feat_m)
        dcp.save({"momentum": state}, checkpoint_id=os.path.join(out_dir, "ckpt"))
        torch.save({"image": state.image_queue, "loss": out.loss.detach()},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
        dist.barrier()
    finally:
        dist.destroy_process_group()
