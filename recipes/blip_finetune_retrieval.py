"""BLIP image-text retrieval fine-tuning (COCO, Flickr30k): ITC + ITM, positives by image id.

    blip run blip_finetune_retrieval --config finetune_retrieval_coco \\
        checkpoint.init_from=outputs/blip_base/checkpoints/step-N
    blip run --nproc-per-node 8 blip_finetune_retrieval --config finetune_retrieval_flickr key=value

The same library components as the pretraining recipe (run set-up, stop protocol, checkpoints
with bitwise resume, metrics, parallel set-up), its own loop, with what fine-tuning changes
(docs/finetune-retrieval.md):

- weights: `checkpoint.init_from`, a DCP checkpoint (reference or Hugging Face weights:
  `blip convert model_base.pth outputs/model_base --to dcp` first), at `model.image_size` with
  the ViT position embeddings interpolated; its momentum encoders and queues when it has them.
  The decoder-only parameters are left out of the optimizer.
- step: `RetrievalStep` (ITC with momentum distillation and an image-id queue, ITM with
  same-image-masked hard negatives, optionally over every rank's batch); no captioning loss.
- schedule: per-epoch cosine from `optimizer.lr` to `lr_scheduler.min_lr`; alpha ramps over
  `momentum.alpha_ramp_epochs` (1: the first epoch).
- evaluation: `eval.annotation` (validation split) every `retrieval.eval_every_epochs` epochs
  and at the last step with the reference protocol (`eval.k_test`); the weights with the best
  `r_mean` are kept in `<output_dir>/best/step-N`; at the end the test split
  (`retrieval.test_annotation`) is scored with them and everything goes to
  `<output_dir>/retrieval_finetune.json`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import replace
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
)
from blip_recipes.config import Config, to_toml
from blip_recipes.data import build_tokenizer, build_train_loader, normalize_images
from blip_recipes.evaluation.retrieval import evaluate_retrieval
from blip_recipes.evaluation.retrieval_data import RetrievalData, load_retrieval_data
from blip_recipes.metrics.steps_since_log import StepsSinceLog
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.runs.checkpoints import RunCheckpoints, loader_state, train_state_at
from blip_recipes.runs.nonfinite import NonFiniteRun
from blip_recipes.runs.recipe_main import run_training_recipe
from blip_recipes.runs.training_run import TrainingRun, steps_per_epoch
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.build import build_pretraining, compute_dtype, set_determinism
from blip_recipes.training.momentum import MomentumState, check_queue_batch
from blip_recipes.training.optim import EpochCosineLR, alpha_at_step, build_optimizer
from blip_recipes.training.retrieval import RetrievalBatch, RetrievalStep
from blip_recipes.training.retrieval_setup import SELECTION_KEY, freeze_decoder, load_pretrained
from blip_recipes.training.step import StepResult
from recipes.blip_eval_retrieval import format_table

logger = logging.getLogger("blip_finetune_retrieval")

BEST_KEY = "retrieval_best"
"""Checkpoint key of the best validation result so far."""
RESULT_FILE = "retrieval_finetune.json"


class BlipFinetuneRetrievalRecipe:
    """Fine-tune a BLIP model for image-text retrieval (module docstring)."""

    METRIC_KEYS = ("loss", "loss_ita", "loss_itm", "itm_acc", "itm_pos_prob", "itm_neg_prob")
    BEST_EVAL_KEY = "r_mean"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.nonfinite_steps = 0
        self.run = TrainingRun(cfg, "blip_finetune_retrieval", logger)
        self.val_data: RetrievalData | None = None
        self.test_data: RetrievalData | None = None
        self._last_val_record: dict[str, float] | None = None

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

        self._build_model_and_momentum()
        self.run.stop.refuse_start_if_requested(self.dist)  # before metrics.jsonl is touched

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        # per-epoch cosine over `training.epochs` (or more, when `training.steps` asks for more
        # steps): a run cut short with `training.steps` follows the same schedule
        epochs = max(cfg.training.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        self.lr_scheduler = EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.lr_scheduler.min_lr,
                                          self.steps_per_epoch, epochs)  # fmt: skip
        self.step_fn = RetrievalStep.from_config(
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
        self._load_eval_data()
        self.run.record_start(self, self.step, self.resume_from, self.total_steps,
                              self.steps_per_epoch, self.compute_dtype)  # fmt: skip

    def _build_model_and_momentum(self) -> None:
        """Model and momentum state as pretraining builds them (no `init_from` there), an
        id-tracking momentum state around the same encoders, then the pretrained weights."""
        cfg = self.cfg
        start = replace(cfg, checkpoint=replace(cfg.checkpoint, init_from=None))
        self.model, momentum, self.plan = build_pretraining(
            start, self.tokenizer, self.dist, self.compute_dtype
        )
        self.momentum = MomentumState(
            momentum.encoders,
            queue_size=cfg.momentum.queue_size,
            embed_dim=cfg.model.embed_dim,
            decay=cfg.momentum.decay,
            train_mode=cfg.momentum.train_mode,
            seed=cfg.job.seed,
            device=self.dist.device,
            group=momentum.group,
            track_ids=True,
        )
        init_from = cfg.checkpoint.init_from
        if self.resume_from is None and init_from:
            found = load_pretrained(init_from, self.model, self.momentum, self.dist)
            logger.info("weights from %s (momentum encoders: %s, queues: %s)", init_from,
                        found["momentum"], found["queues"])  # fmt: skip
        elif self.resume_from is None:
            logger.warning("no checkpoint.init_from: fine-tuning from the config's initial weights")
        frozen = freeze_decoder(self.model)
        logger.info("decoder-only parameters left out of the optimizer: %d tensors", len(frozen))
        self.best = BestWeights(self.output_dir, SELECTION_KEY, to_toml(cfg))
        if self.resume_from is None:
            self.best.clear_stale(self.dist.is_main)

    def _load_eval_data(self) -> None:
        """The validation split (`eval.annotation`) and the test split; the best weights go to
        `<output_dir>/best` through a checkpoint manager of their own (newest best only)."""
        cfg = self.cfg
        ev = cfg.eval
        if ev.annotation:
            self.val_data = load_retrieval_data(ev.annotation, ev.image_root, cfg.data.max_words)
        else:
            logger.warning("no eval.annotation: no validation, the last weights count as best")
        if cfg.retrieval.test_annotation:
            self.test_data = load_retrieval_data(
                cfg.retrieval.test_annotation, ev.image_root, cfg.data.max_words
            )

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
            BEST_KEY: self.best,
        }

    def save_checkpoint(self) -> None:
        """Save everything a bitwise resume needs into checkpoints/step-N/."""
        self.checkpoints.save(self.step, self._checkpoint_states())

    # ------------------------------------------------------------------ training
    def alpha(self, step: int) -> float:
        """Distillation weight: linear from 0 to `momentum.alpha` over the first ramp epochs."""
        m = self.cfg.momentum
        return alpha_at_step(step, m.alpha, m.alpha_ramp_epochs * self.steps_per_epoch)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> RetrievalBatch:
        if "image_ids" not in batch:
            raise KeyError(
                "training batches carry no 'image_ids': retrieval fine-tuning needs the image "
                "of every caption (json/jsonl records' image_id, or their image path)"
            )
        return RetrievalBatch(
            normalize_images(batch["images"].to(self.device, non_blocking=True)),
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
            batch["image_ids"].to(self.device, non_blocking=True),
        )

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `RetrievalStep`)."""
        micro_batches = [self._to_device(batch) for batch in batches]
        return self.step_fn(micro_batches, self.step, self.alpha(self.step))

    def train(self) -> None:
        """Fine-tune until `training.steps` (or `epochs`), a stop signal or too many bad steps,
        validating at epoch ends; a finished run then scores the test split (`final_report`)."""
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
            self.validate_if_due(self.step)
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self.run.check_folder(self.step)
                self.save_checkpoint()
        self.run.check_folder(self.step)
        self.save_checkpoint()
        self.run.log_summary(self.step, self.metrics, self.checkpoints.step_dir(self.step),
                             self.BEST_EVAL_KEY)  # fmt: skip
        if self.step >= self.total_steps:
            self.final_report()

    def _log(self, since_log: StepsSinceLog, result: StepResult) -> None:
        """Host sync point: the steps since the last log step as one metrics record (no MFU:
        the tabulated FLOPs are pretraining's, 224 px with the decoder)."""
        record = since_log.record(
            result,
            lr=self.optimizer.param_groups[0]["lr"],
            samples_per_step=self.run.samples_per_step,
            world_size=self.dist.world_size,
            flops_per_sample=None,
            bad_samples=self.loader.stats().get("bad_samples", 0),
            nonfinite_before=self.nonfinite_steps,
            epoch=self.step // self.steps_per_epoch,
            extra={"alpha": self.alpha(self.step - 1), "temp": result.output.temp.item()},
        )
        self.nonfinite_steps = record["nonfinite_steps"]
        self.metrics.log(self.step, record)

    # ------------------------------------------------------------------ evaluation
    def _score(self, data: RetrievalData) -> dict[str, float]:
        """The reference protocol on `data` (collective), leaving every RNG as it was."""
        ev = self.cfg.eval
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            results = evaluate_retrieval(
                self.model, self.tokenizer, data, k_test=ev.k_test, batch_size=ev.batch_size,
                text_max_length=ev.text_max_length, image_size=self.cfg.model.image_size,
                num_workers=self.cfg.data.num_workers, progress=ev.progress and self.dist.is_main,
            )  # fmt: skip
        reshard_all(self.model)
        return results

    def validate_if_due(self, step: int) -> dict[str, float] | None:
        """After step `step`: validate at every `retrieval.eval_every_epochs`-th epoch end and
        at the last step; keep the weights when `r_mean` beats the best so far."""
        every = self.steps_per_epoch * self.cfg.retrieval.eval_every_epochs
        if step % every != 0 and step != self.total_steps:
            return None
        epoch = (step - 1) // self.steps_per_epoch
        if self.val_data is None:
            if step == self.total_steps:
                self.best.offer(step, epoch, {SELECTION_KEY: 0.0}, self.model)
            return None
        results = self._score(self.val_data)
        record = {**results, "epoch": epoch}
        if step == self.total_steps and self.test_data is not None:
            self._last_val_record = record  # logged with the test metrics: one record a step
        else:
            self.metrics.log_eval(step, record)
        self.best.offer(step, epoch, results, self.model)
        # log lines count epochs from 1 (as the caption recipe's); saved state stays 0-based
        logger.info("epoch %d (step %d): val r_mean %.2f; best %.2f at epoch %d", epoch + 1, step,
                    results[SELECTION_KEY], self.best.score, self.best.epoch + 1)  # fmt: skip
        return results

    # ------------------------------------------------------------------ end of run
    def final_report(self) -> dict[str, Any]:
        """Score the test split with the best weights (they replace the model's in memory),
        then write `retrieval_finetune.json` (rank 0) and log the tables."""
        report: dict[str, Any] = {
            "best_step": self.best.step,
            "best_epoch": self.best.epoch,
            "best_dir": str(self.best.path) if self.best.path is not None else None,
            "val": self.best.metrics if self.val_data is not None else None,
            "test": None,
        }
        if self.test_data is not None:
            if self.best.step != self.step:
                self.best.load_into(self.model)
            test = self._score(self.test_data)
            report["test"] = test
            last_val = self._last_val_record
            if last_val is not None:  # (not when a finished run is started again)
                self.metrics.log_eval(
                    self.step, {**last_val, **{f"test_{k}": v for k, v in test.items()}}
                )
        if self.dist.is_main:
            (self.output_dir / RESULT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            for split in ("val", "test"):
                if report[split]:
                    logger.info("%s (best epoch %d, step %d):\n%s", split, self.best.epoch + 1,
                                self.best.step, format_table(report[split]))  # fmt: skip
        return report

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, barrier: bool = True) -> None:
        """Flush metrics, finish pending saves, release modules, tear the process group down
        and free the output folder (``barrier=False`` after a failure)."""
        for name in ("metrics", "checkpoints", "best"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
        if hasattr(self, "loader"):
            self.loader.close_bad_sample_log()
        for name in ("step_fn", "model", "momentum", "optimizer", "lr_scheduler", "loader",
                     "best", "plan", "dist"):  # fmt: skip
            if hasattr(self, name):
                delattr(self, name)
        self.run.close(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_training_recipe(BlipFinetuneRetrievalRecipe, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BlipFinetuneRetrievalRecipe", "main"]
