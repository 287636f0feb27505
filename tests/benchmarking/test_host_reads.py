"""No host reads in a training step: the guard finds them, and the default step has none."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip_recipes.benchmarking.host_reads import HostReads
from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.pretrain import PretrainStep
from blip_recipes.training.step import DeviceBatch, StepOptions
from tests.models.tiny_blip import make_model, make_text, momentum_state


def _step(rank: int, mesh, fused: bool, **options) -> PretrainStep:
    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip

    model = make_model().train()
    group = mesh.get_group() if mesh is not None else None
    momentum = momentum_state(queue_size=16, group=group)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, ParallelConfig(), mesh)
    kind = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step_options = StepOptions(seed=0, rank=rank, group=group, **options)
    return PretrainStep(model, optimizer, schedule, step_options, momentum=momentum)


def _reads_over_two_steps(step: PretrainStep, rank: int) -> list[str]:
    ids, mask = make_text(2, seed=rank)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    with HostReads() as reads:
        for index in range(2):
            step([DeviceBatch(images, ids, mask)], index, 0.4)
    return [str(r) for r in reads.found]


def test_the_guard_names_the_call_site_of_each_read():
    with HostReads() as reads:
        flag = torch.tensor(True)
        bool(flag)
        torch.arange(4).nonzero()
        torch.arange(4)[torch.arange(4) > 1]
        torch.zeros(3).sum().item()
    assert len(reads.found) == 4, reads.report()
    assert all(r.site == "outside the project" for r in reads.found)
    assert "_local_scalar_dense" in reads.found[0].op and "nonzero" in reads.found[1].op


def test_a_default_step_has_no_host_reads_and_the_unfused_skip_has_one():
    """Fused AdamW (the default): zero reads. Foreach AdamW decides the skip on the
    host with `bool(ok)`, once per step: the guard finds it and names `apply_update`."""
    assert _reads_over_two_steps(_step(0, None, fused=True), 0) == []
    reads = _reads_over_two_steps(_step(0, None, fused=False), 0)
    assert len(reads) == 2, reads
    assert all("training/step.py" in r and "apply_update" in r and "bool(ok)" in r for r in reads)


def test_the_compiled_objective_adds_no_host_reads():
    """A dispatch mode and torch.compile do not mix (dynamo skips frames under a mode), so the
    compiled objective runs here with compilation off: what it runs around its graphs (the
    negatives' noise, alpha as a tensor) reads nothing, and inside a graph fullgraph=True turns
    any read (`.item()`, a data-dependent shape: both graph breaks) into an error."""
    from blip_recipes.objectives.pretrain import ItcItmLosses

    step = _step(0, None, fused=True, itc_itm=ItcItmLosses("eager"))
    with torch.compiler.set_stance("force_eager"):
        assert _reads_over_two_steps(step, 0) == []


def reads_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    result = {
        fused: _reads_over_two_steps(_step(rank, mesh, fused), rank) for fused in (True, False)
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps({str(k): v for k, v in result.items()})
    )


def test_two_sharded_ranks_have_no_host_reads(tmp_path):
    spawn_ranks(reads_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["True"] == [], result["True"]
        assert len(result["False"]) == 2 and all("apply_update" in r for r in result["False"])
