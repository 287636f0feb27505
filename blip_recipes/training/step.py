"""The optimizer step every training task shares; a task adds only its micro-batch objective.

`OptimizerStep.__call__` is the one copy of

    [ITC tasks: clamp temp -> EMA update] -> for each micro-batch: [momentum targets] ->
    the task's objective -> backward (gradients synchronised on the last one only) ->
    [enqueue] -> global gradient norm (clipped) -> one flag agreed by all ranks ->
    optimizer update (skipped when not agreed) -> [enqueue of the last micro-batch] ->
    LR schedule

The bracketed parts run when the step has a momentum state (pretraining, retrieval fine-tuning).
A task subclasses `OptimizerStep` and implements `micro_batch` (the loss of one micro-batch);
`PretrainStep`, `RetrievalStep` and `CaptionStep` are nothing more.

The update decision is taken once for all ranks: `finite(loss) & finite(grad_norm)` reduced with
MIN over the data-parallel group, on the device (`all_ranks_finite`). The same flag drives the
optimizer skip, the enqueue and the caller's non-finite counter, so no rank applies an update
another rank skipped and the queues never diverge. Nothing in the step waits for the host
(except the skip of a non-fused optimizer, `apply_update`).

Gradient accumulation (`grad_accum_steps` micro-batches per optimizer step): the EMA update and
the optimizer step happen once per optimizer step; every micro-batch runs against the queue as it
stands and then enqueues its momentum features (when its loss is finite on every rank), so the
queue invariant stays `queue_size % (batch x world) == 0`; each micro-batch's loss is scaled by
1 / grad_accum_steps, and FSDP2 synchronises gradients only after the last micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from blip_recipes.config import Config
from blip_recipes.data._seeding import derive_seed
from blip_recipes.models.blip import MomentumTargets
from blip_recipes.objectives.pretrain import ChunkedLMLoss, ItcItmLosses
from blip_recipes.parallel.distributed import DistInfo
from blip_recipes.parallel.float8 import float8_precompute_scales
from blip_recipes.parallel.fsdp import ReduceOnce
from blip_recipes.training.momentum import MomentumState

StepT = TypeVar("StepT", bound="OptimizerStep")


@dataclass(frozen=True)
class StepOptions:
    """The settings every training step of a run shares on this rank.

    Attributes:
        seed: run seed; micro-batch i of step s on rank r draws its random choices (hard
            negatives) from `derive_seed(seed, r, s * grad_accum_steps + i)`.
        rank: this rank's index in the data-parallel group.
        group: data-parallel process group the update decision is agreed over; None = one
            process.
        grad_clip: clip the global gradient norm to this value; None = no clipping (reference).
        autocast_dtype: autocast to this dtype (unsharded bf16 runs); None = no autocast (fp32,
            or FSDP2 whose mixed-precision policy casts the parameters).
        grad_accum_steps: micro-batches per optimizer step.
        after_optimizer_step: called after each optimizer step (float8 scale precompute).
        negative_kv: the hard negatives' keys/values in the pretraining multimodal pass,
            `select` or `recompute` (`parallel.negative_kv`).
        lm_loss: the chunked LM loss computed inside the model's entry point
            (`parallel.lm_loss=chunked`), or None for fp32 logits (the same number in fp32).
        reduce_reused: `once`: the FSDP2 units forward runs several times (`reused_units`)
            reduce-scatter once per step (`ReduceOnce`); `per_use`: after each use's backward
            (`parallel.reduce_reused`).
        itc_itm: pretraining's ITC (with the hard negatives) and ITM losses, compiled under
            `parallel.compile` with `parallel.compile_objective`, else eager.
    """

    seed: int = 0
    rank: int = 0
    group: dist.ProcessGroup | None = None
    grad_clip: float | None = None
    autocast_dtype: torch.dtype | None = None
    grad_accum_steps: int = 1
    after_optimizer_step: Callable[[], object] | None = None
    negative_kv: str = "select"
    lm_loss: ChunkedLMLoss | None = None
    reduce_reused: str = "once"
    itc_itm: ItcItmLosses = dataclasses.field(default_factory=ItcItmLosses)

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.negative_kv not in ("select", "recompute"):
            raise ValueError(
                f"negative_kv must be 'select' or 'recompute', got {self.negative_kv!r}"
            )
        if self.reduce_reused not in ("once", "per_use"):
            raise ValueError(
                f"reduce_reused must be 'once' or 'per_use', got {self.reduce_reused!r}"
            )

    @classmethod
    def from_config(
        cls, cfg: Config, model: nn.Module, dist_info: DistInfo, compute_dtype: torch.dtype
    ) -> StepOptions:
        """The options of a run of `cfg` on this rank: FSDP2 models get their precision from
        FSDP2's policy, plain ones autocast; float8 runs precompute scales after each update."""
        par = cfg.parallel
        return cls(
            seed=cfg.job.seed,
            rank=dist_info.rank,
            group=dist_info.dp_group if dist_info.world_size > 1 else None,
            grad_clip=cfg.training.grad_clip,
            autocast_dtype=None
            if isinstance(model, FSDPModule) or compute_dtype == torch.float32
            else compute_dtype,
            grad_accum_steps=cfg.training.grad_accum_steps,
            after_optimizer_step=(lambda: float8_precompute_scales(model)) if par.float8 else None,
            negative_kv=par.negative_kv,
            lm_loss=ChunkedLMLoss(compile_backend="inductor" if par.compile else None)
            if par.lm_loss == "chunked"
            else None,
            reduce_reused=par.reduce_reused,
            itc_itm=ItcItmLosses(
                compile_backend="inductor" if par.compile and par.compile_objective else None
            ),
        )


class DeviceBatch(NamedTuple):
    """One (micro-)batch on the device: images (B, 3, H, W) normalised, input_ids and
    attention_mask (B, L)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class StepResult:
    """What one optimizer step produced; all tensors stay on the device (no host sync).

    Attributes:
        output: the task's losses and diagnostics (a dataclass of 0-d tensors with `loss`),
            averaged over the micro-batches.
        ok: 0-d bool, True on every rank when the update was applied (finite loss on every rank
            and finite global gradient norm).
        grad_norm: 0-d global gradient norm before clipping (non-finite when `ok` is False).
    """

    output: Any
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


def all_ranks_finite(
    loss: torch.Tensor, grad_norm: torch.Tensor | None, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """`finite(loss) & finite(grad_norm)` on every rank of `group`: a MIN all-reduce on the device.

    With `group=None` (one process, or no process group) the local flag is returned;
    `grad_norm=None` checks the loss only. Returns a 0-d bool tensor.
    """
    finite = torch.isfinite(loss.detach())
    if grad_norm is not None:
        finite = finite & torch.isfinite(grad_norm)
    finite = finite.to(torch.int32).reshape(1)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    return finite.reshape(()).bool()


def apply_update(optimizer: torch.optim.Optimizer, ok: torch.Tensor, fused: bool) -> None:
    """Apply the optimizer update when `ok` (0-d bool, agreed by all ranks). Fused AdamW skips
    on the device through its `found_inf` (as GradScaler uses it); other optimizers need one
    host read of the flag."""
    if fused:
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):
        optimizer.step()


def mean_output(outputs: list[Any], keep_last: tuple[str, ...] = ("temp",)) -> Any:
    """Micro-batch outputs (dataclasses of tensors) -> one: 0-d fields averaged (detached),
    the others (features) and those named in `keep_last` taken from the last micro-batch."""
    last = outputs[-1]
    names = [f.name for f in dataclasses.fields(last) if getattr(last, f.name).dim() == 0]
    scalars = {}
    for name in (n for n in names if n not in keep_last):
        values = [getattr(o, name).detach() for o in outputs]
        scalars[name] = values[0] if len(values) == 1 else torch.stack(values).mean()
    return dataclasses.replace(last, **scalars)


class OptimizerStep:
    """One optimizer step over `grad_accum_steps` micro-batches (module docstring); subclasses
    implement `micro_batch`.

    Args:
        model: the online model, after `parallelize_blip`.
        optimizer: AdamW over the model's trainable parameters.
        lr_scheduler: stepped once per call (also on skipped steps: the schedule is a function
            of the step count).
        options: `StepOptions` (seed, agreement group, clipping, precision, accumulation).
        momentum: the momentum state (EMA encoders and queues) of a task with momentum
            distillation, after `parallelize_blip`; None for a task without (captioning).
    """

    needs_momentum = False
    """Whether the task's objective reads momentum targets (then `momentum` is required)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        options: StepOptions | None = None,
        momentum: MomentumState | None = None,
    ) -> None:
        if self.needs_momentum and momentum is None:
            raise ValueError(f"{type(self).__name__} needs a momentum state")
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.options = options if options is not None else StepOptions()
        self.momentum = momentum
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.generator = torch.Generator(device=self.parameters[0].device)
        self.fused = bool(optimizer.defaults.get("fused"))
        once = self.options.reduce_reused == "once"
        self.reduce_once = ReduceOnce(self.reused_units() if once else [])

    @classmethod
    def from_config(
        cls: type[StepT],
        cfg: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        dist_info: DistInfo,
        compute_dtype: torch.dtype,
        **task_arguments: Any,
    ) -> StepT:
        """The step a run of `cfg` takes on this rank (`StepOptions.from_config`, plus the
        task's settings from `config_arguments` and `task_arguments`, e.g. `momentum=`)."""
        options = StepOptions.from_config(cfg, model, dist_info, compute_dtype)
        task_arguments = cls.config_arguments(cfg, dist_info) | task_arguments
        return cls(model, optimizer, lr_scheduler, options, **task_arguments)

    @classmethod
    def config_arguments(cls, cfg: Config, dist_info: DistInfo) -> dict[str, Any]:
        """The task's own constructor arguments read from `cfg` (none by default)."""
        return {}

    def reused_units(self) -> list[FSDPModule]:
        """The model's FSDP2 units that one micro-batch's forward runs more than once (none by
        default; `ReduceOnce` reduces each of them once per step)."""
        return []

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The step's autocast context (also what evaluation of the model should run under)."""
        if self.options.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.options.autocast_dtype)

    def micro_batch(
        self, batch: Any, targets: MomentumTargets | None, *objective_args: Any, **kwargs: Any
    ) -> Any:
        """The task's objective on one micro-batch, under the step's autocast.

        Args:
            batch: the micro-batch on the device (a `DeviceBatch` or the task's own tuple).
            targets: momentum features and the queue snapshot (tasks with a momentum state),
                else None.
            objective_args, kwargs: what the caller passed to `__call__` after `step` (e.g.
                `alpha`).

        Returns:
            a dataclass of tensors whose `loss` (0-d) is backpropagated; `self.generator` is
            seeded for this micro-batch.
        """
        raise NotImplementedError

    def __call__(
        self, batches: Sequence[Any], step: int, *objective_args: Any, **kwargs: Any
    ) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches already on the device.

        Args:
            batches: the micro-batches, `grad_accum_steps` of them.
            step: 0-based optimizer step (seeds `self.generator` for each micro-batch).
            objective_args, kwargs: passed to every `micro_batch` call (pretraining and
                retrieval: `alpha`, the distillation weight of this step).
        """
        opts = self.options
        accum = opts.grad_accum_steps
        if len(batches) != accum:
            raise ValueError(f"expected {accum} micro-batches, got {len(batches)}")
        device_type = batches[0][0].device.type
        if self.momentum is not None:  # ITC with momentum distillation
            self.model.clamp_temperature_()
            with self.autocast(device_type):
                self.momentum.update(self.model)
        outputs: list[Any] = []
        all_finite = None
        targets = None
        for index, batch in enumerate(batches):
            last = index == accum - 1
            if accum > 1 and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(last)
            with self.autocast(device_type):
                if self.momentum is not None:
                    targets = self.momentum.targets(batch[0], batch[1], batch[2])
                self.generator.manual_seed(derive_seed(opts.seed, opts.rank, step * accum + index))
                out = self.micro_batch(batch, targets, *objective_args, **kwargs)
            self.reduce_once.backward(out.loss if accum == 1 else out.loss / accum, sync=last)
            outputs.append(out)
            if not last:  # its features enter the queue before the next micro-batch runs
                finite = all_ranks_finite(out.loss, None, opts.group)
                all_finite = finite if all_finite is None else all_finite & finite
                self._enqueue(targets, batch, finite)
        grad_norm = global_grad_norm(self.parameters, opts.grad_clip)
        ok = all_ranks_finite(out.loss, grad_norm, opts.group)
        if all_finite is not None:
            ok = ok & all_finite
        apply_update(self.optimizer, ok, self.fused)
        if opts.after_optimizer_step is not None:
            opts.after_optimizer_step()
        self._enqueue(targets, batches[-1], ok)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return StepResult(mean_output(outputs), ok, grad_norm)

    def _enqueue(self, targets: MomentumTargets | None, batch: Any, valid: torch.Tensor) -> None:
        """A micro-batch's momentum features (and image ids, when the state tracks them) into
        the queues, when `valid`."""
        if self.momentum is None or targets is None:
            return
        ids = batch.image_ids if self.momentum.id_queue is not None else None
        self.momentum.enqueue(targets.image_feat_m, targets.text_feat_m, valid=valid, ids=ids)
