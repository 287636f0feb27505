"""BLIP for visual question answering: ViT, a question encoder, an answer decoder.

The question encoder is a MED with bidirectional self-attention that cross-attends the image
tokens; the answer decoder is a separate MED with causal self-attention that cross-attends the
question encoder's states (its padding masked), followed by the BERT LM head tied to the decoder's
word embeddings. Started from a pretrained BLIP model, the encoder takes the pretrained text
encoder (ITM side) and the decoder the pretrained captioning decoder; from then on the two are
trained apart (nothing is shared).

`BlipVQA` has no loss and no mode string; its entry points are what training and inference run
(and what FSDP2 registers):

- `encode_image(images)` -> image tokens;
- `encode_question(image_embeds, ids, mask)` -> question states;
- `answer_logits(states, mask, answer_ids, answer_mask, ...)` -> teacher-forced decoder logits
  of whole answers (training, and re-scoring candidate answers);
- `next_token_logits(prefixes, states, mask, cross_kv, rows_per_question)` -> logits of the next
  answer token (free generation, and the first-token scores of candidate ranking).

The loss over weighted answers and the ranking live in `blip_recipes.objectives.vqa`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blip_recipes.models import inputs
from blip_recipes.models.bert_blocks import CrossKV, LMHead
from blip_recipes.models.builders import _spec, _vision, med
from blip_recipes.models.med import MED
from blip_recipes.models.row_layout import DECODER_ROWS, ENCODER_ROWS, RowLayout
from blip_recipes.models.vit import VisionTransformer

VQA_ENTRY_POINTS = ("encode_image", "encode_question", "answer_logits", "next_token_logits")
"""Methods that run the model; each is registered as an FSDP2 forward of the root unit."""


class BlipVQA(nn.Module):
    """The reference's VQA model (module docstring), run through its entry points.

    Args:
        visual_encoder: ViT returning (B, 1 + N, D_vision).
        question_encoder: MED with bidirectional self-attention and cross-attention.
        answer_decoder: MED with causal self-attention and cross-attention (D_text wide source).
        lm_head: `LMHead` (its projection weight is the decoder's word embeddings).
        enc_token_id: put first in questions ([ENC]).
        dec_token_id: put first in answers ([DEC], the decoder's start token).
        pad_token_id: padding id ([PAD]).
        label_smoothing: of the answer LM loss and of the candidate re-scoring (0.1).
    """

    def __init__(
        self,
        visual_encoder: VisionTransformer,
        question_encoder: MED,
        answer_decoder: MED,
        lm_head: LMHead,
        enc_token_id: int = 30523,
        dec_token_id: int = 30522,
        pad_token_id: int = 0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.question_encoder = question_encoder
        self.answer_decoder = answer_decoder
        self.lm_head = lm_head
        self.enc_token_id = enc_token_id
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id
        self.label_smoothing = label_smoothing

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Not an entry point: the model has several (module docstring)."""
        raise TypeError(
            "BlipVQA has no single forward: call encode_image, encode_question, answer_logits "
            "or next_token_logits (the loss: blip_recipes.objectives.vqa.vqa_loss)"
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) normalised -> (B, 1 + N, D_vision) image tokens."""
        return self.visual_encoder(images)

    def encode_question(
        self, image_embeds: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Question states: the question encoder over `[ENC] question [SEP]`, attending its image.

        Args:
            image_embeds: (B, 1 + N, D_vision).
            question_ids: (B, Lq) `[CLS] ... [SEP] [PAD]...` ([CLS] becomes [ENC] here).
            question_mask: (B, Lq).

        Returns:
            (B, Lq, D_text).
        """
        ids = inputs.replace_first_token(question_ids, self.enc_token_id)
        return self.question_encoder(ids, question_mask, image_embeds, ENCODER_ROWS).hidden_states

    def answer_logits(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        question_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced next-token logits of whole answers given their questions.

        Args:
            question_states: (M, Lq, D) from `encode_question`.
            question_mask: (M, Lq), 1 = a question token (padding is not attended).
            answer_ids: (R, La) `[CLS] answer [SEP] [PAD]...` ([CLS] becomes [DEC] here).
            answer_mask: (R, La).
            question_rows: (R,) int64 question of each answer row (training: a variable number
                of answers per question). None: R = M * k rows, question-major, k each (the k
                candidates of each question attend its keys/values as one packed query).

        Returns:
            (R * (La - 1), V) fp32; row r * (La - 1) + t predicts token t + 1 of answer r (flat,
            so that the logits leave the FSDP forward without a view).
        """
        ids = inputs.replace_first_token(answer_ids, self.dec_token_id)
        if question_rows is None:
            per_question = ids.shape[0] // question_states.shape[0]
            layout = DECODER_ROWS if per_question == 1 else RowLayout.of((0, per_question))
        else:
            layout = DECODER_ROWS
        hidden = self.answer_decoder(ids, answer_mask, question_states, layout,
                                     image_rows=question_rows, causal_fast_path=True,
                                     cross_mask=question_mask).hidden_states  # fmt: skip
        word_embeddings = self.answer_decoder.embeddings.word_embeddings.weight
        return self.lm_head(hidden[:, :-1].flatten(0, 1), word_embeddings)

    def next_token_logits(
        self,
        prefixes: torch.Tensor,
        question_states: torch.Tensor | None,
        question_mask: torch.Tensor,
        cross_kv: list[CrossKV] | None = None,
        rows_per_question: int = 1,
    ) -> tuple[torch.Tensor, list[CrossKV]]:
        """Decoder logits of the token after each prefix (generation, step by step).

        Args:
            prefixes: (M * k, T) `[DEC] ...` without padding; question m owns rows m*k .. m*k+k-1.
            question_states: (M, Lq, D) at the first step (None once `cross_kv` is given).
            question_mask: (M, Lq), 1 = attended (every step).
            cross_kv: the per-layer keys/values returned by the previous step.
            rows_per_question: k (beams per question).

        Returns:
            (M * k, V) fp32 logits and the per-layer keys/values to pass back next step.
        """
        layout = DECODER_ROWS if rows_per_question == 1 else RowLayout.of((0, rows_per_question))
        out = self.answer_decoder(prefixes, torch.ones_like(prefixes), question_states, layout,
                                  cross_kv, causal_fast_path=True, return_cross_kv=True,
                                  cross_mask=question_mask)  # fmt: skip
        word_embeddings = self.answer_decoder.embeddings.word_embeddings.weight
        logits = self.lm_head(out.hidden_states[:, -1:], word_embeddings)[:, -1].float()
        assert out.cross_kv is not None
        return logits, out.cross_kv

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference initialisation: ViT trunc-normal(0.02), both MEDs and the LM head BERT's."""
        self.visual_encoder.init_weights()
        self.question_encoder.init_weights()
        self.answer_decoder.init_weights()
        self.lm_head.init_weights()


VQA_DEFAULTS = dict(drop_path_rate=0.1)
"""The reference's VQA model builds its ViT with stochastic depth 0.1 (base and large)."""


def build_vqa_model(name: str, **overrides: Any) -> BlipVQA:
    """The VQA model of pretraining preset `name` (`blip_pretrain_tiny/base/large` sizes).

    Overrides as `build_model`'s (`image_size`, widths, `drop_path_rate` (default 0.1), token
    ids, `label_smoothing`, ...); `embed_dim`, `queue_size` and `temp_init` are accepted and
    unused (VQA has no contrastive head).
    """
    spec = _spec(name, {**VQA_DEFAULTS, **overrides})

    def text(self_attention: str, source_width: int) -> MED:
        return med(
            vocab_size=spec["vocab_size"],
            width=spec["text_width"],
            depth=spec["text_depth"],
            heads=spec["text_heads"],
            ffn_dim=spec["text_ffn_dim"],
            vision_width=source_width,
            max_positions=spec["max_positions"],
            dropout=spec["text_dropout"],
            norm_eps=spec["text_norm_eps"],
            pad_token_id=spec["pad_token_id"],
            self_attention=self_attention,
        )

    model = BlipVQA(
        visual_encoder=_vision(spec),
        question_encoder=text("bidirectional", spec["vision_width"]),
        answer_decoder=text("causal", spec["text_width"]),
        lm_head=LMHead(spec["text_width"], spec["vocab_size"], spec["text_norm_eps"]),
        pad_token_id=spec["pad_token_id"],
        **{k: spec[k] for k in ("enc_token_id", "dec_token_id", "label_smoothing") if k in spec},
    )
    model.lm_head.init_weights()
    return model


def blip_vqa_tiny(**overrides: Any) -> BlipVQA:
    """Tiny CPU VQA model (the tiny pretraining preset's sizes)."""
    return build_vqa_model("blip_pretrain_tiny", **overrides)


def blip_vqa_base(**overrides: Any) -> BlipVQA:
    """ViT-B/16 + two BERT-base MEDs (the reference's `blip_vqa(vit='base')`)."""
    return build_vqa_model("blip_pretrain_base", **overrides)


__all__ = ["VQA_ENTRY_POINTS", "BlipVQA", "blip_vqa_base", "blip_vqa_tiny", "build_vqa_model"]
