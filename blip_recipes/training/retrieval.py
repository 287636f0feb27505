"""One step of BLIP's image-text retrieval fine-tuning (ITC + ITM, positives by image id).

`retrieval_losses` composes the model's entry points with `blip_recipes.objectives.retrieval`:

    encode_image, encode_text -> ITC against [local momentum | queue], targets from image ids
    -> hard negatives from softmax(sim) with same-image candidates masked (within the rank, or
       over the global batch with `negatives_group`) -> one ITM pass of 3B rows (`itm_logits`,
       `[ENC]` first): B positives, B (text, negative image), B (negative text, image)

The captioning decoder is not run. `RetrievalStep` is the shared optimizer step
(`blip_recipes.training.step.OptimizerStep`: temperature clamp, EMA, micro-batches, one agreed
flag, optimizer skip, enqueue, scheduler) with these losses; its momentum state tracks image ids,
which the step enqueues with the features.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from blip_recipes.config import Config
from blip_recipes.models.blip import BlipOutput, BlipPretrain, MomentumTargets
from blip_recipes.objectives import pretrain as objective
from blip_recipes.objectives.retrieval import itc_loss_with_ids, sample_negatives_by_id
from blip_recipes.parallel.distributed import DistInfo
from blip_recipes.parallel.parallelize import reused_units
from blip_recipes.training.momentum import MomentumState
from blip_recipes.training.step import OptimizerStep, StepOptions

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RetrievalBatch(NamedTuple):
    """One (micro-)batch on the device: images (B, 3, H, W) normalised, input_ids and
    attention_mask (B, L), image_ids (B,) int64 (equal iff the same image)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_ids: torch.Tensor


def gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, ...) on every rank -> (W * B, ...) in rank order, no gradient."""
    world = dist.get_world_size(group)
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.contiguous(), group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps
    this rank's rows (the reference's `all_gather_with_grad`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rows = group, tensor.shape[0]
        ctx.rank = dist.get_rank(group)
        return gather_rows(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_rows_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, ...) -> (W * B, ...) in rank order; gradients flow back to the rank owning a row."""
    return _GatherWithGrad.apply(tensor, group)


def retrieval_losses(
    model: BlipPretrain,
    batch: RetrievalBatch,
    targets: MomentumTargets,
    id_queue: torch.Tensor,
    alpha: float | torch.Tensor,
    generator: torch.Generator | None = None,
    negatives_group: dist.ProcessGroup | None = None,
) -> BlipOutput:
    """ITC (positives by image id) and ITM (same-image pairs never negatives) for one batch.

    Args:
        model: the online model (plain or FSDP2-sharded with registered entry points).
        batch: the micro-batch on the device.
        targets: momentum features and the queue snapshot (fp32, no grad).
        id_queue: (Q,) int64 image ids of the queued pairs (read before the enqueue).
        alpha: distillation weight.
        generator: RNG for hard-negative sampling, on the images' device.
        negatives_group: draw negatives from the global batch of this group (image embeddings
            gathered with gradient, texts and ids gathered); None = within the local batch.

    Returns:
        `BlipOutput` with `loss = loss_ita + loss_itm` and `loss_lm = 0` (no decoder).
    """
    images, input_ids, attention_mask, ids = batch
    image = model.encode_image(images)
    text = model.encode_text(input_ids, attention_mask)
    temp = model.temperature()
    itc = itc_loss_with_ids(
        image.feat, text.feat, targets.image_feat_m, targets.text_feat_m,
        targets.image_queue, targets.text_queue, ids, id_queue, temp, alpha,
    )  # fmt: skip
    image_feat, text_feat = image.feat.detach().float(), text.feat.detach().float()
    if negatives_group is not None and dist.get_world_size(negatives_group) > 1:
        candidate_ids = gather_rows(ids, negatives_group)
        text_feat_all = gather_rows(text_feat, negatives_group)
        image_feat_all = gather_rows(image_feat, negatives_group)
        candidate_tokens = gather_rows(torch.stack([input_ids, attention_mask]).transpose(0, 1),
                                       negatives_group).transpose(0, 1)  # fmt: skip
        candidate_images = gather_rows_with_grad(image.embeds, negatives_group)
    else:
        candidate_ids, text_feat_all, image_feat_all = ids, text_feat, image_feat
        candidate_tokens = torch.stack([input_ids, attention_mask])
        candidate_images = image.embeds
    with torch.no_grad(), objective._fp32_region(image_feat):
        detached_temp = temp.detach().float().reshape(())
        sim_i2t = image_feat @ text_feat_all.t() / detached_temp
        sim_t2i = text_feat @ image_feat_all.t() / detached_temp
    neg_image, neg_text = sample_negatives_by_id(sim_i2t, sim_t2i, ids, candidate_ids, generator)
    batch_size = ids.shape[0]
    own = torch.arange(batch_size, device=ids.device)
    pair_images = torch.cat([image.embeds, candidate_images[neg_image]])  # (2B, 1 + N, D)
    pair_ids = torch.cat([input_ids, input_ids, candidate_tokens[0][neg_text]])
    pair_mask = torch.cat([attention_mask, attention_mask, candidate_tokens[1][neg_text]])
    image_rows = torch.cat([own, own + batch_size, own])
    itm = objective.itm_loss(model.itm_logits(pair_images, pair_ids, pair_mask, image_rows))
    return BlipOutput(
        loss=itc.loss + itm.loss,
        loss_ita=itc.loss,
        loss_itm=itm.loss,
        loss_lm=torch.zeros_like(itm.loss),
        itm_acc=itm.accuracy,
        itm_pos_prob=itm.pos_prob,
        itm_neg_prob=itm.neg_prob,
        temp=temp.detach().float().reshape(()),
        image_feat=image.feat.detach(),
        text_feat=text.feat.detach(),
    )


class RetrievalStep(OptimizerStep):
    """The optimizer step of retrieval fine-tuning: `OptimizerStep` with `retrieval_losses`.

    The momentum state must track ids (`MomentumState(track_ids=True)`): every micro-batch's ITC
    reads the id queue as it stands and enqueues its ids with its momentum features. Call as
    `step(batches, step_index, alpha=...)`.

    Args:
        model, optimizer, lr_scheduler, options, momentum: as `OptimizerStep`.
        negatives_group: draw hard negatives from the global batch of this group (see
            `retrieval_losses`); None = within the local batch.
    """

    needs_momentum = True

    def __init__(
        self,
        model: BlipPretrain,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        options: StepOptions | None = None,
        momentum: MomentumState | None = None,
        negatives_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(model, optimizer, lr_scheduler, options, momentum)
        assert self.momentum is not None
        if self.momentum.id_queue is None:
            raise ValueError("retrieval fine-tuning needs a momentum state with track_ids=True")
        self.negatives_group = negatives_group

    @classmethod
    def config_arguments(cls, cfg: Config, dist_info: DistInfo) -> dict[str, Any]:
        """Negatives over every data-parallel rank when `retrieval.negatives_all_ranks` and more
        than one rank."""
        many = cfg.retrieval.negatives_all_ranks and dist_info.world_size > 1
        return {"negatives_group": dist_info.dp_group if many else None}

    def reused_units(self) -> list[FSDPModule]:
        """The MED layers (unimodal text pass, ITM pass) and the root (every entry point)."""
        return reused_units(self.model)

    def micro_batch(  # type: ignore[override]
        self, batch: RetrievalBatch, targets: MomentumTargets, alpha: float
    ) -> BlipOutput:
        """`retrieval_losses`: the id queue as it stands before this micro-batch enqueues."""
        assert self.momentum is not None and self.momentum.id_queue is not None
        return retrieval_losses(self.model, batch, targets, self.momentum.id_queue, alpha,
                                self.generator, self.negatives_group)  # fmt: skip
