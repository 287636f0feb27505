"""Caption fine-tuning: the decoder's LM loss on `[DEC] prompt caption [SEP]`, and its optimizer step.

BLIP's captioning fine-tuning trains the image encoder and the text decoder only (no ITC, no
ITM, no momentum encoders) with a label-smoothed (0.1) LM loss whose targets exclude the prompt
("a picture of "): the first `prompt_length` positions (`[DEC]` and the prompt's tokens) and
padding are labelled -100. `BlipCaptioner` is the pretraining model with two more entry points,
`decoder_logits` and `decoder_loss` (the teacher-forced decoder over whole captions, no encoder
rows), so the
checkpoint layout stays that of `BlipPretrain` and every tool that reads it (evaluation,
captioning, conversion) reads fine-tuned checkpoints too.

`CaptionStep` is the optimizer step the fine-tuning recipe runs: the shared
`blip_recipes.training.step.OptimizerStep` without a momentum state, with `caption_loss` as its
micro-batch (and the same chunked LM loss option as pretraining, `parallel.lm_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import register_fsdp_forward_method

from blip_recipes.config import Config, LaunchContext, register_validator
from blip_recipes.models import build_model
from blip_recipes.models.blip import BlipPretrain
from blip_recipes.models.inputs import replace_first_token
from blip_recipes.models.row_layout import DECODER_ROWS
from blip_recipes.objectives import pretrain as objective
from blip_recipes.parallel import DistInfo, ParallelPlan, materialize, parallelize_blip
from blip_recipes.training.build import fsdp_mesh, initial_weights, model_kwargs
from blip_recipes.training.step import DeviceBatch, OptimizerStep, StepOptions

logger = logging.getLogger(__name__)

CAPTION_ENTRY_POINTS = ("decoder_logits", "decoder_loss")
_CAPTIONING_PARTS = ("visual_encoder.", "lm_head.", "text.embeddings.")
_UNUSED_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.")
"""Weights a captioning start point must provide (the MED layers are checked by shape)."""


@register_validator
def _caption_section(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """`[caption]` checks (registered when the caption fine-tuning recipe imports this module)."""
    cap = cfg.caption
    if cap.eval_every_epochs < 0:
        yield f"'caption.eval_every_epochs' must be >= 0, got {cap.eval_every_epochs}"
    if cap.num_beams < 1:
        yield f"'caption.num_beams' must be >= 1, got {cap.num_beams}"
    if not 0 <= cap.min_length <= cap.max_length:
        yield (
            f"'caption.min_length' ({cap.min_length}) must be between 0 and 'caption.max_length' "
            f"({cap.max_length})"
        )
    if cap.repetition_penalty <= 0:
        yield f"'caption.repetition_penalty' must be positive, got {cap.repetition_penalty}"
    if cap.min_lr < 0 or cap.min_lr > cfg.optimizer.lr:
        yield (
            f"'caption.min_lr' ({cap.min_lr}) must be between 0 and 'optimizer.lr' "
            f"({cfg.optimizer.lr})"
        )
    if cap.test_annotation and not Path(cap.test_annotation).is_file():
        yield f"'caption.test_annotation' {cap.test_annotation} does not exist (or is not a file)"


class BlipCaptioner(BlipPretrain):
    """`BlipPretrain` with the teacher-forced decoder pass as two extra entry points.

    Same parameters and state dict as `BlipPretrain`; use :func:`as_captioner` to turn a built
    model into one (before `parallelize_blip`, so FSDP2 wraps this class).
    """

    def _decoder_hidden(
        self, image_embeds: torch.Tensor, decoder_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B * (L - 1), D) decoder states; row b * (L - 1) + t predicts token t + 1 of b."""
        hidden = self.text(decoder_ids, attention_mask, image_embeds, DECODER_ROWS,
                           causal_fast_path=True).hidden_states  # fmt: skip
        return hidden[:, :-1].flatten(0, 1)

    def decoder_logits(
        self, image_embeds: torch.Tensor, decoder_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Next-token logits of every caption position (decoder rows only, causal).

        Args:
            image_embeds: (B, 1 + N, D_vision) from `encode_image`.
            decoder_ids: (B, L) `[DEC] prompt caption [SEP] [PAD]...` (padding trailing).
            attention_mask: (B, L).

        Returns:
            (B * (L - 1), V) fp32; row b * (L - 1) + t predicts token t + 1 of caption b.
        """
        hidden = self._decoder_hidden(image_embeds, decoder_ids, attention_mask)
        return self.lm_head(hidden, self.text.embeddings.word_embeddings.weight)

    def decoder_loss(
        self,
        image_embeds: torch.Tensor,
        decoder_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        lm_loss: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """The LM loss computed inside the entry point by `lm_loss` (`ChunkedLMLoss`), on the
        parameters as FSDP2 gathered them; no logits leave the model.

        Args:
            image_embeds, decoder_ids, attention_mask: as `decoder_logits`.
            targets: (B * (L - 1),) int64 next-token targets, -100 where ignored.
            lm_loss: called as `lm_loss(hidden, weight, bias, targets)` (its label smoothing
                is the objective's).

        Returns:
            0-d fp32 mean over the non-ignored targets.
        """
        hidden = self._decoder_hidden(image_embeds, decoder_ids, attention_mask)
        return lm_loss(self.lm_head.transform(hidden), self.text.embeddings.word_embeddings.weight,
                       self.lm_head.bias, targets)  # fmt: skip


def as_captioner(model: BlipPretrain) -> BlipCaptioner:
    """The same module object, now a `BlipCaptioner` (its class is switched in place, as FSDP2
    does for its own wrapper classes). Call before `parallelize_blip`."""
    if not isinstance(model, BlipCaptioner):
        if type(model) is not BlipPretrain:
            raise TypeError(f"expected a plain BlipPretrain, got {type(model).__name__}")
        model.__class__ = BlipCaptioner
    return model  # type: ignore[return-value]


def register_caption_entry_point(model: BlipCaptioner) -> None:
    """Make `decoder_logits` and `decoder_loss` FSDP2 forwards of the root unit (after
    `parallelize_blip`; a no-op for an unsharded model)."""
    for name in CAPTION_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)


def freeze_unused_parameters(model: BlipPretrain) -> list[str]:
    """Turn off gradients of what captioning never runs: the temperature, the ITC projections,
    the ITM head and the MED's bidirectional (encoder) self-attention. They stay in the model
    and its checkpoints, unchanged (and out of the optimizer, as the reference's captioning
    model does not have them). Returns their names."""
    frozen = []
    for name, param in model.named_parameters():
        if name == "temp" or name.startswith(_UNUSED_PREFIXES) or ".self_attn." in name:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def caption_labels(
    decoder_ids: torch.Tensor, prompt_length: int, pad_token_id: int
) -> torch.Tensor:
    """(B, L) decoder ids -> LM labels: padding and the first `prompt_length` columns (`[DEC]` and
    the prompt) set to -100, so only the caption and its `[SEP]` are predicted."""
    labels = objective.lm_labels(decoder_ids, pad_token_id)
    labels[:, :prompt_length] = objective.LM_IGNORE_INDEX
    return labels


def caption_loss(
    model: BlipCaptioner,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    lm_loss: objective.ChunkedLMLoss | None = None,
) -> torch.Tensor:
    """Label-smoothed LM loss of the captions given their images (BLIP_Decoder's forward).

    Args:
        model: a `BlipCaptioner` (plain or FSDP2-sharded with the entry points registered).
        images: (B, 3, H, W) normalised.
        input_ids: (B, L) `[CLS] prompt caption [SEP] [PAD]...` ([CLS] becomes [DEC] here).
        attention_mask: (B, L).
        prompt_length: `[DEC]` plus the prompt's tokens (4 for "a picture of ").
        lm_loss: a chunked LM loss computed inside the model (`decoder_loss`); None = fp32
            logits (`decoder_logits`) and `objective.lm_loss` (the same number in fp32).

    Returns:
        0-d fp32 mean over the caption tokens (smoothing `objective.LM_LABEL_SMOOTHING`).
    """
    image_embeds = model.encode_image(images).embeds
    decoder_ids = replace_first_token(input_ids, model.dec_token_id)
    labels = caption_labels(decoder_ids, prompt_length, model.pad_token_id)
    if lm_loss is not None:
        return model.decoder_loss(image_embeds, decoder_ids, attention_mask,
                                  labels[:, 1:].flatten(), lm_loss)  # fmt: skip
    logits = model.decoder_logits(image_embeds, decoder_ids, attention_mask)
    return objective.lm_loss(logits, labels)


@dataclass
class CaptionOutput:
    """What one caption step reports: `loss` (0-d, the mean over its micro-batches)."""

    loss: torch.Tensor


class CaptionStep(OptimizerStep):
    """The optimizer step of caption fine-tuning: `OptimizerStep` (no momentum state) with
    `caption_loss` as its micro-batch.

    Args:
        model: the `BlipCaptioner`, after `parallelize_blip`.
        optimizer, lr_scheduler, options: as `OptimizerStep` (`options.lm_loss`: the chunked LM
            loss, as in pretraining).
        prompt_length: `[DEC]` plus the prompt's tokens, excluded from the loss.
    """

    def __init__(
        self,
        model: BlipCaptioner,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        options: StepOptions | None = None,
        *,
        prompt_length: int,
    ) -> None:
        super().__init__(model, optimizer, lr_scheduler, options)
        self.prompt_length = prompt_length

    def micro_batch(  # type: ignore[override]
        self, batch: DeviceBatch, targets: None
    ) -> CaptionOutput:
        """`caption_loss` of one micro-batch."""
        return CaptionOutput(caption_loss(self.model, *batch, self.prompt_length,
                                          self.options.lm_loss))  # fmt: skip


# ---------------------------------------------------------------------- building the model
def captioning_initial_weights(cfg: Config, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Full initial weights of a caption fine-tuning run: the seeded init (and `model.text_init`
    / `model.vision_init`), overwritten by `checkpoint.init_from` read in any layout
    `blip_recipes.interop.readers.read_weights` knows, with the ViT position embedding
    interpolated (bicubic) when the checkpoint was trained at another resolution (224 -> 384).

    Raises:
        ValueError: the checkpoint has weights the model does not, weights of another shape
            (other than the position embedding), or lacks weights captioning needs (the ViT,
            the word embeddings, the LM head); other missing weights keep their initial values.
    """
    init_from = cfg.checkpoint.init_from
    state = initial_weights(replace(cfg, checkpoint=replace(cfg.checkpoint, init_from=None)),
                            tokenizer)  # fmt: skip
    if not init_from:
        return state
    from blip_recipes.interop.readers import read_weights
    from blip_recipes.training.retrieval_setup import fit_state_dict

    source = read_weights(init_from).model
    needed = [k for k in state if k.startswith(_CAPTIONING_PARTS) and k not in source]
    if needed:
        raise ValueError(
            f"checkpoint.init_from={init_from!r} lacks weights captioning needs: {needed[:5]}"
        )
    logger.info("model initialised from %s (%d tensors)", init_from, len(source))
    return fit_state_dict(source, state, "checkpoint.init_from")


def build_captioning(
    cfg: Config, tokenizer: Any, dist_info: DistInfo, param_dtype: torch.dtype | None
) -> tuple[BlipCaptioner, ParallelPlan]:
    """The captioning model, parallelized (no momentum encoders), on this rank's device, loaded,
    with the parts captioning does not run frozen (:func:`freeze_unused_parameters`).

    Same order as `blip_recipes.training.build.build_pretraining`: meta -> `parallelize_blip` -> the
    `decoder_logits` entry point registered with FSDP2 -> materialize -> full weights built on
    rank 0 (:func:`captioning_initial_weights`) and broadcast into every rank's shards.
    """
    with torch.device("meta"):
        model = as_captioner(build_model(cfg.model.name, **model_kwargs(cfg, tokenizer)))
    freeze_unused_parameters(model)
    plan = parallelize_blip(model, None, cfg.parallel, fsdp_mesh(cfg, dist_info, param_dtype),
                            param_dtype)  # fmt: skip
    register_caption_entry_point(model)
    materialize(model, dist_info.device)
    weights = captioning_initial_weights(cfg, tokenizer) if dist_info.is_main else {}
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=dist_info.world_size > 1)  # fmt: skip
    set_model_state_dict(model, weights, options=options)
    return model, plan


class PromptedTokenizer:
    """Tokenizes `prompt + text` (the training loader's tokenizer for caption fine-tuning: the
    loader cleans each caption with `pre_caption`, this prepends the prompt, as the reference's
    caption dataset does). Picklable for loader workers."""

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt

    def __call__(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer([self.prompt + t for t in texts], max_length=max_length)


__all__ = [
    "BlipCaptioner",
    "CaptionOutput",
    "CaptionStep",
    "PromptedTokenizer",
    "as_captioner",
    "build_captioning",
    "caption_labels",
    "caption_loss",
    "captioning_initial_weights",
    "freeze_unused_parameters",
    "register_caption_entry_point",
]
