"""VQA fine-tuning: the model built and parallelized from a config, its loss on a batch, and the
optimizer step.

`build_vqa` follows the pretraining set-up order (meta device -> activation checkpointing ->
compile -> FSDP2 with the entry points registered -> materialize -> full weights built on rank 0
and broadcast): the seeded init, overwritten by `checkpoint.init_from` read by
`interop.vqa.read_vqa_weights` (a VQA checkpoint in any layout, or a pretraining model whose
text encoder and decoder start the question encoder and the answer decoder), the ViT position
embedding interpolated to `model.image_size` (480 in the reference).

`VqaStep` is the shared `OptimizerStep` (no momentum state) with the VQA loss as its
micro-batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import register_fsdp_forward_method

from blip_recipes.config import Config, LaunchContext, register_validator
from blip_recipes.models.vqa import VQA_ENTRY_POINTS, BlipVQA, build_vqa_model
from blip_recipes.objectives.vqa import weighted_answer_loss
from blip_recipes.parallel import DistInfo, materialize
from blip_recipes.parallel.activation_checkpointing import apply_activation_checkpointing
from blip_recipes.parallel.compile import apply_compile
from blip_recipes.parallel.fsdp import apply_fsdp
from blip_recipes.training.build import fsdp_mesh, model_kwargs
from blip_recipes.training.step import OptimizerStep

logger = logging.getLogger(__name__)


@register_validator
def _vqa_section(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """`[vqa]` checks (registered for `blip validate` and `blip run` through CHECK_MODULES)."""
    vqa = cfg.vqa
    if vqa.k_test < 1:
        yield f"'vqa.k_test' must be >= 1, got {vqa.k_test}"
    if vqa.eval_every_epochs < 0:
        yield f"'vqa.eval_every_epochs' must be >= 0, got {vqa.eval_every_epochs}"
    if vqa.num_beams < 1:
        yield f"'vqa.num_beams' must be >= 1, got {vqa.num_beams}"
    if not 0 <= vqa.min_length <= vqa.max_length:
        yield (
            f"'vqa.min_length' ({vqa.min_length}) must be between 0 and 'vqa.max_length' "
            f"({vqa.max_length})"
        )
    if vqa.min_lr < 0 or vqa.min_lr > cfg.optimizer.lr:
        yield f"'vqa.min_lr' ({vqa.min_lr}) must be between 0 and 'optimizer.lr' ({cfg.optimizer.lr})"
    if vqa.answer_list and not Path(vqa.answer_list).is_file():
        yield f"'vqa.answer_list' {vqa.answer_list} does not exist (or is not a file)"


class VqaBatch(NamedTuple):
    """One (micro-)batch on the device (see `blip_recipes.data.vqa.VqaBatchMaker`): images
    (B, 3, H, W) normalised, question ids/mask (B, Lq), answer ids/mask (R, La), answer weights
    (R,), the question of each answer (R,)."""

    images: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    answer_weights: torch.Tensor
    answer_question: torch.Tensor


def vqa_loss(model: BlipVQA, batch: VqaBatch) -> torch.Tensor:
    """The reference's training loss of one batch (`objectives.vqa.weighted_answer_loss`):
    image -> question states -> every answer decoded after its question -> weighted sum / B."""
    embeds = model.encode_image(batch.images)
    states = model.encode_question(embeds, batch.question_ids, batch.question_mask)
    logits = model.answer_logits(states, batch.question_mask, batch.answer_ids, batch.answer_mask,
                                 question_rows=batch.answer_question)  # fmt: skip
    return weighted_answer_loss(logits, batch.answer_ids, batch.answer_weights,
                                batch.images.shape[0], model.pad_token_id,
                                model.label_smoothing)  # fmt: skip


@dataclass
class VqaOutput:
    """What one VQA step reports: `loss` (0-d, the mean over its micro-batches)."""

    loss: torch.Tensor


class VqaStep(OptimizerStep):
    """The optimizer step of VQA fine-tuning: `OptimizerStep` (no momentum state) with
    `vqa_loss` as its micro-batch."""

    def micro_batch(self, batch: VqaBatch, targets: None) -> VqaOutput:  # type: ignore[override]
        """`vqa_loss` of one micro-batch."""
        return VqaOutput(vqa_loss(self.model, batch))


# ---------------------------------------------------------------------- building the model
def vqa_blocks(model: BlipVQA) -> list[nn.Module]:
    """ViT blocks, question-encoder layers, answer-decoder layers (forward order)."""
    return [*model.visual_encoder.blocks, *model.question_encoder.layers,
            *model.answer_decoder.layers]  # fmt: skip


def parallelize_vqa(
    model: BlipVQA, cfg: Config, mesh: Any, param_dtype: torch.dtype | None
) -> bool:
    """Activation checkpointing, compile and FSDP2 (one unit per block + the root, entry points
    registered) as `parallel` says; float8 is not applied to the VQA model. Returns whether the
    model is sharded."""
    par = cfg.parallel
    blocks = vqa_blocks(model)
    if par.activation_checkpointing == "full":
        apply_activation_checkpointing(blocks)
    elif par.activation_checkpointing == "vit_last_n" and par.ac_vit_layers > 0:
        apply_activation_checkpointing(list(model.visual_encoder.blocks)[-par.ac_vit_layers :])
    if par.compile:
        apply_compile(blocks)
    if mesh is None:
        return False
    apply_fsdp(model, blocks, mesh, param_dtype=param_dtype,
               reshard_after_forward=par.reshard_after_forward)  # fmt: skip
    for name in VQA_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    return True


def vqa_initial_weights(cfg: Config, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Full initial weights: the seeded init, overwritten by `checkpoint.init_from` (module
    docstring). Raises ValueError naming what does not fit."""
    from blip_recipes.interop.vqa import read_vqa_weights
    from blip_recipes.training.retrieval_setup import fit_state_dict

    torch.manual_seed(cfg.job.seed)
    model = build_vqa_model(cfg.model.name, **model_kwargs(cfg, tokenizer))
    model.init_weights()
    state = model.state_dict()
    if not cfg.checkpoint.init_from:
        return state
    source = read_vqa_weights(cfg.checkpoint.init_from)
    logger.info("VQA model initialised from %s (%d tensors)", cfg.checkpoint.init_from,
                len(source))  # fmt: skip
    return fit_state_dict(source, state, "checkpoint.init_from")


def build_vqa(
    cfg: Config, tokenizer: Any, dist_info: DistInfo, param_dtype: torch.dtype | None
) -> BlipVQA:
    """The VQA model, parallelized, on this rank's device, loaded (module docstring)."""
    with torch.device("meta"):
        model = build_vqa_model(cfg.model.name, **model_kwargs(cfg, tokenizer))
    parallelize_vqa(model, cfg, fsdp_mesh(cfg, dist_info, param_dtype), param_dtype)
    materialize(model, dist_info.device)
    weights = vqa_initial_weights(cfg, tokenizer) if dist_info.is_main else {}
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=dist_info.world_size > 1)  # fmt: skip
    set_model_state_dict(model, weights, options=options)
    return model


__all__ = [
    "VqaBatch",
    "VqaOutput",
    "VqaStep",
    "build_vqa",
    "parallelize_vqa",
    "vqa_blocks",
    "vqa_initial_weights",
    "vqa_loss",
]
