"""GPU-only checks (skipped without CUDA): NCCL group, bf16 FSDP2 with fused AdamW, real float8."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.config.sections import OptimizerConfig
from blip_recipes.metrics import peak_flops
from blip_recipes.parallel import (
    apply_compile,
    apply_float8,
    apply_fsdp,
    float8_precompute_scales,
    init_distributed,
    shutdown_distributed,
)
from blip_recipes.training.optim import build_optimizer
from tests.parallel.parallel_toy import ToyModel, toy_batch, toy_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def dist_cuda(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cuda")
    yield info
    shutdown_distributed()


@pytest.mark.parametrize("float8", [False, True])
def test_bf16_fsdp_fused_adamw_compile(dist_cuda, float8):
    if float8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need SM 8.9+")
    info = dist_cuda
    assert info.device.type == "cuda"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ToyModel(dim=64)
    if float8:
        assert len(apply_float8(model, "tensorwise", skip_fqns=("head",))) == 4
    apply_compile(list(model.blocks))
    apply_fsdp(model, list(model.blocks), info.mesh, param_dtype=torch.bfloat16)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2), "cuda")
    assert opt.defaults["fused"]
    tokens, targets = (t.cuda() for t in toy_batch(0))
    losses = []
    for _ in range(5):
        loss = toy_loss(model, tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if float8:
            assert float8_precompute_scales(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    del model, opt


def test_peak_flops_known_gpus():
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert peak_flops(torch.device("cuda")) == 989e12
