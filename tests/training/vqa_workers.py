"""Worker of the two-rank VQA test (importable by spawned processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from blip_recipes.config.sections import Config
from blip_recipes.training.vqa import VqaBatch, parallelize_vqa, vqa_loss
from tests.models.tiny_vqa import make_tokens, make_vqa


def vqa_batch(questions: int = 4) -> VqaBatch:
    """A fixed batch: `questions` images and questions, 1-3 weighted answers each."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(questions, 3, 32, 32, generator=gen)
    q_ids, q_mask = make_tokens(questions, 7, seed=1)
    counts = [1 + i % 3 for i in range(questions)]
    rows = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])
    a_ids, a_mask = make_tokens(len(rows), 5, seed=2)
    weights = torch.tensor([1.0 / counts[int(i)] for i in rows])
    return VqaBatch(images, q_ids, q_mask, a_ids, a_mask, weights, rows)


def rank_share(batch: VqaBatch, rank: int, world: int) -> VqaBatch:
    """Rank `rank`'s contiguous share of the questions, with their answers."""
    per = batch.images.shape[0] // world
    keep = (batch.answer_question >= rank * per) & (batch.answer_question < (rank + 1) * per)
    return VqaBatch(batch.images[rank * per : (rank + 1) * per],
                    batch.question_ids[rank * per : (rank + 1) * per],
                    batch.question_mask[rank * per : (rank + 1) * per],
                    batch.answer_ids[keep], batch.answer_mask[keep], batch.answer_weights[keep],
                    batch.answer_question[keep] - rank * per)  # fmt: skip


def fsdp_grad_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: the FSDP2-sharded VQA model, the loss of its share, backward; saves the
    loss and the full (unsharded) gradients."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_vqa(seed=3, noise=0.1)  # eval mode: no dropout, numbers of the batch only
        parallelize_vqa(model, Config(), init_device_mesh("cpu", (world,)), None)
        loss = vqa_loss(model, rank_share(vqa_batch(), rank, world))
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
