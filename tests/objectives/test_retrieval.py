"""Retrieval fine-tuning objective: ITC targets from image ids, same-image-masked negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip_recipes.objectives import pretrain as objective
from blip_recipes.objectives.retrieval import (
    id_targets,
    itc_loss_with_ids,
    masked_negative_weights,
    same_id_mask,
    sample_negatives_by_id,
)
from blip_recipes.training.momentum import UNKNOWN_ID


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_targets_spread_evenly_over_every_caption_of_the_image():
    ids = torch.tensor([7, 7, 3])
    queue = torch.tensor([3, 7, UNKNOWN_ID, 7])
    targets = id_targets(ids, torch.cat([ids, queue]))
    third, half = 1 / 4, 1 / 2  # image 7: 2 in the batch + 2 queued; image 3: 1 + 1
    expected = torch.tensor(
        [
            [third, third, 0, 0, third, 0, third],
            [third, third, 0, 0, third, 0, third],
            [0, 0, half, half, 0, 0, 0],
        ]
    )
    assert torch.allclose(targets, expected)
    assert torch.allclose(targets.sum(1), torch.ones(3))


def _direct_itc(img, txt, img_m, txt_m, img_q, txt_q, ids, id_queue, temp, alpha):
    """The reference formula, written row by row."""
    text_all = torch.cat([txt_m, txt_q.t()])
    image_all = torch.cat([img_m, img_q.t()])
    ids_all = torch.cat([ids, id_queue]).tolist()
    losses = []
    for sims, sims_m in ((img @ text_all.t() / temp, img_m @ text_all.t() / temp),
                         (txt @ image_all.t() / temp, txt_m @ image_all.t() / temp)):  # fmt: skip
        total = 0.0
        for i in range(len(ids)):
            same = [j for j, other in enumerate(ids_all) if other == ids[i].item()]
            truth = torch.zeros(len(ids_all))
            truth[same] = 1.0 / len(same)
            target = alpha * sims_m[i].softmax(0) + (1 - alpha) * truth
            total += -(sims[i].log_softmax(0) * target).sum()
        losses.append(total / len(ids))
    return (losses[0] + losses[1]) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_equals_direct_computation(alpha):
    batch, queue, dim = 6, 8, 16
    img, txt = _unit(batch, dim, seed=0), _unit(batch, dim, seed=1)
    img_m, txt_m = _unit(batch, dim, seed=2), _unit(batch, dim, seed=3)
    img_q, txt_q = _unit(dim, queue, seed=4), _unit(dim, queue, seed=5)
    img_q, txt_q = F.normalize(img_q, dim=0), F.normalize(txt_q, dim=0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    id_queue = torch.tensor([2, UNKNOWN_ID, 0, 5, 1, 1, UNKNOWN_ID, 9])
    temp = torch.tensor([0.07])
    result = itc_loss_with_ids(img, txt, img_m, txt_m, img_q, txt_q, ids, id_queue, temp, alpha)
    expected = _direct_itc(img, txt, img_m, txt_m, img_q, txt_q, ids, id_queue, 0.07, alpha)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.sim_i2t.shape == (batch, batch + queue)


def test_distinct_ids_reduce_to_the_pretraining_itc_loss():
    """One caption per image and an unlabelled queue: exactly pretraining's identity targets."""
    batch, queue, dim = 5, 10, 16
    args = (_unit(batch, dim, seed=0), _unit(batch, dim, seed=1), _unit(batch, dim, seed=2),
            _unit(batch, dim, seed=3), F.normalize(torch.randn(dim, queue), dim=0),
            F.normalize(torch.randn(dim, queue), dim=0))  # fmt: skip
    temp = torch.tensor([0.05])
    ours = itc_loss_with_ids(*args, torch.arange(batch), torch.full((queue,), UNKNOWN_ID), temp,
                             0.4)  # fmt: skip
    pretraining = objective.itc_loss(*args, temp, 0.4)
    assert torch.equal(ours.loss, pretraining.loss)


def test_gradient_reaches_features_and_temperature():
    img = _unit(4, 8, seed=0).requires_grad_()
    txt = _unit(4, 8, seed=1).requires_grad_()
    temp = torch.tensor([0.07], requires_grad=True)
    queue = F.normalize(torch.randn(8, 4), dim=0)
    loss = itc_loss_with_ids(img, txt, img.detach(), txt.detach(), queue, queue,
                             torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), temp,
                             0.4).loss  # fmt: skip
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and temp.grad.abs() > 0


def test_negative_weights_are_softmax_with_same_image_zeroed():
    sim = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.0, 4.0, 1.0, 1.0]])
    same = same_id_mask(torch.tensor([4, 6]), torch.tensor([4, 6, 4, 9]))
    weights = masked_negative_weights(sim, same)
    expected = sim.softmax(1).masked_fill(same, 0.0)
    assert torch.equal(weights, expected)
    assert weights[0, 0] == 0 and weights[0, 2] == 0 and weights[1, 1] == 0


def test_rows_that_vanish_fall_back_to_uniform_over_other_images():
    sim = torch.tensor([[1000.0, -1000.0, -1000.0], [math.nan, 0.0, 0.0], [1.0, 1.0, 1.0]])
    same = same_id_mask(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]))
    same[2] = True  # a row with no other image: uniform over everything
    weights = masked_negative_weights(sim, same)
    assert torch.equal(weights[0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(weights[1], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(weights[2], torch.ones(3))


def test_sampled_negatives_never_share_the_image():
    """Many draws over a batch with 5 captions per image: never a same-image negative, and
    every other-image candidate is reachable."""
    ids = torch.arange(4).repeat_interleave(5)  # 4 images x 5 captions
    sim = torch.randn(20, 20, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    seen_images, seen_texts = set(), set()
    for _ in range(200):
        neg_image, neg_text = sample_negatives_by_id(sim, sim.t().contiguous(), ids, ids,
                                                     generator)  # fmt: skip
        assert not (ids[neg_image] == ids).any()
        assert not (ids[neg_text] == ids).any()
        seen_images.update(neg_image.tolist())
        seen_texts.update(neg_text.tolist())
    assert seen_images == seen_texts == set(range(20))


def test_negatives_over_a_gathered_batch_use_the_columns_ids():
    row_ids = torch.tensor([0, 1])
    column_ids = torch.tensor([0, 1, 0, 2])  # another rank's batch: a caption of image 0
    sim = torch.zeros(2, 4)
    neg_image, neg_text = sample_negatives_by_id(sim, sim, row_ids, column_ids,
                                                 torch.Generator().manual_seed(0))  # fmt: skip
    for _ in range(50):
        neg_image, neg_text = sample_negatives_by_id(sim, sim, row_ids, column_ids)
        assert neg_image[0].item() in (1, 3) and neg_text[0].item() in (1, 3)
        assert neg_image[1].item() in (0, 2, 3) and neg_text[1].item() in (0, 2, 3)
