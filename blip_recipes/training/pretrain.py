"""BLIP pretraining's objective on one micro-batch, and its optimizer step.

`pretrain_losses` composes the model's entry points with the pure objective
(`blip_recipes.objectives.pretrain`): ITC against the queues, hard negatives, one multimodal pass
for ITM and LM. `PretrainStep` is `blip_recipes.training.step.OptimizerStep` (EMA, accumulation,
the agreed skip, enqueue, schedule) with these losses as its micro-batch; the recipe and the
benchmarks run it.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from blip_recipes.models.blip import BlipOutput, BlipPretrain, MomentumTargets
from blip_recipes.objectives import pretrain as objective
from blip_recipes.parallel.parallelize import reused_units
from blip_recipes.training.step import DeviceBatch, OptimizerStep

_EAGER = objective.ItcItmLosses()


def pretrain_losses(
    model: BlipPretrain,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: MomentumTargets,
    alpha: float | torch.Tensor,
    generator: torch.Generator | None = None,
    negative_kv: str = "select",
    lm_loss: objective.ChunkedLMLoss | None = None,
    itc_itm: objective.ItcItmLosses | None = None,
) -> BlipOutput:
    """ITC, ITM with hard negatives and LM for one batch (the reference's `forward`).

    Args:
        model: the online model (plain or FSDP2-sharded with registered entry points).
        images: (B, 3, H, W) normalised images.
        input_ids: (B, L) int64, `[CLS] ... [SEP] [PAD]...`, padding trailing.
        attention_mask: (B, L), 1 = token.
        targets: momentum features and the queue snapshot for this batch (fp32, never passed
            through an FSDP forward).
        alpha: distillation weight (0 -> 0.4 over the first two epochs).
        generator: RNG for hard-negative sampling, on the images' device.
        negative_kv: `select` or `recompute` (`BlipPretrain.multimodal`).
        lm_loss: a chunked LM loss computed inside the multimodal pass; None = fp32 logits
            and `objective.lm_loss` (the same number in fp32).
        itc_itm: the ITC (with the hard negatives) and ITM losses, eager or compiled; None =
            eager.

    Returns:
        `BlipOutput` with `loss = loss_ita + loss_itm + loss_lm`.
    """
    image = model.encode_image(images)
    text = model.encode_text(input_ids, attention_mask)
    temp = model.temperature()
    itc_itm = itc_itm if itc_itm is not None else _EAGER
    loss_ita, neg_image, neg_text = itc_itm.itc_and_negatives(
        image.feat,
        text.feat,
        targets.image_feat_m,
        targets.text_feat_m,
        targets.image_queue,
        targets.text_queue,
        temp,
        alpha,
        generator,
    )
    multimodal = model.multimodal(image.embeds, input_ids, attention_mask, neg_image, neg_text,
                                  negative_kv, lm_loss)  # fmt: skip
    itm = itc_itm.itm(multimodal.itm_logits)
    if multimodal.loss_lm is not None:
        loss_lm = multimodal.loss_lm
    else:
        labels = objective.lm_labels(input_ids, model.pad_token_id)  # column 0 is never a target
        loss_lm = objective.lm_loss(multimodal.lm_logits, labels)
    return BlipOutput(
        loss=loss_ita + itm.loss + loss_lm,
        loss_ita=loss_ita,
        loss_itm=itm.loss,
        loss_lm=loss_lm,
        itm_acc=itm.accuracy,
        itm_pos_prob=itm.pos_prob,
        itm_neg_prob=itm.neg_prob,
        temp=temp.detach().float().reshape(()),
        image_feat=image.feat.detach(),
        text_feat=text.feat.detach(),
    )


class PretrainStep(OptimizerStep):
    """The optimizer step of BLIP pretraining: `OptimizerStep` with `pretrain_losses`, shared by
    the recipe and the benchmarks (needs the momentum state: `momentum=`).

    Call as `step(batches, step_index, alpha=...)`; `alpha` is the distillation weight of this
    step (`blip_recipes.training.optim.alpha_at_step`).
    """

    needs_momentum = True

    def reused_units(self) -> list[FSDPModule]:
        """The MED layers (text pass, multimodal pass) and the root (every entry point)."""
        return reused_units(self.model)

    def micro_batch(  # type: ignore[override]
        self, batch: DeviceBatch, targets: MomentumTargets, alpha: float
    ) -> BlipOutput:
        """`pretrain_losses` of one micro-batch (`self.generator` is seeded for it)."""
        opts = self.options
        return pretrain_losses(self.model, *batch, targets, alpha, self.generator,
                               opts.negative_kv, opts.lm_loss, opts.itc_itm)  # fmt: skip
