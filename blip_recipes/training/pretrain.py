"""One BLIP pretraining step, composed from the model's entry points and the pure objective.

`pretrain_losses` is the model part (ITC against the queues, hard negatives, one multimodal pass
for ITM and LM). `PretrainStep` is the whole optimizer step the recipe and the benchmarks run:

    clamp temp -> EMA update -> for each micro-batch: momentum targets -> losses -> backward
    (gradients synchronised on the last one only) -> enqueue -> gradient norm -> one agreed
    "ok" flag -> optimizer step (skipped when not ok)

The "ok" decision is taken once for all ranks: `finite(loss) & finite(grad_norm)` reduced with
MIN over the data-parallel group, on the device. The same flag drives the optimizer skip, the
enqueue and the caller's non-finite counter, so no rank applies an update another rank skipped
and the queues never diverge. Nothing in the step waits for the host.

Gradient accumulation (`grad_accum_steps` micro-batches per optimizer step): the EMA update and
the optimizer step happen once per optimizer step; every micro-batch runs ITC against the queue
as it stands and then enqueues its momentum features (when its loss is finite on every rank), so
the queue invariant stays `queue_size % (batch x world) == 0`; each micro-batch's loss is scaled
by 1 / grad_accum_steps, and FSDP2 synchronises gradients only after the last micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from blip_recipes.config import Config
from blip_recipes.data._seeding import derive_seed
from blip_recipes.models.blip import BlipOutput, BlipPretrain, MomentumTargets
from blip_recipes.objectives import pretrain as objective
from blip_recipes.parallel.distributed import DistInfo
from blip_recipes.parallel.float8 import float8_precompute_scales
from blip_recipes.training.momentum import MomentumState


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

    Returns:
        `BlipOutput` with `loss = loss_ita + loss_itm + loss_lm`.
    """
    image = model.encode_image(images)
    text = model.encode_text(input_ids, attention_mask)
    temp = model.temperature()
    itc = objective.itc_loss(
        image.feat,
        text.feat,
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
    multimodal = model.multimodal(image.embeds, input_ids, attention_mask, neg_image, neg_text,
                                  negative_kv, lm_loss)  # fmt: skip
    itm = objective.itm_loss(multimodal.itm_logits)
    if multimodal.loss_lm is not None:
        loss_lm = multimodal.loss_lm
    else:
        labels = objective.lm_labels(input_ids, model.pad_token_id)  # column 0 is never a target
        loss_lm = objective.lm_loss(multimodal.lm_logits, labels, model.label_smoothing)
    return BlipOutput(
        loss=itc.loss + itm.loss + loss_lm,
        loss_ita=itc.loss,
        loss_itm=itm.loss,
        loss_lm=loss_lm,
        itm_acc=itm.accuracy,
        itm_pos_prob=itm.pos_prob,
        itm_neg_prob=itm.neg_prob,
        temp=temp.detach().float().reshape(()),
        image_feat=image.feat.detach(),
        text_feat=text.feat.detach(),
    )


@dataclass
class StepResult:
    """What one optimizer step produced; all tensors stay on the device (no host sync).

    Attributes:
        output: the losses and diagnostics of the step.
        ok: 0-d bool, True on every rank when the update was applied (finite loss on every rank
            and finite global gradient norm).
        grad_norm: 0-d global gradient norm before clipping (non-finite when `ok` is False).
    """

    output: BlipOutput
    ok: torch.Tensor
    grad_norm: torch.Tensor


def global_grad_norm(parameters: list[nn.Parameter], clip: float | None = None) -> torch.Tensor:
    """L2 norm of all gradients, clipping them to `clip` when given.

    One foreach norm over the local gradients and, under FSDP2, the one all-reduce of partial
    squared sums a sharded norm needs. Returns a 0-d fp32 tensor, equal on every rank.
    """
    if not any(p.grad is not None for p in parameters):
        raise ValueError("no gradients: call backward before measuring the gradient norm")
    if clip is None:
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    else:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()  # DTensor partial sums -> one all-reduce
    return norm.float()


def agree_ok(
    loss: torch.Tensor, grad_norm: torch.Tensor | None, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """`finite(loss) & finite(grad_norm)`, reduced with MIN over `group` on the device.

    With `group=None` (one process, or no process group) the local flag is returned;
    `grad_norm=None` checks the loss only.
    """
    ok = torch.isfinite(loss.detach())
    if grad_norm is not None:
        ok = ok & torch.isfinite(grad_norm)
    ok = ok.to(torch.int32).reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return ok.reshape(()).bool()


def apply_update(optimizer: torch.optim.Optimizer, ok: torch.Tensor, fused: bool) -> None:
    """Apply the optimizer update when `ok` (0-d bool, agreed by all ranks). Fused AdamW skips
    on the device through its `found_inf` (as GradScaler uses it); other optimizers need one
    host read of the flag."""
    if fused:
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):
        optimizer.step()


def step_options(
    cfg: Config, model: nn.Module, dist_info: DistInfo, compute_dtype: torch.dtype
) -> dict[str, Any]:
    """The settings every training step of a run of `cfg` shares on this rank: agreement group,
    clipping, precision (FSDP2 models get theirs from FSDP2's policy, plain ones autocast),
    accumulation and the float8 scale precompute after each update."""
    return {
        "group": dist_info.dp_group if dist_info.world_size > 1 else None,
        "grad_clip": cfg.training.grad_clip,
        "autocast_dtype": None
        if isinstance(model, FSDPModule) or compute_dtype == torch.float32
        else compute_dtype,
        "grad_accum_steps": cfg.training.grad_accum_steps,
        "after_optimizer_step": (lambda: float8_precompute_scales(model))
        if cfg.parallel.float8
        else None,
    }


class DeviceBatch(NamedTuple):
    """One (micro-)batch on the device: images (B, 3, H, W) normalised, input_ids and
    attention_mask (B, L)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _mean_output(outputs: list[BlipOutput]) -> BlipOutput:
    """Micro-batch outputs -> one: scalar fields averaged, features of the last micro-batch."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    scalars = {
        f.name: torch.stack([getattr(o, f.name).detach() for o in outputs]).mean()
        for f in fields(BlipOutput)
        if getattr(last, f.name).dim() == 0 and f.name != "temp"
    }
    return replace(last, **scalars)


class PretrainStep:
    """The optimizer step of BLIP pretraining, shared by the recipe and the benchmarks.

    Args:
        model: the online model, after `parallelize_blip`.
        momentum: the momentum state (EMA encoders and queues), after `parallelize_blip`.
        optimizer: AdamW over the model's parameters.
        lr_scheduler: stepped once per call (also on skipped steps: the schedule is a function
            of the step count).
        seed: run seed; micro-batch i of step s on rank r draws its hard negatives from
            `derive_seed(seed, r, s * grad_accum_steps + i)`.
        rank: this rank's index in the data-parallel group.
        group: data-parallel process group for the agreed flag; None with one process.
        grad_clip: clip the global gradient norm to this value; None = no clipping (reference).
        autocast_dtype: autocast to this dtype (unsharded bf16 runs); None = no autocast
            (fp32, or FSDP2 whose mixed-precision policy casts the parameters).
        grad_accum_steps: micro-batches per optimizer step.
        after_optimizer_step: called after each optimizer step (float8 scale precompute).
        negative_kv: the hard negatives' keys/values, `select` or `recompute`
            (`parallel.negative_kv`).
        lm_loss: the chunked LM loss (`parallel.lm_loss=chunked`), or None for fp32 logits.
    """

    def __init__(
        self,
        model: BlipPretrain,
        momentum: MomentumState,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        seed: int,
        rank: int = 0,
        group: dist.ProcessGroup | None = None,
        grad_clip: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        grad_accum_steps: int = 1,
        after_optimizer_step: Callable[[], object] | None = None,
        negative_kv: str = "select",
        lm_loss: objective.ChunkedLMLoss | None = None,
    ) -> None:
        self.model = model
        self.negative_kv = negative_kv
        self.lm_loss = lm_loss
        self.momentum = momentum
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.seed = seed
        self.rank = rank
        self.group = group
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.grad_accum_steps = grad_accum_steps
        self.after_optimizer_step = after_optimizer_step
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        device = self.parameters[0].device
        self.generator = torch.Generator(device=device)
        self.fused = bool(optimizer.defaults.get("fused"))

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        model: BlipPretrain,
        momentum: MomentumState,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        dist_info: DistInfo,
        compute_dtype: torch.dtype,
    ) -> PretrainStep:
        """The step a run of `cfg` takes on this rank (seed, clipping, precision, float8,
        accumulation); sharded models get their mixed precision from FSDP2, others autocast."""
        return cls(
            model,
            momentum,
            optimizer,
            lr_scheduler,
            seed=cfg.job.seed,
            rank=dist_info.rank,
            **step_options(cfg, model, dist_info, compute_dtype),
            negative_kv=cfg.parallel.negative_kv,
            lm_loss=objective.ChunkedLMLoss(
                compile_backend="inductor" if cfg.parallel.compile else None
            )
            if cfg.parallel.lm_loss == "chunked"
            else None,
        )

    def _autocast(self, device_type: str) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def __call__(self, batches: Sequence[DeviceBatch], step: int, alpha: float) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches already on the device.

        Args:
            batches: the micro-batches, `grad_accum_steps` of them.
            step: 0-based optimizer step (seeds the hard-negative sampling: micro-batch i of
                step s draws from `derive_seed(seed, rank, s * grad_accum_steps + i)`).
            alpha: distillation weight of this step.
        """
        accum = self.grad_accum_steps
        if len(batches) != accum:
            raise ValueError(f"expected {accum} micro-batches, got {len(batches)}")
        self.model.clamp_temperature_()
        device_type = batches[0].images.device.type
        with self._autocast(device_type):
            self.momentum.update(self.model)
        outputs: list[BlipOutput] = []
        all_finite = None
        for index, batch in enumerate(batches):
            last = index == accum - 1
            if accum > 1 and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(last)
            with self._autocast(device_type):
                targets = self.momentum.targets(batch.images, batch.input_ids,
                                                batch.attention_mask)  # fmt: skip
                self.generator.manual_seed(derive_seed(self.seed, self.rank, step * accum + index))
                out = self._losses(batch, targets, alpha)
            (out.loss if accum == 1 else out.loss / accum).backward()
            outputs.append(out)
            if not last:  # its features enter the queue before the next micro-batch's ITC
                finite = agree_ok(out.loss, None, self.group)
                all_finite = finite if all_finite is None else all_finite & finite
                self._enqueue(targets, batch, finite)
        grad_norm = global_grad_norm(self.parameters, self.grad_clip)
        ok = agree_ok(out.loss, grad_norm, self.group)
        if all_finite is not None:
            ok = ok & all_finite
        self._optimizer_step(ok)
        if self.after_optimizer_step is not None:
            self.after_optimizer_step()
        self._enqueue(targets, batches[-1], ok)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return StepResult(_mean_output(outputs), ok, grad_norm)

    def _losses(self, batch: DeviceBatch, targets: MomentumTargets, alpha: float) -> BlipOutput:
        """The objective of one micro-batch (``self.generator`` is seeded for it)."""
        return pretrain_losses(self.model, *batch, targets, alpha, self.generator,
                               self.negative_kv, self.lm_loss)  # fmt: skip

    def _enqueue(self, targets: MomentumTargets, batch: DeviceBatch, valid: torch.Tensor) -> None:
        """Put a micro-batch's momentum features into the queues (when ``valid``)."""
        self.momentum.enqueue(targets.image_feat_m, targets.text_feat_m, valid=valid)

    def _optimizer_step(self, ok: torch.Tensor) -> None:
        apply_update(self.optimizer, ok, self.fused)
