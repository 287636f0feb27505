"""Set-up pieces of retrieval fine-tuning that pretraining does not have.

- `load_pretrained`: the starting weights from a checkpoint of any supported layout (this
  project's DCP checkpoints, converted or reference `.pth`, HF folders) at another resolution:
  the ViT position embeddings of the model and of the momentum encoder are interpolated to
  `model.image_size`; the momentum encoders and queues come from the checkpoint when it has
  them (as the reference loads them), otherwise they are copies of the model / fresh queues.
- `freeze_decoder`: the captioning decoder (causal self-attention, LM head) is never run by
  the retrieval losses; its parameters are left out of the optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from blip_recipes.config import Config, LaunchContext, register_validator
from blip_recipes.models.vit import interpolate_pos_embed
from blip_recipes.parallel.distributed import DistInfo
from blip_recipes.training.momentum import MomentumState

logger = logging.getLogger(__name__)

POS_EMBED = "visual_encoder.pos_embed"
DECODER_ONLY = ("causal_self_attn.", "lm_head.")
"""Name parts of the parameters only the captioning decoder uses."""


@register_validator
def _retrieval_section(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """`[retrieval]` checks (registered when the fine-tuning recipe imports this module)."""
    section = cfg.retrieval
    if section.eval_every_epochs < 1:
        yield f"'retrieval.eval_every_epochs' must be >= 1, got {section.eval_every_epochs}"
    if section.test_annotation and not Path(section.test_annotation).is_file():
        yield f"'retrieval.test_annotation' {section.test_annotation} does not exist (or is not a file)"
    if section.test_annotation and not cfg.eval.annotation:
        yield (
            "'retrieval.test_annotation' is set but 'eval.annotation' (the validation split that "
            "chooses the weights to test) is not"
        )


def freeze_decoder(model: nn.Module) -> list[str]:
    """Set `requires_grad=False` on the decoder-only parameters; returns their names."""
    frozen = []
    for name, param in model.named_parameters():
        if any(part in name for part in DECODER_ONLY):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def fit_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """`target` (a full state dict) with every tensor of `source` copied in.

    The ViT position embedding is interpolated to the target's patch grid; a 0-d `temp`
    (reference layout) is reshaped. Keys of `source` the target lacks, and other shape
    mismatches, are errors naming them; keys it lacks keep the target's values (logged).
    """
    out = dict(target)
    unexpected, mismatched = [], []
    for key, value in source.items():
        if key not in target:
            unexpected.append(key)
            continue
        want = target[key].shape
        if key == POS_EMBED and value.shape != want:
            value = interpolate_pos_embed(value, want[1] - 1)
            logger.info("%s: %s interpolated to %s", what, key, tuple(want))
        if key == "temp" and value.dim() == 0:
            value = value.reshape(want)
        if value.shape != want:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
            continue
        out[key] = value.to(target[key].dtype)
    if unexpected or mismatched:
        raise ValueError(
            f"{what}: the checkpoint does not fit the model (no place for: {unexpected[:5]}; "
            f"shape mismatch: {mismatched[:5]}); check model.name and the tokenizer"
        )
    missing = [k for k in target if k not in source]
    if missing:
        logger.warning("%s: %d tensor(s) not in the checkpoint keep their initialisation: %s",
                       what, len(missing), ", ".join(missing[:6]))  # fmt: skip
    return out


def _load_full(module: nn.Module, full: dict[str, torch.Tensor], dist_info: DistInfo) -> None:
    """Load rank 0's full state dict into `module`'s (sharded) parameters on every rank."""
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=dist_info.world_size > 1)  # fmt: skip
    set_model_state_dict(module, full if dist_info.is_main else {}, options=options)


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (CPU), empty elsewhere (collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def load_pretrained(
    source: str, model: nn.Module, momentum: MomentumState, dist_info: DistInfo
) -> dict[str, bool]:
    """Load the starting weights from `source` (collective; rank 0 reads the file).

    Args:
        source: a checkpoint path `blip_recipes.interop.read_weights` understands.
        model: the online model, parallelized and materialised.
        momentum: its momentum state (encoders copied from the model beforehand).
        dist_info: ranks and device.

    Returns:
        `{"momentum": bool, "queues": bool}`: what besides the model the checkpoint provided.
    """
    from blip_recipes.interop.readers import read_weights

    model_full, momentum_full = _full_state(model), _full_state(momentum.encoders)
    found = {"momentum": False, "queues": False}
    queues: dict[str, torch.Tensor] = {}
    if dist_info.is_main:
        weights = read_weights(source)
        model_full = fit_state_dict(weights.model, model_full, f"{source} (model)")
        if weights.momentum:
            momentum_full = fit_state_dict(weights.momentum, momentum_full,
                                           f"{source} (momentum encoders)")  # fmt: skip
            found["momentum"] = True
        stored = weights.queues.get("image_queue")
        if stored is not None and tuple(stored.shape) == tuple(momentum.image_queue.shape):
            queues = {k: weights.queues[k] for k in ("image_queue", "text_queue", "queue_ptr")}
            found["queues"] = True
        elif stored is not None:
            logger.warning("%s: queues of shape %s do not fit momentum.queue_size; starting fresh "
                           "queues", source, tuple(stored.shape))  # fmt: skip
        del weights
    if dist_info.world_size > 1:
        shared = [found]
        dist.broadcast_object_list(shared, src=0)
        found = shared[0]
    _load_full(model, model_full, dist_info)
    if found["momentum"]:
        _load_full(momentum.encoders, momentum_full, dist_info)
    else:
        momentum.copy_from(model)
    if found["queues"]:
        for key in ("image_queue", "text_queue", "queue_ptr"):
            target = getattr(momentum, key)
            if dist_info.is_main:
                target.copy_(queues[key].reshape(target.shape).to(target.dtype))
            if dist_info.world_size > 1:
                dist.broadcast(target, src=0, group=dist_info.dp_group)
    return found


SELECTION_KEY = "r_mean"
"""The validation number the best weights are chosen by: the mean of R@1/5/10 over text and
image retrieval (the reference's `r_mean`)."""
