"""The baseline: one BLIP pretraining step composed from `transformers` modules, written the way the
reference code (salesforce/BLIP ``models/blip_pretrain.py`` + ``train.py``) writes it.

What it is, on purpose (this is the thing the recipe is measured against):

- ``BlipVisionModel`` (LayerNorm eps 1e-6; no drop-path: transformers has none), a
  ``BlipTextModel`` encoder used for text (no cross-attention) and multimodal (ITM) passes, and a
  ``BlipTextLMHeadModel`` decoder sharing embeddings, cross-attention and FFN with the encoder as
  the reference's ``tie_encoder_decoder_weights`` does (only the self-attention is its own); the LM
  projection is tied to the word embeddings.
- The reference losses: ITC with momentum distillation over [batch | queue], ITM with hard
  negatives drawn by a per-sample Python loop of ``torch.multinomial(...).item()`` (2B host syncs),
  LM with label smoothing 0.1 (transformers' own loss).
- Momentum copies by ``deepcopy`` (ViT, vision_proj, the whole text encoder including its
  cross-attention, text_proj) updated by the reference's per-parameter EMA loop; queues as buffers,
  enqueued at ``int(queue_ptr)`` (a host sync); the reference's CPU-built target/label tensors
  copied to the device each step.
- Eager, bf16 autocast (the reference trains in fp32/TF32; autocast is the obvious modern port),
  ``torch.optim.AdamW`` with its default implementation (not fused), weight decay on everything,
  and the reference loop's ``.item()`` of the three losses for its metric logger.

The shapes come from our own preset (:func:`BaselineDims.from_model`), so the baseline runs exactly
the same sizes as ``build_model(name, ...)``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BaselineDims:
    """Sizes of the composed model (read from one of our presets)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_depth: int
    text_heads: int
    text_ffn: int
    vocab_size: int
    max_positions: int
    embed_dim: int
    queue_size: int
    pad_token_id: int = 0
    enc_token_id: int = 30523
    dec_token_id: int = 30522
    sep_token_id: int = 102
    text_dropout: float = 0.1
    momentum: float = 0.995
    label_smoothing: float = 0.1

    @classmethod
    def from_model(
        cls, model: nn.Module, queue_size: int, image_size: int, **token_ids: int
    ) -> BaselineDims:
        """Read the sizes of a ``BlipPretrain`` (a meta-device one is fine)."""
        vit, text = model.visual_encoder, model.text
        return cls(
            image_size=image_size,
            patch_size=vit.patch_embed.proj.kernel_size[0],
            vision_width=vit.width,
            vision_depth=len(vit.blocks),
            vision_heads=vit.blocks[0].attn.heads,
            vision_mlp=vit.blocks[0].mlp.fc1.out_features,
            text_width=text.width,
            text_depth=len(text.layers),
            text_heads=text.layers[0].self_attn.heads,
            text_ffn=text.layers[0].ffn.fc1.out_features,
            vocab_size=text.embeddings.word_embeddings.num_embeddings,
            max_positions=text.embeddings.position_embeddings.num_embeddings,
            embed_dim=model.vision_proj.out_features,
            queue_size=queue_size,
            **token_ids,
        )


class HFComposedBlip(nn.Module):
    """BLIP pretraining (online + momentum + queues) from transformers modules; see the module doc."""

    def __init__(self, dims: BaselineDims) -> None:
        super().__init__()
        from transformers import (
            BlipTextConfig,
            BlipTextLMHeadModel,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        self.dims = dims
        vision_cfg = BlipVisionConfig(
            hidden_size=dims.vision_width,
            intermediate_size=dims.vision_mlp,
            num_hidden_layers=dims.vision_depth,
            num_attention_heads=dims.vision_heads,
            image_size=dims.image_size,
            patch_size=dims.patch_size,
            layer_norm_eps=1e-6,
            attention_dropout=0.0,
            initializer_range=0.02,
        )
        text_cfg = BlipTextConfig(
            vocab_size=dims.vocab_size,
            hidden_size=dims.text_width,
            encoder_hidden_size=dims.vision_width,
            intermediate_size=dims.text_ffn,
            num_hidden_layers=dims.text_depth,
            num_attention_heads=dims.text_heads,
            max_position_embeddings=dims.max_positions,
            hidden_dropout_prob=dims.text_dropout,
            attention_probs_dropout_prob=dims.text_dropout,
            layer_norm_eps=1e-12,
            pad_token_id=dims.pad_token_id,
            bos_token_id=dims.dec_token_id,
            sep_token_id=dims.sep_token_id,
            label_smoothing=dims.label_smoothing,
            is_decoder=True,  # builds the cross-attention in every layer
        )
        self.visual_encoder = BlipVisionModel(vision_cfg)
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_cfg)
        self._tie_encoder_decoder()
        self.vision_proj = nn.Linear(dims.vision_width, dims.embed_dim)
        self.text_proj = nn.Linear(dims.text_width, dims.embed_dim)
        self.itm_head = nn.Linear(dims.text_width, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        self.model_pairs = [
            [self.visual_encoder, self.visual_encoder_m],
            [self.vision_proj, self.vision_proj_m],
            [self.text_encoder, self.text_encoder_m],
            [self.text_proj, self.text_proj_m],
        ]
        for _, model_m in self.model_pairs:
            for param in model_m.parameters():
                param.requires_grad = False

        self.register_buffer("image_queue", torch.randn(dims.embed_dim, dims.queue_size))
        self.register_buffer("text_queue", torch.randn(dims.embed_dim, dims.queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.image_queue = F.normalize(self.image_queue, dim=0)
        self.text_queue = F.normalize(self.text_queue, dim=0)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1))

    def _tie_encoder_decoder(self) -> None:
        """Share everything but the self-attention (the reference's skip key '/attention')."""
        encoder, decoder = self.text_encoder, self.text_decoder.bert
        decoder.embeddings = encoder.embeddings
        for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
            dec_layer.crossattention = enc_layer.crossattention
            dec_layer.intermediate = enc_layer.intermediate
            dec_layer.output = enc_layer.output
        self.text_decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for model_pair in self.model_pairs:
            for param, param_m in zip(model_pair[0].parameters(), model_pair[1].parameters()):
                param_m.data = param_m.data * self.dims.momentum + param.data * (
                    1.0 - self.dims.momentum
                )

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        image_feats, text_feats = image_feat, text_feat  # concat_all_gather: one process here
        batch_size = image_feats.shape[0]
        ptr = int(self.queue_ptr)
        assert self.dims.queue_size % batch_size == 0
        self.image_queue[:, ptr : ptr + batch_size] = image_feats.T
        self.text_queue[:, ptr : ptr + batch_size] = text_feats.T
        ptr = (ptr + batch_size) % self.dims.queue_size
        self.queue_ptr[0] = ptr

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference ``BLIP_Pretrain.forward``: returns (loss_ita, loss_itm, loss_lm).

        Args:
            image: (B, 3, H, W) normalised images.
            input_ids: (B, L) with [CLS] first; attention_mask: (B, L).
            alpha: distillation weight.
        """
        d = self.dims
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        with record_function("bench/vit"):
            image_embeds = self.visual_encoder(pixel_values=image).last_hidden_state
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long).to(image.device)
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

        with record_function("bench/text"):
            text_output = self.text_encoder(input_ids, attention_mask=attention_mask)
            text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

        with torch.no_grad(), record_function("bench/momentum"):
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(pixel_values=image).last_hidden_state
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_output_m = self.text_encoder_m(input_ids, attention_mask=attention_mask)
            text_feat_m = F.normalize(
                self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1
            )
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)

        with record_function("bench/itc"):
            with torch.no_grad():
                sim_i2t_m = image_feat_m @ text_feat_all / self.temp
                sim_t2i_m = text_feat_m @ image_feat_all / self.temp
                sim_targets = torch.zeros(sim_i2t_m.size()).to(image.device)
                sim_targets.fill_diagonal_(1)
                sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
            sim_i2t = image_feat @ text_feat_all / self.temp
            sim_t2i = text_feat @ image_feat_all / self.temp
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
            loss_ita = (loss_i2t + loss_t2i) / 2

        with record_function("bench/queue"):
            self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        with record_function("bench/itm"):
            encoder_input_ids = input_ids.clone()
            encoder_input_ids[:, 0] = d.enc_token_id
            output_pos = self.text_encoder(
                encoder_input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
            )
            with torch.no_grad():
                bs = image.size(0)
                weights_t2i = F.softmax(sim_t2i[:, :bs].float(), dim=1) + 1e-4
                weights_t2i.fill_diagonal_(0)
                weights_i2t = F.softmax(sim_i2t[:, :bs].float(), dim=1) + 1e-4
                weights_i2t.fill_diagonal_(0)
            image_embeds_neg = []
            for b in range(bs):
                neg_idx = torch.multinomial(weights_t2i[b], 1).item()
                image_embeds_neg.append(image_embeds[neg_idx])
            image_embeds_neg = torch.stack(image_embeds_neg, dim=0)
            text_ids_neg, text_atts_neg = [], []
            for b in range(bs):
                neg_idx = torch.multinomial(weights_i2t[b], 1).item()
                text_ids_neg.append(encoder_input_ids[neg_idx])
                text_atts_neg.append(attention_mask[neg_idx])
            text_ids_neg = torch.stack(text_ids_neg, dim=0)
            text_atts_neg = torch.stack(text_atts_neg, dim=0)
            text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
            text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
            image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
            image_atts_all = torch.cat([image_atts, image_atts], dim=0)
            output_neg = self.text_encoder(
                text_ids_all,
                attention_mask=text_atts_all,
                encoder_hidden_states=image_embeds_all,
                encoder_attention_mask=image_atts_all,
            )
            vl_embeddings = torch.cat(
                [output_pos.last_hidden_state[:, 0, :], output_neg.last_hidden_state[:, 0, :]],
                dim=0,
            )
            vl_output = self.itm_head(vl_embeddings)
            itm_labels = torch.cat(
                [torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)], dim=0
            ).to(image.device)
            loss_itm = F.cross_entropy(vl_output, itm_labels)

        with record_function("bench/lm"):
            decoder_input_ids = input_ids.clone()
            decoder_input_ids[:, 0] = d.dec_token_id
            decoder_targets = decoder_input_ids.masked_fill(
                decoder_input_ids == d.pad_token_id, -100
            )
            decoder_output = self.text_decoder(
                decoder_input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                labels=decoder_targets,
            )
            loss_lm = decoder_output.loss
        return loss_ita, loss_itm, loss_lm


class HFBaselineStep:
    """The reference training loop's body around :class:`HFComposedBlip`.

    Args:
        model: the composed model, already on its device.
        lr: AdamW learning rate; weight decay 0.05 on every parameter (reference).
        bf16: run forward under bf16 autocast.
    """

    def __init__(self, model: HFComposedBlip, lr: float = 3e-4, bf16: bool = True) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params=params, lr=lr, weight_decay=0.05)
        self.last_losses: tuple[float, float, float] | None = None

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, batch: dict[str, torch.Tensor], alpha: float = 0.4) -> dict[str, float]:
        """One step on ``{"images": uint8 (B,3,H,W), "input_ids", "attention_mask"}``.

        Returns the three losses as Python floats (the reference's ``.item()`` per loss).
        """
        model = self.model
        images = batch["images"].to(self.device, non_blocking=True)
        image = (images.float() / 255.0 - model.image_mean) / model.image_std
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        model.train()
        with self._autocast():
            loss_ita, loss_itm, loss_lm = model(image, input_ids, attention_mask, alpha=alpha)
            loss = loss_ita + loss_itm + loss_lm
        with record_function("bench/optimizer"):
            self.optimizer.zero_grad()
        loss.backward()
        with record_function("bench/optimizer"):
            self.optimizer.step()
        losses = {
            "loss_ita": loss_ita.item(),
            "loss_itm": loss_itm.item(),
            "loss_lm": loss_lm.item(),
        }
        self.last_losses = (losses["loss_ita"], losses["loss_itm"], losses["loss_lm"])
        return losses


def build_hf_baseline(
    model_name: str,
    *,
    image_size: int,
    queue_size: int,
    device: torch.device,
    bf16: bool,
    lr: float = 3e-4,
    seed: int = 0,
    **model_kwargs,
) -> HFBaselineStep:
    """The composed baseline with the sizes of our preset ``model_name`` (+ ``model_kwargs``).

    Args:
        model_name: ``blip_pretrain_tiny|base|large``.
        image_size: training resolution.
        queue_size: Q (a multiple of the batch).
        device: where to run.
        bf16: bf16 autocast (the benchmark uses it on CUDA; fp32 on CPU).
        lr: learning rate.
        seed: weight and queue initialisation seed.
        model_kwargs: ``build_model`` overrides (vocab_size, embed_dim, pad/enc/dec token ids).
    """
    from blip_recipes.models import build_model

    token_ids = {
        key: model_kwargs[key]
        for key in ("pad_token_id", "enc_token_id", "dec_token_id")
        if key in model_kwargs
    }
    with torch.device("meta"):
        ours = build_model(model_name, image_size=image_size, queue_size=queue_size, **model_kwargs)
    dims = BaselineDims.from_model(ours, queue_size=queue_size, image_size=image_size, **token_ids)
    torch.manual_seed(seed)
    model = HFComposedBlip(dims).to(device)
    return HFBaselineStep(model, lr=lr, bf16=bf16)
