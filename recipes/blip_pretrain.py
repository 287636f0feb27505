"""BLIP pretraining recipe: ITC (momentum distillation, queues) + ITM (hard negatives) + LM.

    blip run blip_pretrain --config debug
    blip run --nproc-per-node 8 recipes/blip_pretrain.py --config configs/base.toml key=value ...

The recipe owns the loop and reads top to bottom: ``setup`` (the run's process group, folder and
stop handlers -> checkpoints and where to resume -> data -> model and momentum state built and
parallelized by the library's ``build_pretraining`` -> optimizer -> scheduler -> step ->
checkpoint load -> metrics -> evaluator), ``train``, ``save_checkpoint``, ``cleanup``.
One step follows the data: loader -> device -> the library's ``PretrainStep`` (EMA + momentum
targets -> losses -> backward -> gradient norm -> one flag agreed by all ranks -> optimizer ->
enqueue) -> metrics -> checkpoint. The parts every training recipe shares are library
components (docs/design.md, "Writing a recipe"): ``TrainingRun``, ``StopRequests``,
``RunCheckpoints``, ``NonFiniteRun``, ``StepsSinceLog``, ``run_training_recipe``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch

from blip_recipes.checkpoint import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    MOMENTUM,
    OPTIMIZER,
    TRAIN_STATE,
    ModelWrapper,
    OptimizerWrapper,
    TrainState,
    load_states,
    top_level_keys,
)
from blip_recipes.config import Config
from blip_recipes.data import build_tokenizer, build_train_loader, normalize_images
from blip_recipes.evaluation.periodic import PeriodicEvaluator
from blip_recipes.metrics import flops_per_sample
from blip_recipes.metrics.steps_since_log import PRETRAIN_KEYS, StepsSinceLog
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.runs.checkpoints import RunCheckpoints, loader_state, train_state_at
from blip_recipes.runs.nonfinite import NonFiniteRun
from blip_recipes.runs.recipe_main import run_training_recipe
from blip_recipes.runs.training_run import TrainingRun, steps_per_epoch
from blip_recipes.training.build import build_pretraining, compute_dtype, set_determinism
from blip_recipes.training.momentum import check_queue_batch
from blip_recipes.training.optim import alpha_at_step, build_lr_scheduler, build_optimizer
from blip_recipes.training.pretrain import PretrainStep
from blip_recipes.training.step import DeviceBatch, StepResult

logger = logging.getLogger("blip_pretrain")


class BlipPretrainRecipe:
    """Pretrain a BLIP model. See the module docstring for the order of things."""

    METRIC_KEYS: tuple[str, ...] = PRETRAIN_KEYS
    """Step outputs averaged over each log window into metrics.jsonl."""

    BEST_EVAL_KEY = "r_mean"
    """Eval-record key whose maximum the end-of-run summary reports as the best evaluation."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.nonfinite_steps = 0
        self.run = TrainingRun(cfg, "blip_pretrain", logger)

    @property
    def step(self) -> int:
        """Optimizer steps completed: a view of `train_state.step`, the one counter (saved with
        each checkpoint; the LR scheduler's count is checked against it on resume)."""
        return self.train_state.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.run.start()  # stop handlers, process group, output folder lock, rank log, threads
        run = self.run
        self.dist, self.device, self.output_dir = run.dist, run.device, run.output_dir
        check_queue_batch(cfg.momentum.queue_size, cfg.data.batch_size, self.dist.world_size)
        self.checkpoints = RunCheckpoints(self.output_dir, cfg)
        self.resume_from = self.checkpoints.resume_path()
        torch.manual_seed(cfg.job.seed)
        set_determinism(cfg.training.deterministic)
        self.compute_dtype = compute_dtype(cfg.training.mixed_precision, self.device)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.loader = build_train_loader(
            cfg.data,
            self.tokenizer,
            image_size=cfg.model.image_size,
            seed=cfg.job.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.loader.stop_requested = self.run.stop.requested  # a stuck wait ends
        self.steps_per_epoch = steps_per_epoch(self.loader, cfg)
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        # model on meta -> parallel plan -> weights -> momentum state (library set-up), then
        # reference momentum weights and queues from checkpoint.init_from when it has them
        self.model, self.momentum, self.plan = build_pretraining(
            cfg, self.tokenizer, self.dist, self.compute_dtype
        )
        init_from = cfg.checkpoint.init_from
        if init_from and self.resume_from is None and MOMENTUM in top_level_keys(init_from):
            load_states(init_from, {MOMENTUM: self.momentum})
            logger.info("momentum encoders and queues initialised from %s", init_from)
        self.run.stop.refuse_start_if_requested(self.dist)  # before metrics.jsonl is touched

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            cfg.lr_scheduler,
            peak_lr=cfg.optimizer.lr,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )
        self.step_fn = PretrainStep.from_config(
            cfg, self.model, self.optimizer, self.lr_scheduler, self.dist, self.compute_dtype,
            momentum=self.momentum,
        )  # fmt: skip
        if cfg.parallel.compile:  # the first step compiles: say so, and how long it took
            self.step_fn = FirstCallTimer(self.step_fn, "first step")
        if self.resume_from is not None:
            self.resume_from = self.checkpoints.load(self.resume_from, self._checkpoint_states())
            logger.info("resumed from %s at step %d", self.resume_from, self.step)

        resume_step = self.step if self.resume_from is not None else None
        self.metrics = self.run.open_metrics(self.total_steps, resume_step)
        self.loader.open_bad_sample_log(  # every rank names its bad samples there
            self.output_dir, resume_step=resume_step, batches_per_step=cfg.training.grad_accum_steps
        )
        self.evaluator = PeriodicEvaluator(
            cfg.eval, self.tokenizer, self.metrics, cfg.model.image_size, cfg.data.max_words
        )
        self.run.record_start(self, self.step, self.resume_from, self.total_steps,
                              self.steps_per_epoch, self.compute_dtype)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        return {
            MODEL: ModelWrapper(self.model),
            OPTIMIZER: OptimizerWrapper(self.model, self.optimizer),
            LR_SCHEDULER: self.lr_scheduler,
            MOMENTUM: self.momentum,
            TRAIN_STATE: train_state_at(
                self.train_state, self.step, self.steps_per_epoch, self.run.samples_per_step
            ),
            LOADER: loader_state(self.loader),
        }

    def save_checkpoint(self) -> None:
        """Save everything a bitwise resume needs into checkpoints/step-N/."""
        self.checkpoints.save(self.step, self._checkpoint_states())

    # ------------------------------------------------------------------ training
    def alpha(self, step: int) -> float:
        """Distillation weight: linear from 0 to `momentum.alpha` over the first ramp epochs."""
        m = self.cfg.momentum
        return alpha_at_step(step, m.alpha, m.alpha_ramp_epochs * self.steps_per_epoch)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> DeviceBatch:
        return DeviceBatch(
            normalize_images(batch["images"].to(self.device, non_blocking=True)),
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
        )

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `PretrainStep`)."""
        micro_batches = [self._to_device(batch) for batch in batches]
        return self.step_fn(micro_batches, self.step, self.alpha(self.step))

    def train(self) -> None:
        """Step until `training.steps` (or `epochs`), a stop signal, or too many bad steps."""
        cfg, stop = self.cfg, self.run.stop
        since_log = StepsSinceLog(self.device, self.METRIC_KEYS)
        nonfinite_run = NonFiniteRun(self.device, cfg.training.max_nonfinite_steps)
        while self.step < self.total_steps:
            if self.step % cfg.checkpoint.signal_check_every == 0 and stop.agreed(self.dist):
                logger.warning("%s: saving a checkpoint at step %d, then exiting", stop.reason(),
                               self.step)  # fmt: skip
                break
            t0 = time.perf_counter()
            batches = [next(self.loader) for _ in range(cfg.training.grad_accum_steps)]
            since_log.data_wait += time.perf_counter() - t0
            result = self.train_step(batches)
            self.train_state.step += 1
            nonfinite_run.update(result.ok)
            since_log.add(result)
            last = self.step == self.total_steps
            log_step = self.step % cfg.metrics.log_every == 0 or last
            if log_step:
                self.run.check_folder(self.step)
                self._log(since_log, result)
                since_log = StepsSinceLog(self.device, self.METRIC_KEYS)
            nonfinite_run.check(self.step, self.checkpoints.latest_complete, exact=log_step)
            self.evaluator.maybe_run(self.step, self.model)
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self.run.check_folder(self.step)
                self.save_checkpoint()
        self.run.check_folder(self.step)
        self.save_checkpoint()
        self.run.log_summary(self.step, self.metrics, self.checkpoints.step_dir(self.step),
                             self.BEST_EVAL_KEY)  # fmt: skip

    def _log(self, since_log: StepsSinceLog, result: StepResult) -> None:
        """Host sync point: the steps since the last log step as one metrics record."""
        record = since_log.record(
            result,
            lr=self.optimizer.param_groups[0]["lr"],
            samples_per_step=self.run.samples_per_step,
            world_size=self.dist.world_size,
            flops_per_sample=flops_per_sample(self.cfg.model.name),
            bad_samples=self.loader.stats().get("bad_samples", 0),
            nonfinite_before=self.nonfinite_steps,
            epoch=self.step // self.steps_per_epoch,
            extra={"alpha": self.alpha(self.step - 1), "temp": result.output.temp.item()},
        )
        self.nonfinite_steps = record["nonfinite_steps"]
        self.metrics.log(self.step, record)

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, barrier: bool = True) -> None:
        """Flush metrics, finish pending saves, release modules, tear the process group down
        and free the output folder (``barrier=False`` after a failure)."""
        for name in ("metrics", "checkpoints"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
        if hasattr(self, "loader"):
            self.loader.close_bad_sample_log()
        for name in ("step_fn", "evaluator", "model", "momentum", "optimizer", "lr_scheduler",
                     "loader", "plan", "dist"):  # fmt: skip
            if hasattr(self, name):
                delattr(self, name)
        self.run.close(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_training_recipe(BlipPretrainRecipe, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
