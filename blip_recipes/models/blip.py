"""The composed BLIP pretraining model: ViT + MED + heads, one training step's model part.

`BlipPretrain.forward` runs ITC, ITM (with hard negatives) and LM for one batch, given the
momentum targets computed beforehand by `blip_recipes.momentum.MomentumState`. The loss maths is
in `blip_recipes.objective`; this module only routes tensors through the submodules' `forward`s
(FSDP2 hooks fire there) and holds no distributed code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blip_recipes import objective
from blip_recipes.models.heads import project_features
from blip_recipes.models.med import MED, LMHead, init_bert_modules
from blip_recipes.models.vit import VisionTransformer


@dataclass
class MomentumTargets:
    """What the momentum encoders and the queues contribute to one step (no grad).

    Attributes:
        image_feat_m: (B, E) unit-norm momentum image features of the local batch, fp32.
        text_feat_m: (B, E) unit-norm momentum text features of the local batch, fp32.
        image_queue: (E, Q) fp32 queue of earlier momentum image features.
        text_queue: (E, Q) fp32 queue of earlier momentum text features.
    """

    image_feat_m: torch.Tensor
    text_feat_m: torch.Tensor
    image_queue: torch.Tensor
    text_queue: torch.Tensor


@dataclass
class BlipOutput:
    """Losses and diagnostics of one step; every field is a 0-d tensor (no host sync).

    `loss = loss_ita + loss_itm + loss_lm` is the one to backpropagate. `image_feat` and
    `text_feat` are (B, E) online features (fp32) for logging or evaluation.
    """

    loss: torch.Tensor
    loss_ita: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor
    itm_acc: torch.Tensor
    itm_pos_prob: torch.Tensor
    itm_neg_prob: torch.Tensor
    temp: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor


class BlipPretrain(nn.Module):
    """BLIP pretraining model (online side).

    Args:
        visual_encoder: ViT returning (B, 1 + N, D_vision).
        text: MED with causal self-attention and cross-attention in every layer.
        vision_proj: Linear(D_vision -> E).
        text_proj: Linear(D_text -> E).
        itm_head: Linear(D_text -> 2).
        lm_head: `LMHead` (its projection weight is `text.embeddings.word_embeddings.weight`).
        enc_token_id: id put first for ITM ([ENC], 30523 in the reference tokenizer).
        dec_token_id: id put first for LM ([DEC], 30522).
        pad_token_id: padding id, ignored by the LM loss ([PAD], 0).
        temp_init: initial temperature (0.07).
        label_smoothing: LM label smoothing (0.1).
        share_cross_attention_kv: compute the image-token cross-attention keys/values once per
            layer and step, reuse them for positives, negatives (row gather) and the decoder.
            Off recomputes them per pass, as the reference does. Same result to float tolerance.

    The temperature is a (1,)-shaped parameter (FSDP2 refuses 0-d parameters). Call
    `clamp_temperature_()` at the start of each step (outside forward), as the reference does;
    forward also applies the clamp to the value it uses (straight-through) as a safety net.
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer,
        text: MED,
        vision_proj: nn.Linear,
        text_proj: nn.Linear,
        itm_head: nn.Linear,
        lm_head: LMHead,
        enc_token_id: int = 30523,
        dec_token_id: int = 30522,
        pad_token_id: int = 0,
        temp_init: float = 0.07,
        label_smoothing: float = 0.1,
        share_cross_attention_kv: bool = True,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text = text
        self.vision_proj = vision_proj
        self.text_proj = text_proj
        self.itm_head = itm_head
        self.lm_head = lm_head
        self.temp = nn.Parameter(torch.full((1,), temp_init))
        self.temp_init = temp_init
        self.enc_token_id = enc_token_id
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id
        self.label_smoothing = label_smoothing
        self.share_cross_attention_kv = share_cross_attention_kv
        self.queue_size: int | None = None  # default for the momentum state built beside it

    @property
    def embed_dim(self) -> int:
        """E, the width of the contrastive features."""
        return self.vision_proj.out_features

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp `temp` in place to [0.001, 0.5] (works on FSDP2-sharded DTensors)."""
        self.temp.clamp_(objective.TEMP_MIN, objective.TEMP_MAX)

    def _clamped_temp(self) -> torch.Tensor:
        clamped = self.temp.clamp(objective.TEMP_MIN, objective.TEMP_MAX)
        return self.temp + (clamped - self.temp).detach()

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: MomentumTargets,
        alpha: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> BlipOutput:
        """One training step's model part: ITC, ITM with hard negatives, LM.

        Args:
            images: (B, 3, H, W) normalised images.
            input_ids: (B, L) int64, `[CLS] ... [SEP] [PAD]...` (first token gets replaced).
            attention_mask: (B, L), 1 = token.
            targets: momentum features and queue snapshot for this batch.
            alpha: distillation weight (0 -> 0.4 over the first two epochs).
            generator: RNG for hard-negative sampling, on the images' device.

        Returns:
            `BlipOutput` with `loss = loss_ita + loss_itm + loss_lm`.
        """
        batch = images.shape[0]
        temp = self._clamped_temp()

        image_embeds = self.visual_encoder(images)
        image_feat = project_features(self.vision_proj, image_embeds[:, 0])
        text_hidden = self.text(input_ids, attention_mask, mode="text").hidden_states
        text_feat = project_features(self.text_proj, text_hidden[:, 0])

        itc = objective.itc_loss(
            image_feat,
            text_feat,
            targets.image_feat_m,
            targets.text_feat_m,
            targets.image_queue,
            targets.text_queue,
            temp,
            alpha,
        )

        neg_image, neg_text = objective.sample_hard_negatives(
            itc.sim_i2t.detach(), itc.sim_t2i.detach(), generator
        )
        own = torch.arange(batch, device=input_ids.device)
        encoder_ids = objective.replace_first_token(input_ids, self.enc_token_id)
        text_rows = torch.cat([own, own, neg_text])
        image_rows = torch.cat([own, neg_image, own])
        itm_ids = encoder_ids.index_select(0, text_rows)
        itm_mask = attention_mask.index_select(0, text_rows)
        if self.share_cross_attention_kv:
            itm_out = self.text(itm_ids, itm_mask, "multimodal", image_embeds, image_rows)
        else:
            itm_images = image_embeds.index_select(0, image_rows)
            itm_out = self.text(itm_ids, itm_mask, "multimodal", itm_images)
        itm = objective.itm_loss(self.itm_head(itm_out.hidden_states[:, 0]))

        decoder_ids = objective.replace_first_token(input_ids, self.dec_token_id)
        shared_kv = itm_out.cross_kv if self.share_cross_attention_kv else None
        decoder_hidden = self.text(
            decoder_ids, attention_mask, "decoder", image_embeds, cross_kv=shared_kv
        ).hidden_states
        logits = self.lm_head(decoder_hidden[:, :-1], self.text.embeddings.word_embeddings.weight)
        loss_lm = objective.lm_loss(
            logits, objective.lm_labels(decoder_ids, self.pad_token_id), self.label_smoothing
        )

        return BlipOutput(
            loss=itc.loss + itm.loss + loss_lm,
            loss_ita=itc.loss,
            loss_itm=itm.loss,
            loss_lm=loss_lm,
            itm_acc=itm.accuracy,
            itm_pos_prob=itm.pos_prob,
            itm_neg_prob=itm.neg_prob,
            temp=temp.detach().reshape(()),
            image_feat=image_feat.detach(),
            text_feat=text_feat.detach(),
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference initialisation (also after `to_empty` from the meta device).

        ViT: trunc-normal(0.02); MED and the LM head: normal(0.02) (BERT); LN 1/0; zero biases;
        vision_proj / text_proj / itm_head: PyTorch's default Linear init (the reference never
        re-initialises them); temp = temp_init.
        """
        self.visual_encoder.init_weights()
        self.text.init_weights()
        init_bert_modules(self.lm_head)
        nn.init.zeros_(self.lm_head.bias)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            head.reset_parameters()
        self.temp.fill_(self.temp_init)
