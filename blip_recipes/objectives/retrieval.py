"""The retrieval fine-tuning objective (ITC + ITM) with image ids, as pure functions.

Fine-tuning data has several captions per image (COCO: 5), so "the positive of row i" is every
column that shows the same image, not only column i. Two functions of the pretraining objective
(`blip_recipes.objectives.pretrain`) change accordingly:

- ITC targets: `pos = (id_i == ids_all)` over [local batch | id queue], `targets = pos /
  pos.sum(1)`, mixed with the momentum similarities as in pretraining:
  `alpha * softmax(sim_m) + (1 - alpha) * targets`.
- Hard negatives for ITM: drawn from `softmax(sim)` with every same-id candidate at weight 0
  (pretraining masks only the diagonal).

Everything else (fp32 similarity region, the loss form, the ITM loss over 3B rows) is the
pretraining objective's. No host synchronisation, no Python loop over the batch.
"""

from __future__ import annotations

import torch

from blip_recipes.objectives.pretrain import ItcResult, _fp32_region, itc_loss


def same_id_mask(row_ids: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
    """(R,) and (C,) int64 image ids -> (R, C) bool, True where the two show the same image."""
    return row_ids.reshape(-1, 1) == column_ids.reshape(1, -1)


def id_targets(row_ids: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
    """Ground-truth ITC targets from image ids: `pos / pos.sum(1)` with `pos = same_id_mask`.

    Args:
        row_ids: (B,) ids of the query rows (the local batch).
        column_ids: (C,) ids of the candidates ([local batch | id queue]); every row finds
            itself among them, so no row sums to zero.

    Returns:
        (B, C) fp32, each row a distribution uniform over the row's same-image columns.
    """
    positives = same_id_mask(row_ids, column_ids).float()
    return positives / positives.sum(dim=1, keepdim=True)


def itc_loss_with_ids(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    ids: torch.Tensor,
    id_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float | torch.Tensor,
) -> ItcResult:
    """Image-text contrastive loss with momentum distillation, positives defined by image ids.

    Args:
        image_feat, text_feat: (B, E) unit-norm online features (with grad).
        image_feat_m, text_feat_m: (B, E) unit-norm momentum features of the local batch.
        image_queue, text_queue: (E, Q) unit-norm queued momentum features.
        ids: (B,) int64 image ids of the local batch.
        id_queue: (Q,) int64 image ids of the queued pairs.
        temp: temperature, a 1-element tensor (gradient flows through it).
        alpha: distillation weight in [0, 1].

    Returns:
        `ItcResult(loss = (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i)`, similarities (B, B + Q).
    """
    ground_truth = id_targets(ids, torch.cat([ids.reshape(-1), id_queue.reshape(-1)]))
    return itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                    temp, alpha, ground_truth)  # fmt: skip


def masked_negative_weights(sim: torch.Tensor, same_image: torch.Tensor) -> torch.Tensor:
    """Hard-negative sampling weights: `softmax(sim)` with same-image candidates at 0.

    Args:
        sim: (R, C) similarity logits (row = query, column = candidate).
        same_image: (R, C) bool, True where the candidate shows the query's image.

    Returns:
        (R, C) fp32 non-negative weights (not normalised), zero wherever `same_image`. A row
        whose weights all vanish (every other candidate underflowed, or the similarities are
        not finite on a diverged step, which the training step then skips) gets uniform
        weights over its other-image candidates, so sampling never fails on the device. A row
        without any other-image candidate (a batch of one image) cannot have a negative: it
        gets uniform weights over all candidates (the caller should avoid such batches).
    """
    with torch.no_grad(), _fp32_region(sim):
        weights = sim.float().softmax(dim=1).masked_fill(same_image, 0.0)
        usable = torch.isfinite(weights).all(dim=1, keepdim=True) & (
            weights.sum(dim=1, keepdim=True) > 0
        )
        others = (~same_image).float()
        fallback = torch.where(others.sum(dim=1, keepdim=True) > 0, others,
                               torch.ones_like(others))  # fmt: skip
        return torch.where(usable, weights, fallback)


def sample_negatives_by_id(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    row_ids: torch.Tensor,
    column_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative image per text and one hard negative text per image, never of the
    same image.

    Args:
        sim_i2t: (B, C) local images against the candidate texts.
        sim_t2i: (B, C) local texts against the candidate images.
        row_ids: (B,) image ids of the local batch.
        column_ids: (C,) image ids of the candidates (the local batch, or the global batch
            gathered in rank order).
        generator: RNG on the logits' device; None = global RNG.

    Returns:
        (neg_image_for_text (B,), neg_text_for_image (B,)), int64 column indices.
    """
    same_image = same_id_mask(row_ids, column_ids)
    neg_image = torch.multinomial(
        masked_negative_weights(sim_t2i, same_image), 1, generator=generator
    ).squeeze(1)
    neg_text = torch.multinomial(
        masked_negative_weights(sim_i2t, same_image), 1, generator=generator
    ).squeeze(1)
    return neg_image, neg_text
