"""VQA training: two gloo ranks (FSDP2) give one process's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from blip_recipes.training.vqa import vqa_loss
from tests.models.tiny_vqa import make_vqa
from tests.training.vqa_workers import fsdp_grad_worker, rank_share, vqa_batch


def test_rank_shares_cover_the_batch():
    batch = vqa_batch()
    shares = [rank_share(batch, r, 2) for r in range(2)]
    assert sum(s.answer_ids.shape[0] for s in shares) == batch.answer_ids.shape[0]
    assert all(int(s.answer_question.max()) == 1 for s in shares)


@pytest.mark.slow
def test_two_fsdp_ranks_give_one_process_loss_and_gradients(tmp_path):
    mp.start_processes(fsdp_grad_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="spawn")  # fmt: skip
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    model = make_vqa(seed=3, noise=0.1)  # eval mode (no dropout), as the ranks
    loss = vqa_loss(model, vqa_batch())
    loss.backward()
    # each rank divides by its own questions; FSDP2 averages the gradients over ranks
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-5)
    for name, param in model.named_parameters():
        for rank in ranks:
            assert torch.allclose(rank["grads"][name], param.grad, atol=1e-6, rtol=1e-4), name
