"""OptimizerStep (through PretrainStep and a toy task): one agreed decision per step on every
rank, the gradient norm, the skip, accumulation, the options read from a config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.pretrain import PretrainStep
from blip_recipes.training.step import (
    DeviceBatch,
    OptimizerStep,
    StepOptions,
    all_ranks_finite,
    global_grad_norm,
)
from tests.models.tiny_blip import make_model, make_text, momentum_state


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _build_step(rank: int, mesh, **options) -> PretrainStep:
    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip

    model = make_model().train()
    group = mesh.get_group() if mesh is not None else None
    momentum = momentum_state(queue_size=16, group=group)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, ParallelConfig(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step_options = StepOptions(seed=0, rank=rank, group=group, **options)
    return PretrainStep(model, optimizer, schedule, step_options, momentum=momentum)


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


def test_all_ranks_finite_is_false_for_any_non_finite_input():
    one = torch.tensor(1.0)
    assert bool(all_ranks_finite(one, one, None))
    assert bool(all_ranks_finite(one, None, None))
    assert not bool(all_ranks_finite(torch.tensor(float("inf")), one, None))
    assert not bool(all_ranks_finite(one, torch.tensor(float("nan")), None))


@dataclass
class _ToyOutput:
    loss: torch.Tensor
    rows: torch.Tensor


class _SquareTask(OptimizerStep):
    """A toy task: the mean square of a linear layer's output (no momentum state)."""

    def micro_batch(self, batch, targets):
        assert targets is None
        return _ToyOutput(self.model(batch[0]).square().mean(), torch.tensor(float(len(batch[0]))))


def _toy_step(accum: int, clip: float | None = None) -> _SquareTask:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return _SquareTask(layer, optimizer, schedule, StepOptions(grad_accum_steps=accum,
                                                               grad_clip=clip))  # fmt: skip


def test_accumulated_micro_batches_update_like_one_batch_of_their_mean():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    whole, halves = _toy_step(1), _toy_step(2)
    one = whole([(x,)], 0)
    two = halves([(x[:2],), (x[2:],)], 0)
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):
        torch.testing.assert_close(a, b)  # equal halves: mean of losses = loss of the whole
    torch.testing.assert_close(one.grad_norm, two.grad_norm)
    torch.testing.assert_close(one.output.loss, two.output.loss)
    assert not one.output.loss.requires_grad and float(two.output.rows) == 2.0
    assert whole.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # scheduled once
    assert halves.lr_scheduler.last_epoch == 1
    with pytest.raises(ValueError, match="expected 2 micro-batches"):
        halves([(x,)], 1)


def test_clipping_scales_the_update_and_reports_the_norm_before():
    x = 10 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    free, clipped = _toy_step(1), _toy_step(1, clip=1e-3)
    start = [p.detach().clone() for p in free.model.parameters()]
    norm_free = free([(x,)], 0).grad_norm
    norm_clipped = clipped([(x,)], 0).grad_norm
    assert norm_free == norm_clipped and float(norm_free) > 1.0
    moved = torch.cat(
        [(p.detach() - s).flatten() for p, s in zip(clipped.model.parameters(), start)]
    )
    assert float(moved.norm()) == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x clip


def test_the_compiled_objective_takes_the_eager_steps_without_recompiling():
    """Dropout on, the alpha ramp, three updates: losses (and so the negatives drawn) equal the
    eager objective's, and the two graphs compiled in the first step serve the others."""
    from blip_recipes.objectives.pretrain import ItcItmLosses

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids, mask = make_text(4, seed=0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, itc_itm in (("eager", ItcItmLosses()), ("compiled", ItcItmLosses(counting_backend))):
        step = _build_step(0, None, itc_itm=itc_itm)
        losses[name] = []
        for index in range(3):
            torch.manual_seed(index)  # the same dropout masks for both
            result = step([DeviceBatch(images, ids, mask)], index, 0.1 * index)
            out = result.output
            losses[name].append([out.loss_ita, out.loss_itm, out.loss_lm, out.itm_acc])
    assert len(graphs) == 2
    for want, got in zip(losses["eager"], losses["compiled"]):
        assert torch.allclose(torch.stack(got), torch.stack(want), rtol=1e-6, atol=1e-7)


def test_a_task_that_reads_momentum_targets_refuses_to_run_without_a_momentum_state():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(ValueError, match="PretrainStep needs a momentum state"):
        PretrainStep(model, optimizer, schedule)


def test_options_from_a_config():
    from blip_recipes.config import Config
    from blip_recipes.objectives.pretrain import ChunkedLMLoss
    from blip_recipes.parallel import init_distributed

    cfg = Config()
    cfg.job.seed, cfg.training.grad_clip, cfg.training.grad_accum_steps = 5, 2.0, 3
    cfg.parallel.negative_kv, cfg.parallel.lm_loss = "recompute", "chunked"
    info = init_distributed("cpu")
    options = StepOptions.from_config(cfg, torch.nn.Linear(2, 2), info, torch.bfloat16)
    assert (options.seed, options.rank, options.group, options.grad_clip) == (5, 0, None, 2.0)
    assert options.grad_accum_steps == 3 and options.negative_kv == "recompute"
    assert options.autocast_dtype == torch.bfloat16 and isinstance(options.lm_loss, ChunkedLMLoss)
    assert not options.itc_itm.compiled  # parallel.compile is off
    cfg.parallel.lm_loss, cfg.parallel.compile = "full", True
    fp32 = StepOptions.from_config(cfg, torch.nn.Linear(2, 2), info, torch.float32)
    assert fp32.autocast_dtype is None and fp32.lm_loss is None and fp32.itc_itm.compiled
    cfg.parallel.compile_objective = False
    off = StepOptions.from_config(cfg, torch.nn.Linear(2, 2), info, torch.float32)
    assert not off.itc_itm.compiled
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        StepOptions(grad_accum_steps=0)
