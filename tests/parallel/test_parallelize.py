"""parallelize_blip: the communication budget per FSDP unit, entry points, compiled blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_recipes.config.sections import ParallelConfig
from blip_recipes.parallel import parallelize_blip
from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.pretrain import PretrainStep
from blip_recipes.training.step import DeviceBatch, StepOptions
from tests.models.tiny_blip import make_model, make_text, momentum_state


def _step_parts(mesh, parallel: ParallelConfig, group=None, accum: int = 1, **model_overrides):
    model = make_model(**model_overrides).train()
    momentum = momentum_state(queue_size=16, group=group, **model_overrides)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, parallel, mesh, compile_backend="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    options = StepOptions(seed=0, group=group, grad_accum_steps=accum)
    return PretrainStep(model, optimizer, schedule, options, momentum=momentum)


def budget_worker(rank: int, world: int, out_dir: str, layout: str, accum: int) -> None:
    from blip_recipes.parallel import build_data_parallel_mesh
    from blip_recipes.parallel._comm_count import count_fsdp_collectives, unit_names

    torch.set_num_threads(1)
    mesh, group = build_data_parallel_mesh("cpu", world, layout)
    step = _step_parts(mesh, ParallelConfig(), group=group, accum=accum)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = make_text(2, seed=rank)
    batches = [DeviceBatch(images, ids, mask)] * accum
    step(batches, 0, 0.4)  # lazy init outside the counted step
    names = unit_names(online=step.model, momentum=step.momentum.encoders)
    with count_fsdp_collectives(names) as counts:
        step(batches, 1, 0.4)
    table = {f"{kind} {unit}": n for (kind, unit), n in sorted(counts.items())}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(table))


def _budget(units: tuple[tuple[str, int, int], ...]) -> dict[str, int]:
    expected = {}
    for unit, gathers, reduces in units:
        if gathers:
            expected[f"all_gather {unit}"] = gathers
        if reduces:
            expected[f"reduce_scatter {unit}"] = reduces
    return expected


ONLINE = ("online", "online.visual_encoder.blocks.0", "online.visual_encoder.blocks.1",
          "online.text.layers.0", "online.text.layers.1")  # fmt: skip
MOMENTUM = ("momentum", "momentum.visual_encoder.blocks.0", "momentum.visual_encoder.blocks.1",
            "momentum.text_encoder.layers.0", "momentum.text_encoder.layers.1")  # fmt: skip


@pytest.mark.parametrize(
    ("layout", "accum", "gathers", "reduces"),
    [
        # per unit: online root, ViT blocks, MED layers; momentum units gather once (fsdp)
        ("fsdp", 1, (1, 2, 2, 1, 1), (1, 1, 1, 1, 1)),
        # two micro-batches: gathered per micro-batch (the MED layers and the root twice in the
        # first, which frees them after each use's backward), gradients reduced on the last one
        ("fsdp", 2, (3, 4, 4, 3, 3), (1, 1, 1, 1, 1)),
        # ddp: nothing gathered (shard degree 1), gradients all-reduced like fsdp reduces them
        ("ddp", 1, (0, 0, 0, 0, 0), (1, 1, 1, 1, 1)),
    ],
)
def test_fsdp_collectives_per_unit_match_the_budget(tmp_path, layout, accum, gathers, reduces):
    """The budget of docs/performance.md, per FSDP unit and optimizer step on 2 ranks
    (reshard after forward on, reduce_reused=once): ViT block 2 all-gathers + 1 reduce-scatter;
    MED layer (run twice) 1 + 1; online root 1 + 1; every momentum unit 1 all-gather, no
    reduce-scatter; under ddp no all-gather at all (the momentum encoders cost no communication).
    The per-use path's 2 + 2 for the MED layers and the root: tests/parallel/test_reduce_once.py."""
    spawn_ranks(budget_worker, 2, tmp_path, str(tmp_path), layout, accum)
    momentum_gathers = accum if layout == "fsdp" else 0
    expected = _budget(tuple(zip(ONLINE, gathers, reduces)) +
                       tuple((unit, momentum_gathers, 0) for unit in MOMENTUM))  # fmt: skip
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_entry_points_are_fsdp_forwards_and_inputs_are_not_cast():
    from torch.distributed.fsdp import FSDPModule

    from blip_recipes.models.blip import ENTRY_POINTS
    from blip_recipes.parallel import init_distributed

    info = init_distributed("cpu")
    model = make_model()
    parallelize_blip(model, None, ParallelConfig(), info.mesh, param_dtype=torch.bfloat16)
    assert isinstance(model, FSDPModule)
    for name in ENTRY_POINTS:  # register_fsdp_forward_method wraps each bound method
        assert getattr(model, name).__func__ is not getattr(type(model), name), name
    for module in [model, *model.visual_encoder.blocks, *model.text.layers]:
        policy = module._get_fsdp_state()._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.cast_forward_inputs is False
    ids, mask = make_text(2)
    feat = model.encode_text(ids, mask).feat
    assert feat.dtype == torch.float32 and model.temperature().dtype == torch.bfloat16


def test_compiled_step_runs_every_block_compiled_with_bounded_recompiles():
    """fullgraph=True compile of every block (drop path on), two steps, then evaluation and
    generation: ViT blocks hold at most 2 compiled variants (grad, no grad), MED layers 3 (text,
    multimodal, momentum text), and evaluation / generation add none (they run eager)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from blip_recipes.evaluation.generation import generate
    from blip_recipes.evaluation.retrieval import score_retrieval
    from blip_recipes.models.med import MEDLayer
    from blip_recipes.models.vit import VisionBlock
    from tests.evaluation.eval_helpers import tiny_data, tokenizer

    torch._dynamo.reset()
    parallel = ParallelConfig(compile=True)
    step = _step_parts(None, parallel, drop_path_rate=0.1, vision_depth=4)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = make_text(2)
    eager_blocks = []
    for i, block in enumerate(step.model.visual_encoder.blocks):
        block.attn.register_forward_pre_hook(
            lambda *_, i=i: eager_blocks.append(i) if not torch.compiler.is_compiling() else None
        )
    for index in range(2):
        eager_blocks.clear()
        assert bool(step([DeviceBatch(images, ids, mask)], index, 0.4).ok)
    assert eager_blocks == []  # second step: every online ViT block ran its compiled graph
    vit_entries = len(_debug_get_cache_entry_list(VisionBlock.forward.__code__))
    med_entries = len(_debug_get_cache_entry_list(MEDLayer.forward.__code__))
    assert 1 <= vit_entries <= 2 and 1 <= med_entries <= 3
    model = step.model.eval()
    score_retrieval(model, tokenizer(), tiny_data(), k_test=3, batch_size=3)
    generate(model, images, torch.tensor([98, 5]), eos_token_id=2, method="beam", num_beams=2,
             max_length=12)  # fmt: skip
    assert len(_debug_get_cache_entry_list(VisionBlock.forward.__code__)) == vit_entries
    assert len(_debug_get_cache_entry_list(MEDLayer.forward.__code__)) == med_entries
