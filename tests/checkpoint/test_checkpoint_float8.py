"""A float8 (emulated, FSDP float8 all-gather) model and its optimizer round-trip through DCP."""

from __future__ import annotations

from pathlib import Path

import torch

from blip_recipes.checkpoint import CheckpointManager, ModelWrapper, OptimizerWrapper
from blip_recipes.parallel import (
    apply_float8,
    apply_fsdp,
    float8_precompute_scales,
    init_distributed,
)
from blip_recipes.parallel._testing import spawn_ranks
from tests.parallel.parallel_toy import ToyModel, toy_batch, toy_loss


def _build(seed: int, mesh) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ToyModel()
    apply_float8(model, "tensorwise", emulate=True, fsdp_all_gather=True, skip_fqns=("head",))
    apply_fsdp(model, list(model.blocks), mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _worker(rank: int, world: int, folder: str) -> None:
    mesh = init_distributed("cpu").mesh
    model, opt = _build(0, mesh)
    for _ in range(2):
        toy_loss(model, *toy_batch(0)).backward()
        opt.step()
        opt.zero_grad()
        float8_precompute_scales(model)
    manager = CheckpointManager(folder)
    manager.save(2, {"model": ModelWrapper(model), "optimizer": OptimizerWrapper(model, opt)})
    expected = toy_loss(model, *toy_batch(1)).item()
    model2, opt2 = _build(1, mesh)
    states = {"model": ModelWrapper(model2), "optimizer": OptimizerWrapper(model2, opt2)}
    manager.load(manager.latest_complete(), states)
    float8_precompute_scales(model2)
    assert toy_loss(model2, *toy_batch(1)).item() == expected
    Path(folder, f"ok{rank}").touch()
    del model, opt, model2, opt2


def test_float8_fsdp_checkpoint_round_trip(tmp_path):
    spawn_ranks(_worker, 2, tmp_path, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "ok0").exists() and (tmp_path / "ckpt" / "ok1").exists()
