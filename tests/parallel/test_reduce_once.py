"""ReduceOnce: one reduce-scatter per FSDP2 unit per step for the units forward runs twice, with
the gradients of the per-use path (2 gloo ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_recipes.config.sections import ParallelConfig
from blip_recipes.parallel import ReduceOnce, parallelize_blip, reused_units
from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.pretrain import pretrain_losses
from tests.models.tiny_blip import make_model, make_text, momentum_state


def _grads_and_counts(mesh, group, rank: int, once: bool, param_dtype):
    from blip_recipes.parallel._comm_count import count_fsdp_collectives, unit_names

    model = make_model()  # eval: dropout off, so both paths compute the same function
    momentum = momentum_state(queue_size=16, group=group)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, ParallelConfig(), mesh, param_dtype=param_dtype,
                     compile_backend="eager")  # fmt: skip
    reduce_once = ReduceOnce(reused_units(model) if once else [])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    ids, mask = make_text(2, seed=rank)
    generator = torch.Generator()
    names = unit_names(online=model)
    for step in range(2):  # the second step must reduce like the first (flags restored)
        targets = momentum.targets(images, ids, mask)
        generator.manual_seed(step)
        out = pretrain_losses(model, images, ids, mask, targets, 0.4, generator)
        model.zero_grad(set_to_none=True)
        with count_fsdp_collectives(names) as counts:
            reduce_once.backward(out.loss)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    table = {f"{kind} {unit}": n for (kind, unit), n in counts.items() if kind == "reduce_scatter"}
    return grads, table


def reduce_once_worker(rank: int, world: int, out_dir: str) -> None:
    from blip_recipes.parallel import build_data_parallel_mesh

    torch.set_num_threads(1)
    mesh, group = build_data_parallel_mesh("cpu", world, "fsdp")
    result = _compare(mesh, group, rank)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _compare(mesh, group, rank: int) -> dict:
    """Per-use vs once, in fp32 and with bf16 parameters: gradient difference and counts."""
    result = {}
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        old, old_counts = _grads_and_counts(mesh, group, rank, False, dtype)
        new, new_counts = _grads_and_counts(mesh, group, rank, True, dtype)
        assert old.keys() == new.keys() and all(g.isfinite().all() for g in new.values())
        result[dtype_name] = {
            "max_diff": max((old[k] - new[k]).abs().max().item() for k in old),
            "max_grad": max(g.abs().max().item() for g in old.values()),
            "old": old_counts,
            "new": new_counts,
        }
    return result


def _check(result: dict) -> None:
    for dtype_name, tolerance in (("fp32", 1e-6), ("bf16", 1e-2)):
        run = result[dtype_name]
        # twice per step before, once now; the ViT blocks stay at one
        for unit in ("online", "online.text.layers.0", "online.text.layers.1"):
            assert run["old"][f"reduce_scatter {unit}"] == 2, (dtype_name, unit)
            assert run["new"][f"reduce_scatter {unit}"] == 1, (dtype_name, unit)
        for key in ("reduce_scatter online.visual_encoder.blocks.0",
                    "reduce_scatter online.visual_encoder.blocks.1"):  # fmt: skip
            assert run["old"][key] == run["new"][key] == 1
        assert run["max_diff"] <= tolerance * max(run["max_grad"], 1.0), (dtype_name, run)


def test_reused_units_reduce_once_on_one_rank():
    """FSDP2 at degree 1 (one GPU's bf16 path): the same counts and gradients in one process."""
    from blip_recipes.parallel import init_distributed

    info = init_distributed("cpu")
    _check(_compare(info.mesh, None, 0))


@pytest.mark.slow
def test_reused_units_reduce_once_on_two_ranks(tmp_path):
    spawn_ranks(reduce_once_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        _check(json.loads((tmp_path / f"rank{rank}.json").read_text()))
