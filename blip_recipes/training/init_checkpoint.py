"""A training checkpoint from weights read in any layout (:mod:`blip_recipes.interop.readers`):
the momentum state a run starts with (the source's momentum weights and queues, or copies of the
online weights and fresh queues), and the DCP `{"model", "momentum"}` folder that
`checkpoint.init_from` starts a run from.

    momentum = build_momentum_from_weights(model, weights)
    save_training_checkpoint(model, momentum, "outputs/from_ref/checkpoints/step-0")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip_recipes.config.recorded import MODEL_ARGS_FILE
from blip_recipes.interop.files import save_dcp
from blip_recipes.interop.readers import (
    MOMENTUM_CROSS_ATTN,
    QUEUE_KEYS,
    CheckpointWeights,
    unplaced_error,
)
from blip_recipes.training.momentum import MomentumState

logger = logging.getLogger(__name__)


def build_momentum_from_weights(
    model: nn.Module,
    weights: CheckpointWeights,
    seed: int = 0,
    queue_size: int | None = None,
    **kwargs: Any,
):
    """A `MomentumState` for `model`: the checkpoint's momentum weights and queues when present,
    otherwise a copy of the online weights and freshly seeded queues (as a new run starts).

    Args:
        model: the online model built by :func:`build_model_from_weights`.
        weights: what was read.
        seed: seed of freshly initialised queues.
        queue_size: Q of the run that will load it (`momentum.queue_size` in its config); default
            the checkpoint's queue length, else the preset's. Queues cannot be resized.
        kwargs: `MomentumState.build` options (decay, train_mode).
    """
    args = dict(getattr(model, "model_args", {}))
    name = args.pop("name", "blip_pretrain_base")
    stored = weights.queues.get("image_queue")
    if queue_size is not None:
        if stored is not None and stored.shape[1] != queue_size:
            raise ValueError(
                f"{weights.source} holds queues of length {stored.shape[1]}, not {queue_size}: "
                "keep the checkpoint's momentum.queue_size (queues are not resized)"
            )
        args["queue_size"] = queue_size
    state = MomentumState.build(name, seed=seed, **kwargs, **args)
    state.copy_from(model)
    if weights.momentum:
        result = state.encoders.load_state_dict(weights.momentum, strict=False)
        if result.unexpected_keys:
            raise unplaced_error(weights.source, "momentum weights", list(result.unexpected_keys))
        if result.missing_keys:
            logger.warning("%s: momentum tensors copied from the online model: %s",
                           weights.source, ", ".join(result.missing_keys[:6]))  # fmt: skip
    with torch.no_grad():
        for key in QUEUE_KEYS:
            if key in weights.queues:
                target = getattr(state, key)
                value = weights.queues[key].reshape(target.shape).to(target.dtype)
                target.copy_(value)
    return state


def save_training_checkpoint(
    model: nn.Module,
    momentum: Any,
    path: str | Path,
    tokenizer_section: dict | None = None,
    momentum_cross_attn: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `{"model", "momentum"}` as a DCP checkpoint folder the pretraining recipe can load.

    `checkpoint.init_from=<path>` initialises a run from its model weights. A `model_args.json`
    beside it records the builder arguments (and tokenizer section, its path made absolute)
    for later conversions and evaluation. A reference file's momentum cross-attention (no
    training use) goes under its own top-level key, `momentum_cross_attn`, when given.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"model": get_model_state_dict(model)}
    if momentum is not None:
        state["momentum"] = momentum.state_dict()
        if momentum_cross_attn:
            state[MOMENTUM_CROSS_ATTN] = dict(momentum_cross_attn)
    out = save_dcp(state, path)
    tok = dict(tokenizer_section) if tokenizer_section else None
    if tok and tok.get("path"):  # absolute: read later from any working folder
        tok["path"] = str(Path(tok["path"]).absolute())
    recorded = {"model": getattr(model, "model_args", None), "tokenizer": tok}
    (out / MODEL_ARGS_FILE).write_text(json.dumps(recorded, indent=2, default=str))
    return out


__all__ = ["build_momentum_from_weights", "save_training_checkpoint"]
