"""Scale-out through the real CLI: data-parallel layouts, gradient accumulation, two nodes."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.recipes.launch import run_recipe, run_two_nodes
from tests.recipes.test_blip_pretrain import _flatten, assert_ok


def _consolidated(checkpoint, target) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(checkpoint, target)
    return _flatten(torch.load(target, weights_only=False))


def _same_training_state(a: dict, b: dict, exact: bool = True) -> None:
    """Model, optimizer, momentum (EMA weights, queues, pointer) and loader position agree."""
    keys = [k for k in a if k.split(".")[0] in ("model", "optimizer", "momentum", "loader")]
    assert keys and set(keys) <= set(b)
    for key in keys:
        left, right = a[key], b[key]
        if not isinstance(left, torch.Tensor):
            assert left == right, key
        elif exact:
            assert torch.equal(left, right), key
        else:
            assert torch.allclose(left.float(), right.float(), rtol=1e-4, atol=1e-5), key


FP32_EPS = torch.finfo(torch.float32).eps


def _same_gradients(a: dict, b: dict, world: int) -> None:
    """Adam's moments after the first step are (1 - beta1) g and (1 - beta2) g^2 of the reduced
    gradient g: the same weights and data on every rank give bitwise equal local gradients, so the
    two layouts differ only in the order the `world` local gradients are summed. That order moves
    each element by at most ~world * eps * sum_r |g_r|; per-rank gradients are not saved, so the
    tensor's largest element stands in for the summands, with a margin of 16 for cancellation.
    A missing or doubled reduction moves most elements by O(|g|) and fails here."""
    moments = [
        k for k in a if k.startswith("optimizer.") and k.endswith((".exp_avg", ".exp_avg_sq"))
    ]
    assert moments and set(moments) <= set(b)
    for key in moments:
        left, right = a[key].float(), b[key].float()
        tol = 16 * world * FP32_EPS * left.abs().max().item()
        assert torch.allclose(left, right, rtol=16 * world * FP32_EPS, atol=tol), (
            key, (left - right).abs().max().item(), tol)  # fmt: skip


def _adam_bounded(a: dict, b: dict, lr_sum: float) -> None:
    """Adam-updated weights (and their EMA) are not comparable elementwise: where a gradient is
    near zero, AdamW's g / sqrt(v) turns reduction-order noise into a step of about lr in either
    direction. What holds in any order: each element moved by at most ~lr per step in each run, so
    two runs from the same init differ by at most 2 * sum(lr) (margin 1.5 for Adam's bias
    correction). Model and momentum weights are held to that; the exact gradients are checked by
    `_same_gradients` and the pure bookkeeping (queue pointer, loader position) exactly."""
    keys = [k for k in a if k.split(".")[0] in ("model", "momentum", "loader")]
    assert keys and set(keys) <= set(b)
    for key in keys:
        left, right = a[key], b[key]
        if not isinstance(left, torch.Tensor):
            assert left == right, key
        elif not left.is_floating_point():
            assert torch.equal(left, right), key
        elif "queue" not in key:
            bound = 3 * lr_sum
            assert (left.float() - right.float()).abs().max().item() <= bound, (key, bound)


@pytest.mark.slow  # 2 runs x 4 gloo ranks (~2.5 min on 2 cores); HSDP(2x2) per step: test_parallel_fsdp
def test_fsdp4_and_hsdp_2x2_train_the_same(tmp_path):
    """4 ranks as FSDP(4) and as HSDP(2 replicas x 2 shards): the same reduced gradient on the
    first step (to fp32 summation order), the same losses, weights within what AdamW can make of
    summation noise (2 x sum of lr), the same queue pointer and loader position."""
    common = ("training.steps=3", "momentum.queue_size=64", "checkpoint.interval=1",
              "checkpoint.keep_latest_k=0")  # fmt: skip
    fsdp = run_recipe(tmp_path / "fsdp", *common, nproc=4)
    hsdp = run_recipe(tmp_path / "hsdp", *common, "parallel.data_parallel=hsdp",
                      "parallel.dp_replicate=2", nproc=4)  # fmt: skip
    assert_ok(fsdp)
    assert_ok(hsdp)
    assert list(hsdp.losses()) == [1, 2, 3]
    for step, loss in fsdp.losses().items():
        assert hsdp.losses()[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    first = [_consolidated(run.checkpoints()[0], tmp_path / f"{name}1.pt")
             for name, run in (("fsdp", fsdp), ("hsdp", hsdp))]  # fmt: skip
    _same_gradients(*first, world=4)
    lr_sum = sum(m["lr"] for m in fsdp.metrics)
    assert lr_sum == pytest.approx(sum(m["lr"] for m in hsdp.metrics))
    _adam_bounded(
        _consolidated(fsdp.checkpoints()[-1], tmp_path / "fsdp.pt"),
        _consolidated(hsdp.checkpoints()[-1], tmp_path / "hsdp.pt"),
        lr_sum,
    )


@pytest.mark.slow  # 3 runs (~1 min on 2 cores); accumulation == one batch: tests/training/test_step.py
def test_grad_accumulation_resumes_bitwise(tmp_path):
    """2 micro-batches per step: 4 steps straight == 2 steps, then resume for 2 more."""
    straight = run_recipe(tmp_path / "straight", "training.steps=4",
                          "training.grad_accum_steps=2")  # fmt: skip
    assert_ok(straight)
    out = tmp_path / "resumed"
    assert_ok(run_recipe(out, "training.steps=2", "training.grad_accum_steps=2"))
    resumed = run_recipe(out, "training.steps=4", "training.grad_accum_steps=2")
    assert_ok(resumed)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    for step, loss in straight.losses().items():
        assert resumed.losses()[step] == loss
    _same_training_state(
        _consolidated(straight.checkpoints()[-1], tmp_path / "a.pt"),
        _consolidated(resumed.checkpoints()[-1], tmp_path / "b.pt"),
    )


@pytest.mark.slow  # two torchrun agents and 4 gloo ranks on one machine (~1 min on 2 cores)
def test_two_nodes_hsdp_resume_on_one_node_and_on_one_rank(tmp_path):
    """Two simulated nodes x 2 ranks train HSDP 2 x 2 (one replica per node); the checkpoint
    then loads on 1 node x 2 ranks (FSDP, batch 16) and on 1 rank (batch 32): weights,
    optimizer, momentum, queues and data position carry over exactly (the same global batch of
    32, saved again unchanged)."""
    out = tmp_path / "nodes"
    runs = run_two_nodes(out, "training.steps=2", "parallel.data_parallel=hsdp")
    for run in runs:
        assert run.proc.returncode == 0, run.proc.stderr[-4000:]
    saved = runs[0].checkpoints()[-1]
    assert saved.name == "step-2"
    reference = _consolidated(saved, tmp_path / "nodes.pt")
    for name, nproc, batch in (("one-node", 2, 16), ("one-rank", 1, 32)):
        moved = run_recipe(tmp_path / name, "training.steps=2", f"checkpoint.resume={saved}",
                           f"data.batch_size={batch}", nproc=nproc)  # fmt: skip
        assert_ok(moved)
        _same_training_state(
            reference, _consolidated(moved.checkpoints()[-1], tmp_path / f"{name}.pt")
        )
    # and training continues from it on one node
    more = run_recipe(tmp_path / "one-node", "training.steps=3", "data.batch_size=16", nproc=2)
    assert_ok(more)
    assert more.metrics[-1]["step"] == 3
