"""Set-up pieces of retrieval fine-tuning that pretraining does not have.

- `load_pretrained`: the starting weights from a checkpoint of any supported layout (this
  project's DCP checkpoints, converted or reference `.pth`, HF folders) at another resolution:
  the ViT position embeddings of the model and of the momentum encoder are interpolated to
  `model.image_size`; the momentum encoders and queues come from the checkpoint when it has
  them (as the reference loads them), otherwise they are copies of the model / fresh queues.
- `freeze_decoder`: the captioning decoder (causal self-attention, LM head) is never run by
  the retrieval losses; its parameters are left out of the optimizer.
- `EpochCosineLR`: the reference's per-epoch cosine schedule.
- `BestRetrieval`: which evaluation was best so far (a checkpoint `Stateful`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LRScheduler

from blip_recipes.config import Config, LaunchContext, register_validator
from blip_recipes.models.vit import interpolate_pos_embed
from blip_recipes.momentum import MomentumState
from blip_recipes.parallel.distributed import DistInfo

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
    from blip_recipes.interop.convert import read_weights

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
            logger.warning("%s: queues of shape %s do not fit model.queue_size; starting fresh "
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


def epoch_cosine_lr(epoch: int, peak_lr: float, min_lr: float, epochs: int) -> float:
    """The reference's `cosine_lr_schedule`: `min + (peak - min) * (1 + cos(pi * e / E)) / 2`."""
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


class EpochCosineLR(LRScheduler):
    """Per-epoch cosine decay: every step of epoch e uses `epoch_cosine_lr(e, ...)`.

    Stepped once per optimizer step like every scheduler of this project; the LR is a pure
    function of the step (`state_dict` is the step), so a resume sets the same LR.

    Args:
        optimizer: all its groups follow the schedule.
        peak_lr: LR of epoch 0 (`optimizer.lr`).
        min_lr: the floor the cosine approaches at `epochs` (0 in the reference).
        steps_per_epoch: optimizer steps per epoch.
        epochs: E, the length of the run in epochs (rounded up).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        min_lr: float,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        if steps_per_epoch <= 0 or epochs <= 0:
            raise ValueError(
                f"steps_per_epoch and epochs must be positive, got {steps_per_epoch}, {epochs}"
            )
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        """LR of 0-based optimizer step `step`."""
        epoch = step // self.steps_per_epoch
        return epoch_cosine_lr(epoch, self.peak_lr, self.min_lr, self.epochs)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["step"])
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


SELECTION_KEY = "r_mean"
"""The validation number the best weights are chosen by: the mean of R@1/5/10 over text and
image retrieval (the reference's `r_mean`)."""


class BestRetrieval(Stateful):
    """The best validation result so far and when it was reached (checkpointed, so a resumed
    run keeps comparing against it).

    Attributes:
        step: optimizer step of the best evaluation (-1: none yet).
        epoch: its epoch (0-based).
        metrics: its validation metrics.
    """

    def __init__(self) -> None:
        self.step, self.epoch, self.metrics = -1, -1, {}

    @property
    def score(self) -> float:
        return self.metrics.get(SELECTION_KEY, -math.inf)

    def offer(self, step: int, epoch: int, metrics: dict[str, float]) -> bool:
        """Record `metrics` if they beat the best so far (strictly); True when they do."""
        if metrics[SELECTION_KEY] <= self.score:
            return False
        self.step, self.epoch, self.metrics = step, epoch, dict(metrics)
        return True

    def state_dict(self) -> dict[str, Any]:
        # metrics as one JSON string: DCP loads the keys the fresh object asks for, and a fresh
        # object has no metric keys yet
        return {"step": self.step, "epoch": self.epoch, "metrics": json.dumps(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step, self.epoch = int(state_dict["step"]), int(state_dict["epoch"])
        self.metrics = {k: float(v) for k, v in json.loads(state_dict["metrics"]).items()}
