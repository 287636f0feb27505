"""PretrainStep: one agreed decision per step on every rank, the gradient norm, the skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.pretrain import DeviceBatch, PretrainStep, agree_ok, global_grad_norm
from tests.models.tiny_blip import make_model, make_text, momentum_state


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _build_step(rank: int, mesh) -> PretrainStep:
    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip

    model = make_model().train()
    group = mesh.get_group() if mesh is not None else None
    momentum = momentum_state(queue_size=16, group=group)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, ParallelConfig(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return PretrainStep(model, momentum, optimizer, schedule, seed=0, rank=rank, group=group)


def _snapshot(step: PretrainStep) -> dict[str, torch.Tensor]:
    """Full parameters, this rank's optimizer state and the queues, cloned."""
    out = {f"param.{n}": p.full_tensor().clone() for n, p in step.model.named_parameters()}
    for i, state in enumerate(step.optimizer.state.values()):
        for key, value in state.items():
            local = value.to_local() if hasattr(value, "to_local") else value
            out[f"optim.{i}.{key}"] = local.clone()
    out["image_queue"] = step.momentum.image_queue.clone()
    out["text_queue"] = step.momentum.text_queue.clone()
    out["queue_ptr"] = step.momentum.queue_ptr.clone()
    return out


def nan_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    step = _build_step(rank, init_device_mesh("cpu", (world,)))
    ids, mask = make_text(2, seed=rank)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    flags, snapshots = [], []
    for index, fault in enumerate(["none", "nan_loss", "nan_grad", "none"]):
        pixels, hook = images, None
        if rank == 1 and fault == "nan_loss":
            pixels = torch.full_like(images, float("nan"))
        if rank == 1 and fault == "nan_grad":
            hook = step.model.itm_head.register_forward_hook(
                lambda _m, _a, output: _NanGradient.apply(output)
            )
        result = step([DeviceBatch(pixels, ids, mask)], index, 0.4)
        if hook is not None:
            hook.remove()
        flags.append((bool(result.ok), bool(torch.isfinite(result.output.loss))))
        snapshots.append(_snapshot(step))
    torch.save({"flags": flags, "snapshots": snapshots}, Path(out_dir) / f"rank{rank}.pt")


def test_a_nan_on_one_rank_makes_every_rank_skip(tmp_path):
    spawn_ranks(nan_worker, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # step 1: NaN loss on rank 1 only; step 2: finite loss, NaN gradients on rank 1 only
    assert ranks[0]["flags"] == [(True, True), (False, True), (False, True), (True, True)]
    assert ranks[1]["flags"] == [(True, True), (False, False), (False, True), (True, True)]
    for rank in ranks:
        applied, skip1, skip2, resumed = rank["snapshots"]
        for key, value in applied.items():
            assert torch.equal(skip1[key], value), key  # parameters, optimizer state, queues
            assert torch.equal(skip2[key], value), key
        params = [k for k in applied if k.startswith("param.")]
        assert any(not torch.equal(resumed[k], applied[k]) for k in params)
        assert all(torch.isfinite(resumed[k]).all() for k in params)
        assert not torch.equal(resumed["queue_ptr"], applied["queue_ptr"])
    for key in ranks[0]["snapshots"][-1]:
        if not key.startswith("optim."):  # optimizer states are this rank's shards
            assert torch.equal(ranks[0]["snapshots"][-1][key], ranks[1]["snapshots"][-1][key])


def test_single_process_skips_a_non_finite_step_without_a_group():
    step = _build_step(0, None)
    ids, mask = make_text(2)
    images = torch.randn(2, 3, 32, 32)
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    result = step([DeviceBatch(torch.full_like(images, float("nan")), ids, mask)], 0, 0.4)
    assert not bool(result.ok) and not torch.isfinite(result.grad_norm)
    assert all(torch.equal(p, before[n]) for n, p in step.model.named_parameters())
    assert int(step.momentum.queue_ptr) == 0
    result = step([DeviceBatch(images, ids, mask)], 1, 0.4)
    assert bool(result.ok) and torch.isfinite(result.grad_norm) and result.grad_norm > 0
    assert int(step.momentum.queue_ptr) == 2


def test_grad_norm_matches_a_direct_computation_and_clips():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(5, 4)).square().sum().backward()
    params = list(layer.parameters())
    expected = torch.cat([p.grad.flatten() for p in params]).norm()
    assert global_grad_norm(params) == pytest.approx(expected.item(), rel=1e-6)
    assert global_grad_norm(params, clip=0.5) == pytest.approx(expected.item(), rel=1e-6)
    clipped = torch.cat([p.grad.flatten() for p in params]).norm()
    assert clipped.item() == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="no gradients"):
        global_grad_norm([torch.nn.Parameter(torch.zeros(2))])


def test_agree_ok_is_false_for_any_non_finite_input():
    one = torch.tensor(1.0)
    assert bool(agree_ok(one, one, None))
    assert not bool(agree_ok(torch.tensor(float("inf")), one, None))
    assert not bool(agree_ok(one, torch.tensor(float("nan")), None))
