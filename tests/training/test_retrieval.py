"""retrieval_losses / RetrievalStep on the tiny model: the ITM pairs are the ones drawn, same-image
pairs are never negatives, the decoder gets no gradient, ids enter the queue; the gather with
gradient and negatives over 2 gloo ranks; the units run twice reduce-scatter once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip_recipes.objectives.retrieval import itc_loss_with_ids, sample_negatives_by_id
from blip_recipes.parallel._testing import spawn_ranks
from blip_recipes.training.retrieval import (
    RetrievalBatch,
    RetrievalStep,
    gather_rows,
    gather_rows_with_grad,
    retrieval_losses,
)
from tests.models.tiny_blip import make_model, make_text, momentum_state


def _batch(ids: list[int], seed: int = 0) -> RetrievalBatch:
    images = torch.randn(len(ids), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    tokens, mask = make_text(len(ids), seed=seed + 1)
    return RetrievalBatch(images, tokens, mask, torch.tensor(ids))


def _expected(model, batch, targets, id_queue, alpha, seed, candidates=None):
    """ITC and ITM recomputed pair by pair (candidates: gathered (feats, ids, tokens, embeds))."""
    images, tokens, mask, ids = batch
    image, text = model.encode_image(images), model.encode_text(tokens, mask)
    temp = model.temperature()
    itc = itc_loss_with_ids(image.feat, text.feat, targets.image_feat_m, targets.text_feat_m,
                            targets.image_queue, targets.text_queue, ids, id_queue, temp, alpha)  # fmt: skip
    img_all, txt_all, ids_all, tok_all, mask_all, embeds_all = candidates or (
        image.feat, text.feat, ids, tokens, mask, image.embeds)  # fmt: skip
    with torch.no_grad():
        sim_i2t = image.feat @ txt_all.t() / temp
        sim_t2i = text.feat @ img_all.t() / temp
    generator = torch.Generator().manual_seed(seed)
    neg_image, neg_text = sample_negatives_by_id(sim_i2t, sim_t2i, ids, ids_all, generator)
    logits = torch.cat([
        model.itm_logits(image.embeds, tokens, mask),
        model.itm_logits(embeds_all[neg_image], tokens, mask),
        model.itm_logits(image.embeds, tok_all[neg_text], mask_all[neg_text]),
    ])  # fmt: skip
    labels = torch.tensor([1] * len(ids) + [0] * 2 * len(ids))
    return itc.loss, F.cross_entropy(logits, labels), ids_all[neg_image], ids_all[neg_text]


def test_losses_equal_the_pairwise_computation():
    torch.manual_seed(0)
    model = make_model()  # eval mode: no dropout, so both computations see the same numbers
    momentum = momentum_state(queue_size=12, track_ids=True)
    momentum.copy_from(model)
    momentum.train_mode = False
    batch = _batch([4, 4, 5, 5, 6, 7])
    momentum.enqueue(torch.randn(6, 16), torch.randn(6, 16), ids=torch.tensor([4, 9, 9, 5, 1, 2]))
    targets = momentum.targets(batch.images, batch.input_ids, batch.attention_mask)
    out = retrieval_losses(model, batch, targets, momentum.id_queue, 0.4,
                           torch.Generator().manual_seed(3))  # fmt: skip
    loss_ita, loss_itm, neg_image_ids, neg_text_ids = _expected(
        model, batch, targets, momentum.id_queue, 0.4, seed=3
    )
    assert torch.allclose(out.loss_ita, loss_ita, atol=1e-6)
    assert torch.allclose(out.loss_itm, loss_itm, atol=1e-5)
    assert out.loss_lm == 0 and torch.allclose(out.loss, out.loss_ita + out.loss_itm)
    assert not (neg_image_ids == batch.image_ids).any()
    assert not (neg_text_ids == batch.image_ids).any()


def test_only_the_decoder_gets_no_gradient():
    model = make_model().train()
    momentum = momentum_state(queue_size=8, track_ids=True)
    momentum.copy_from(model)
    batch = _batch([0, 0, 1, 2])
    targets = momentum.targets(batch.images, batch.input_ids, batch.attention_mask)
    retrieval_losses(model, batch, targets, momentum.id_queue, 0.4).loss.backward()
    for name, param in model.named_parameters():
        decoder_only = "causal_self_attn." in name or name.startswith("lm_head.")
        assert (param.grad is None) == decoder_only, name


def test_step_updates_and_enqueues_ids():
    model = make_model().train()
    momentum = momentum_state(queue_size=8, track_ids=True)
    momentum.copy_from(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = RetrievalStep(model, optimizer, schedule, momentum=momentum)
    before = model.itm_head.weight.detach().clone()
    for index, ids in enumerate(([1, 1, 2, 3], [4, 5, 5, 6])):
        result = step([_batch(ids, seed=index)], index, 0.4)
        assert bool(result.ok)
    assert momentum.id_queue.tolist() == [1, 1, 2, 3, 4, 5, 5, 6]
    assert not torch.equal(model.itm_head.weight, before)


def gather_worker(rank: int, world: int, out: str) -> None:
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather_rows_with_grad(x, dist.group.WORLD)
    weights = torch.arange(12.0).reshape(4, 3) * (rank + 1)  # a different loss per rank
    (gathered * weights).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, Path(out) / f"gather{rank}.pt")


def test_gather_with_grad_sums_every_ranks_gradient(tmp_path):
    spawn_ranks(gather_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"gather{rank}.pt")
        assert torch.equal(result["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        # d/dx of sum over ranks r' of (r' + 1) * weights[rows of this rank]
        expected = 3 * torch.arange(12.0).reshape(4, 3)[2 * rank : 2 * rank + 2]
        assert torch.equal(result["grad"], expected)


def negatives_worker(rank: int, world: int, out: str) -> None:
    """Same weights on both ranks; image 0 has a caption on each rank."""
    model = make_model()
    momentum = momentum_state(queue_size=8, track_ids=True, group=dist.group.WORLD)
    momentum.copy_from(model)
    momentum.train_mode = False
    batch = _batch([[0, 1], [0, 2]][rank], seed=rank)
    targets = momentum.targets(batch.images, batch.input_ids, batch.attention_mask)
    out_losses = retrieval_losses(model, batch, targets, momentum.id_queue, 0.4,
                                  torch.Generator().manual_seed(5), dist.group.WORLD)  # fmt: skip
    out_losses.loss.backward()  # the gathered image embeddings send gradients back
    image, text = model.encode_image(batch.images), model.encode_text(*batch[1:3])
    group = dist.group.WORLD
    candidates = (gather_rows(image.feat.detach(), group), gather_rows(text.feat.detach(), group),
                  gather_rows(batch.image_ids, group), gather_rows(batch.input_ids, group),
                  gather_rows(batch.attention_mask, group), gather_rows(image.embeds.detach(), group))  # fmt: skip
    loss_ita, loss_itm, neg_image_ids, neg_text_ids = _expected(
        model, batch, targets, momentum.id_queue, 0.4, seed=5, candidates=candidates
    )
    momentum.enqueue(targets.image_feat_m, targets.text_feat_m, ids=batch.image_ids)
    torch.save({"ours": (out_losses.loss_ita.detach(), out_losses.loss_itm.detach()),
                "expected": (loss_ita.detach(), loss_itm.detach()),
                "neg_ids": (neg_image_ids, neg_text_ids), "ids": batch.image_ids,
                "id_queue": momentum.id_queue,
                "vit_grad": model.visual_encoder.patch_embed.proj.weight.grad},
               Path(out) / f"neg{rank}.pt")  # fmt: skip


def test_negatives_over_two_ranks_equal_the_gathered_computation(tmp_path):
    spawn_ranks(negatives_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"neg{rank}.pt")
        for ours, expected in zip(result["ours"], result["expected"]):
            assert torch.allclose(ours, expected, atol=1e-5)
        for neg in result["neg_ids"]:
            assert not (neg == result["ids"]).any()
        assert result["id_queue"].tolist()[:4] == [0, 1, 0, 2]  # rank order
        assert result["vit_grad"] is not None and result["vit_grad"].abs().sum() > 0


def _reduce_counts_and_grads(mesh, group, rank: int, reduce_reused: str, param_dtype):
    """Two RetrievalStep micro-batch backwards under FSDP2: the last one's reduce-scatters per
    unit, and the full gradients."""
    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.parallel import parallelize_blip
    from blip_recipes.parallel._comm_count import count_fsdp_collectives, unit_names
    from blip_recipes.training.step import StepOptions

    model = make_model()  # eval: dropout off, so both paths compute the same function
    momentum = momentum_state(queue_size=16, group=group, track_ids=True)
    momentum.copy_from(model)
    parallelize_blip(model, momentum.encoders, ParallelConfig(), mesh, param_dtype=param_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    options = StepOptions(rank=rank, group=group, reduce_reused=reduce_reused)
    step = RetrievalStep(model, optimizer, schedule, options, momentum, negatives_group=group)
    batch = _batch([2 * rank, 2 * rank, 2 * rank + 1, 7], seed=rank)
    names = unit_names(online=model)
    for index in range(2):  # the second backward must reduce like the first (flags restored)
        targets = momentum.targets(batch.images, batch.input_ids, batch.attention_mask)
        step.generator.manual_seed(index)
        out = step.micro_batch(batch, targets, 0.4)
        model.zero_grad(set_to_none=True)
        with count_fsdp_collectives(names) as counts:
            step.reduce_once.backward(out.loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    table = {unit: n for (kind, unit), n in counts.items() if kind == "reduce_scatter"}
    return grads, table


_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _compare_reduce_paths(mesh, group, rank: int, dtypes=tuple(_DTYPES)) -> dict:
    """Per-use vs once with fp32 (and bf16) parameters: gradient difference and counts."""
    result = {}
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        old, old_counts = _reduce_counts_and_grads(mesh, group, rank, "per_use", dtype)
        new, new_counts = _reduce_counts_and_grads(mesh, group, rank, "once", dtype)
        assert old.keys() == new.keys() and all(g.isfinite().all() for g in new.values())
        result[dtype_name] = {
            "max_diff": max((old[k] - new[k]).abs().max().item() for k in old),
            "max_grad": max(g.abs().max().item() for g in old.values()),
            "no_grad": sorted(n for n, _ in make_model().named_parameters() if n not in new),
            "old": old_counts,
            "new": new_counts,
        }
    return result


def _check_reduce_paths(result: dict) -> None:
    for dtype_name, run in result.items():
        tolerance = {"fp32": 1e-6, "bf16": 1e-2}[dtype_name]
        for unit in ("online", "online.text.layers.0", "online.text.layers.1"):  # run twice
            assert run["old"][unit] == 2 and run["new"][unit] == 1, (dtype_name, unit, run)
        for unit in ("online.visual_encoder.blocks.0", "online.visual_encoder.blocks.1"):
            assert run["old"][unit] == run["new"][unit] == 1, (dtype_name, unit)
        assert run["max_diff"] <= tolerance * max(run["max_grad"], 1.0), (dtype_name, run)
        assert all("causal_self_attn." in n or n.startswith("lm_head.") for n in run["no_grad"])


def test_the_text_layers_and_the_root_reduce_once_per_step_on_one_rank():
    """The text encoder runs for ITC and again for ITM: its layers and the root reduce-scatter
    once (FSDP2 at degree 1), with the per-use path's gradients."""
    from blip_recipes.parallel import init_distributed

    info = init_distributed("cpu")
    _check_reduce_paths(_compare_reduce_paths(info.mesh, None, 0, ("fp32",)))


def reduce_once_worker(rank: int, world: int, out_dir: str) -> None:
    from blip_recipes.parallel import build_data_parallel_mesh

    torch.set_num_threads(1)
    mesh, group = build_data_parallel_mesh("cpu", world, "fsdp")
    result = _compare_reduce_paths(mesh, group, rank)  # negatives from both ranks' batches
    (Path(out_dir) / f"reduce{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_the_text_layers_and_the_root_reduce_once_per_step_on_two_ranks(tmp_path):
    spawn_ranks(reduce_once_worker, 2, tmp_path, str(tmp_path))
    for rank in range(2):
        _check_reduce_paths(json.loads((tmp_path / f"reduce{rank}.json").read_text()))
