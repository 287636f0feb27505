"""FSDP2 on 2 gloo ranks trains like one process on the whole batch (with AC and compile too)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from blip_recipes.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    apply_fsdp,
    float8_precompute_scales,
    init_distributed,
)
from blip_recipes.parallel._testing import spawn_ranks
from tests.parallel.parallel_toy import ToyModel, toy_batch, toy_loss

STEPS = 3


def _train_reference(steps: int = STEPS) -> list[float]:
    torch.manual_seed(0)
    model = ToyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        tokens, targets = toy_batch(0)  # one batch: the loss must fall
        loss = toy_loss(model, tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _fsdp_worker(rank: int, world_size: int, out_file: str, variant: str) -> None:
    layout = "ddp" if "ddp" in variant else "hsdp" if "hsdp" in variant else "fsdp"
    info = init_distributed("cpu", layout, dp_replicate=2 if layout == "hsdp" else 0)
    assert (info.rank, info.world_size) == (rank, world_size)
    torch.manual_seed(0)
    model = ToyModel()
    blocks = list(model.blocks)
    converted = []
    if "float8" in variant:
        converted = apply_float8(model, "tensorwise", emulate=True, fsdp_all_gather=True)
    if "ac" in variant:
        apply_activation_checkpointing(blocks)
    if "compile" in variant:
        apply_compile(blocks, backend="aot_eager")
    apply_fsdp(model, blocks, info.mesh, reshard_after_forward="noreshard" not in variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        tokens, targets = toy_batch(0)  # one batch: the loss must fall
        half = tokens.shape[0] // world_size
        sl = slice(rank * half, (rank + 1) * half)
        loss = toy_loss(model, tokens[sl], targets[sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if converted:
            assert float8_precompute_scales(model)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG, group=info.dp_group)
        losses.append(global_loss.item())
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(losses, f)
    del model, opt


@pytest.mark.parametrize(
    ("variant", "world"),
    [("reshard", 2), ("noreshard", 2), ("ac+compile", 2), ("ddp", 2), ("hsdp", 4)],
)
def test_fsdp_two_ranks_match_single_process(tmp_path, variant, world):
    """fsdp, ddp (FSDP2 on a world x 1 mesh) and hsdp (2 x 2) all train like one process."""
    out = tmp_path / "losses.json"
    spawn_ranks(_fsdp_worker, world, tmp_path, str(out), variant)
    fsdp_losses = json.loads(out.read_text())
    reference = _train_reference()
    assert fsdp_losses == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert fsdp_losses[-1] < fsdp_losses[0]


@pytest.mark.slow  # float8 + FSDP training is also covered by tests/checkpoint/test_checkpoint_float8.py
def test_fsdp_float8_all_gather_emulated(tmp_path):
    out = tmp_path / "losses.json"
    spawn_ranks(_fsdp_worker, 2, tmp_path, str(out), "float8")
    losses = json.loads(out.read_text())
    assert losses == pytest.approx(_train_reference(), rel=0.05)  # float8 rounding
    assert losses[-1] < losses[0]
