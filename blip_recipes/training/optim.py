"""AdamW, the learning-rate schedules and the distillation-weight (alpha) schedule.

The learning rate is a pure function of the global step (:func:`lr_at_step`), so a resumed run
sets exactly the LR that the uninterrupted run would have, whatever the world size, and the
scheduler's checkpointed state is just the step counter. Alpha is one too (:func:`alpha_at_step`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from blip_recipes.config.sections import LRSchedulerConfig, OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group.

    The reference decays every parameter (one group). The common variant excludes biases, norm
    weights and every other parameter with at most one dimension (the temperature included),
    since decaying a scale or offset toward zero is not a useful prior. Dimensions are read from
    the (global) parameter shape, so the split is the same before and after FSDP sharding.
    Frozen parameters are left out.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norms_and_biases:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (build it after ``apply_fsdp``).

    Args:
        model: the (sharded) model; its parameters at this point are what gets optimised.
        cfg: the ``[optimizer]`` section (lr, betas, eps, weight decay, the decay switch, fused).
        device_type: ``"cuda"`` or ``"cpu"``; ``cfg.fused=None`` picks the fused kernel on both
            (on a CPU the foreach path allocates a temporary the size of the parameters and
            reads them four times per step: a ViT-B step's update takes 1.34 s of CPU time
            foreach and 0.19 s fused).
    """
    if cfg.name != "adamw":
        raise ValueError(f"unknown optimizer {cfg.name!r}; only 'adamw' is supported")
    if len(cfg.betas) != 2:
        raise ValueError(f"optimizer.betas needs two values, got {cfg.betas}")
    fused = device_type in ("cuda", "cpu") if cfg.fused is None else cfg.fused
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_norms_and_biases),
        lr=cfg.lr,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )


def step_schedule_lr(
    step: int,
    peak_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    decay_rate: float,
    min_lr: float,
    steps_per_epoch: int,
) -> float:
    """The reference BLIP schedule for 0-based global ``step`` (the LR that step's update uses).

    Epoch 0, step i: ``min(peak, warmup_lr + (peak - warmup_lr) * i / warmup_steps)`` (the
    reference's ``warmup_lr_schedule``, applied only within the first epoch).
    Epoch e >= 1: ``max(min_lr, peak * decay_rate**e)`` (its ``step_lr_schedule``). If warmup is
    longer than an epoch it is cut off at the epoch boundary, as in the reference.
    """
    epoch = step // steps_per_epoch
    if epoch == 0:
        if warmup_steps > 0:
            return min(peak_lr, warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps)
        return max(min_lr, peak_lr)
    return max(min_lr, peak_lr * decay_rate**epoch)


def cosine_schedule_lr(
    step: int,
    peak_lr: float,
    warmup_lr: float,
    warmup_steps: int,
    min_lr: float,
    total_steps: int,
) -> float:
    """Linear warmup from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps``, then a half cosine
    from ``peak_lr`` down to ``min_lr`` at ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at_step(
    step: int, cfg: LRSchedulerConfig, peak_lr: float, steps_per_epoch: int, total_steps: int
) -> float:
    """The learning rate of 0-based global ``step`` under ``cfg`` (pure: resume is exact)."""
    if cfg.name == "step":
        return step_schedule_lr(
            step, peak_lr, cfg.warmup_lr, cfg.warmup_steps, cfg.decay_rate, cfg.min_lr,
            steps_per_epoch,
        )  # fmt: skip
    if cfg.name == "cosine":
        return cosine_schedule_lr(
            step, peak_lr, cfg.warmup_lr, cfg.warmup_steps, cfg.min_lr, total_steps
        )
    raise ValueError(f"unknown lr_scheduler.name {cfg.name!r}; expected 'step' or 'cosine'")


def alpha_at_step(step: int, alpha: float, ramp_steps: float) -> float:
    """The distillation weight of 0-based global ``step``: linear from 0 to ``alpha`` over
    ``ramp_steps`` (``momentum.alpha_ramp_epochs`` x steps per epoch), then ``alpha``."""
    return alpha * (min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0)


class StepFunctionLR(LRScheduler):
    """Sets every param group's LR to :meth:`lr_at` of the global step (subclasses define it).

    Usual PyTorch protocol: construct after the optimizer (step 0's LR is set at once), call
    ``step()`` after each ``optimizer.step()``. ``last_epoch`` counts optimizer steps (PyTorch's
    name). The LR is written as an absolute value, not a factor of the base LR, so it is bit-exact
    with the formula. ``state_dict`` holds only the step: a resumed run with edited schedule
    settings follows the new settings from the resumed step on.
    """

    def lr_at(self, step: int) -> float:
        """LR of 0-based global ``step``."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self.lr_at(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["step"])
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


class BlipLRScheduler(StepFunctionLR):
    """The ``[lr_scheduler]`` schedule: :func:`lr_at_step` of the global step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: LRSchedulerConfig,
        peak_lr: float,
        steps_per_epoch: int,
        total_steps: int,
    ) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if cfg.name not in ("step", "cosine"):
            raise ValueError(f"unknown lr_scheduler.name {cfg.name!r}; expected 'step' or 'cosine'")
        self.cfg = cfg
        self.peak_lr = peak_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return lr_at_step(step, self.cfg, self.peak_lr, self.steps_per_epoch, self.total_steps)


def epoch_cosine_lr(epoch: int, peak_lr: float, min_lr: float, epochs: int) -> float:
    """The reference fine-tuning schedule: ``min + (peak - min) * (1 + cos(pi * e / E)) / 2``
    for 0-based epoch ``e`` of ``E``."""
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


class EpochCosineLR(StepFunctionLR):
    """Per-epoch cosine decay (the fine-tuning recipes): every step of epoch e uses
    :func:`epoch_cosine_lr`, so the LR is constant within an epoch.

    Args:
        optimizer: all its groups follow the schedule.
        peak_lr: LR of epoch 0 (``optimizer.lr``).
        min_lr: the floor the cosine approaches at ``epochs`` (0 in the reference).
        steps_per_epoch: optimizer steps per epoch.
        epochs: E, the length of the schedule in epochs.
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
        return epoch_cosine_lr(step // self.steps_per_epoch, self.peak_lr, self.min_lr, self.epochs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: LRSchedulerConfig,
    peak_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> BlipLRScheduler:
    """The ``[lr_scheduler]`` schedule over ``optimizer`` (a Stateful for the checkpoint).

    Args:
        optimizer: optimizer whose groups all follow the schedule.
        cfg: schedule name, warmup and decay settings.
        peak_lr: the optimizer's peak LR (``optimizer.lr``).
        steps_per_epoch: optimizer steps per epoch (epochs drive the step schedule).
        total_steps: length of the run in optimizer steps (cosine's horizon).
    """
    return BlipLRScheduler(optimizer, cfg, peak_lr, steps_per_epoch, total_steps)
