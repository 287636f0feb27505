"""BLIP NLVR2 fine-tuning: is a sentence true of a pair of images? (two-image classifier)

    blip run blip_finetune_nlvr --config finetune_nlvr checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_nlvr --config finetune_nlvr key=value

The same library components as the pretraining recipe (run set-up, stop protocol, checkpoints
with bitwise resume, metrics, parallel set-up), its own loop, with these parts different
(docs/nlvr.md):

- data: `nlvr.train_annotation` (NLVR2-style records, images under `nlvr.image_root`), both
  images augmented, sides swapped at random with "left"/"right" in the sentence swapped too;
- model: `BlipNLVR` (the text encoder cross-attends each image through its own attention and
  merges them; upper half by a linear merge layer), started from `checkpoint.init_from` (a
  pretraining checkpoint: each layer's cross-attention copied to both image attentions; or an
  NLVR checkpoint, reference `.pth` included), ViT position embedding interpolated;
- step: `NlvrStep` (cross-entropy of the 2-way head); no momentum encoders, no queues;
- LR: cosine over epochs (`optimizer.lr` -> `nlvr.min_lr`), constant within an epoch;
- evaluation: every `nlvr.eval_every_epochs` epochs and at the last step the dev split
  (`nlvr.dev_annotation`) is classified across ranks; the weights with the best accuracy are
  kept in `best/step-N`; at the end the test split (`nlvr.test_annotation`) is scored with them.

Writes, besides the pretraining recipe's files: the dev accuracy in `eval.jsonl`, TensorBoard
`eval/nlvr_pairs` (the two images of a few dev pairs with sentence, label and prediction),
`predictions/dev_step<N>.json` and `predictions/test.json` (one record per pair), and
`nlvr_finetune.json` (best step and epoch, dev and test accuracy).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import torch

from blip_recipes.checkpoint import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    TRAIN_STATE,
    ModelWrapper,
    OptimizerWrapper,
    TrainState,
)
from blip_recipes.config import Config, to_toml
from blip_recipes.data import build_tokenizer, normalize_images
from blip_recipes.data.nlvr import NlvrExample, build_nlvr_train_loader, load_nlvr_annotations
from blip_recipes.data.transforms import EvalTransform
from blip_recipes.metrics.steps_since_log import StepsSinceLog
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.runs.checkpoints import RunCheckpoints, loader_state, train_state_at
from blip_recipes.runs.nonfinite import NonFiniteRun
from blip_recipes.runs.recipe_main import run_training_recipe
from blip_recipes.runs.training_run import TrainingRun, steps_per_epoch
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.build import compute_dtype, set_determinism
from blip_recipes.training.nlvr import (
    SELECTION_KEY,
    NlvrBatch,
    NlvrEvalResult,
    NlvrStep,
    build_nlvr,
    check_nlvr_config,
    evaluate_nlvr,
)
from blip_recipes.training.optim import EpochCosineLR, build_optimizer
from blip_recipes.training.step import StepResult

logger = logging.getLogger("blip_finetune_nlvr")

BEST_STATE = "nlvr_best"
"""Checkpoint key of the best dev accuracy so far (a resumed run keeps comparing to it)."""
RESULT_FILE = "nlvr_finetune.json"
SHOWN_PAIRS = 4
"""Dev pairs drawn into TensorBoard at each validation."""


class BlipFinetuneNlvrRecipe:
    """Fine-tune a pretrained BLIP model on NLVR2 (module docstring)."""

    METRIC_KEYS = ("loss", "acc")
    BEST_EVAL_KEY = f"val_{SELECTION_KEY}"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.nonfinite_steps = 0
        self.run = TrainingRun(cfg, "blip_finetune_nlvr", logger)
        self.dev: list[NlvrExample] | None = None
        self.test_set: list[NlvrExample] | None = None
        self._last_val: dict[str, float] | None = None

    @property
    def step(self) -> int:
        """Optimizer steps completed: a view of `train_state.step`, the one counter (saved with
        each checkpoint; the LR scheduler's count is checked against it on resume)."""
        return self.train_state.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, nl = self.cfg, self.cfg.nlvr
        self.run.start()  # stop handlers, process group, output folder lock, rank log, threads
        run = self.run
        self.dist, self.device, self.output_dir = run.dist, run.device, run.output_dir
        self.checkpoints = RunCheckpoints(self.output_dir, cfg)
        self.resume_from = self.checkpoints.resume_path()
        torch.manual_seed(cfg.job.seed)
        set_determinism(cfg.training.deterministic)
        self.compute_dtype = compute_dtype(cfg.training.mixed_precision, self.device)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        # the [nlvr] files are read after the rank log is open, before anything is built, so a
        # bad annotation ends the run in one line
        check_nlvr_config(cfg)
        if nl.dev_annotation:
            self.dev = load_nlvr_annotations(nl.dev_annotation, nl.image_root)
        if nl.test_annotation:
            self.test_set = load_nlvr_annotations(nl.test_annotation, nl.image_root)
        self.loader = build_nlvr_train_loader(
            cfg.data, self.tokenizer, nl.train_annotation or "", nl.image_root,
            image_size=cfg.model.image_size, seed=cfg.job.seed, rank=self.dist.rank,
            world_size=self.dist.world_size,
        )  # fmt: skip
        self.loader.stop_requested = self.run.stop.requested  # a stuck wait ends
        self.steps_per_epoch = steps_per_epoch(self.loader, cfg)
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        # the NLVR model (no momentum state), parallelized and initialised
        self.model, self.plan = build_nlvr(cfg, self.tokenizer, self.dist, self.compute_dtype)
        self.best = BestWeights(self.output_dir, SELECTION_KEY, to_toml(cfg))
        if self.resume_from is None:
            self.best.clear_stale(self.dist.is_main)
        self.run.stop.refuse_start_if_requested(self.dist)  # before metrics.jsonl is touched

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        # cosine over `training.epochs` epochs, constant within an epoch (the reference's)
        self.lr_scheduler = EpochCosineLR(self.optimizer, cfg.optimizer.lr, nl.min_lr,
                                          self.steps_per_epoch, cfg.training.epochs)  # fmt: skip
        self.step_fn = NlvrStep.from_config(cfg, self.model, self.optimizer, self.lr_scheduler,
                                            self.dist, self.compute_dtype)  # fmt: skip
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
        self.run.record_start(self, self.step, self.resume_from, self.total_steps,
                              self.steps_per_epoch, self.compute_dtype)  # fmt: skip
        logger.info("NLVR fine-tuning: %d training pairs, dev %s, test %s",
                    self.loader.epoch_length, len(self.dev) if self.dev else "none",
                    len(self.test_set) if self.test_set else "none")  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        return {
            MODEL: ModelWrapper(self.model),
            OPTIMIZER: OptimizerWrapper(self.model, self.optimizer),
            LR_SCHEDULER: self.lr_scheduler,
            TRAIN_STATE: train_state_at(
                self.train_state, self.step, self.steps_per_epoch, self.run.samples_per_step
            ),
            LOADER: loader_state(self.loader),
            BEST_STATE: self.best,
        }

    def save_checkpoint(self) -> None:
        """Save everything a bitwise resume needs into checkpoints/step-N/."""
        self.checkpoints.save(self.step, self._checkpoint_states())

    # ------------------------------------------------------------------ training
    def _to_device(self, batch: dict[str, torch.Tensor]) -> NlvrBatch:
        device = self.device
        return NlvrBatch(
            normalize_images(batch["images"].to(device, non_blocking=True)),
            batch["input_ids"].to(device, non_blocking=True),
            batch["attention_mask"].to(device, non_blocking=True),
            batch["labels"].to(device, non_blocking=True),
        )

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `NlvrStep`)."""
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def train(self) -> None:
        """Fine-tune until `training.steps` (or `epochs`), a stop signal or too many bad steps,
        validating at the due steps; a finished run then scores the test split."""
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
            if self.validation_due(self.step):
                self.validate()
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self.run.check_folder(self.step)
                self.save_checkpoint()
        self.run.check_folder(self.step)
        self.save_checkpoint()
        self.run.log_summary(self.step, self.metrics, self.checkpoints.step_dir(self.step),
                             self.BEST_EVAL_KEY)  # fmt: skip
        if not stop.requested() and self.step >= self.total_steps:
            self.final_report()

    def _log(self, since_log: StepsSinceLog, result: StepResult) -> None:
        """Host sync point: the steps since the last log step as one metrics record (no MFU:
        the pretraining FLOP table does not apply)."""
        record = since_log.record(
            result,
            lr=self.optimizer.param_groups[0]["lr"],
            samples_per_step=self.run.samples_per_step,
            world_size=self.dist.world_size,
            flops_per_sample=None,
            bad_samples=self.loader.stats().get("bad_samples", 0),
            nonfinite_before=self.nonfinite_steps,
            epoch=self.step // self.steps_per_epoch,
        )
        self.nonfinite_steps = record["nonfinite_steps"]
        self.metrics.log(self.step, record)

    # ------------------------------------------------------------------ evaluation
    def validation_due(self, step: int) -> bool:
        """At every `nlvr.eval_every_epochs` epochs (0: never) and at the last step."""
        every = self.cfg.nlvr.eval_every_epochs * self.steps_per_epoch
        return step == self.total_steps or (every > 0 and step % every == 0)

    def _autocast(self) -> Any:
        dtype = self.compute_dtype
        if self.dist.sharded or dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def score(self, examples: list[NlvrExample]) -> NlvrEvalResult:
        """Classify a split with the current weights (collective), leaving every RNG as it was."""
        cfg = self.cfg
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate_nlvr(
                self.model, self.tokenizer, examples, image_size=cfg.model.image_size,
                max_words=cfg.data.max_words, batch_size=cfg.eval.batch_size,
                device=self.device, num_workers=cfg.data.num_workers, autocast=self._autocast(),
            )  # fmt: skip

    def _write_predictions(self, result: NlvrEvalResult, examples: list, name: str) -> None:
        if self.dist.is_main:
            folder = self.output_dir / "predictions"
            folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(result.records(examples), indent=1) + "\n"
            (folder / name).write_text(text)

    def _show_pairs(self, result: NlvrEvalResult, examples: list[NlvrExample]) -> None:
        """TensorBoard: left and right image of the first dev pairs side by side, the sentence
        under the left one, label and prediction under the right one (rank 0)."""
        if not self.dist.is_main or not self.cfg.metrics.tensorboard:
            return
        transform = EvalTransform(self.cfg.model.image_size)
        images, captions = [], []
        for index, example in enumerate(examples[:SHOWN_PAIRS]):
            try:
                images += [transform(path) for path in example.images]
            except Exception:  # an unreadable image is not worth stopping a run for
                continue
            prediction = bool(result.predictions[index])
            captions += [example.sentence,
                         f"label {bool(example.label)}, predicted {prediction}"]  # fmt: skip
        self.metrics.log_images(self.step, "eval/nlvr_pairs", images, captions)

    def validate(self) -> dict[str, float] | None:
        """Classify the dev split, log its accuracy, keep the weights when they are the best
        so far (collective: every rank computes the same accuracy, so all agree)."""
        epoch_index = (self.step - 1) // self.steps_per_epoch
        if self.dev is None:
            if self.step == self.total_steps:
                self.best.offer(self.step, epoch_index, {SELECTION_KEY: 0.0}, self.model)
            return None
        result = self.score(self.dev)
        values = {"epoch": self.step / self.steps_per_epoch,
                  **{f"val_{k}": v for k, v in result.metrics.items()}}  # fmt: skip
        self._write_predictions(result, self.dev, f"dev_step{self.step}.json")
        self._show_pairs(result, self.dev)
        if self.step == self.total_steps and self.test_set is not None:
            self._last_val = values  # logged with the test accuracy: one record a step
        elif self.dist.is_main:
            self.metrics.log_eval(self.step, values)
        self.best.offer(self.step, epoch_index, result.metrics, self.model)
        logger.info("epoch %d (step %d): dev accuracy %.4f; best %.4f at epoch %d",
                    epoch_index + 1, self.step, result.metrics["acc"], self.best.score,
                    self.best.epoch + 1)  # fmt: skip
        return values

    def final_report(self) -> dict[str, Any]:
        """Score the test split with the kept weights, write `nlvr_finetune.json` (rank 0)."""
        report: dict[str, Any] = {
            "best_step": self.best.step,
            "best_epoch": self.best.epoch,
            "best_dir": str(self.best.path) if self.best.path is not None else None,
            "dev": self.best.metrics if self.dev is not None else None,
            "test": None,
        }
        if self.test_set is not None:
            if self.best.step != self.step:
                self.best.load_into(self.model)
            result = self.score(self.test_set)
            report["test"] = result.metrics
            self._write_predictions(result, self.test_set, "test.json")
            if self.dist.is_main:
                test = {f"test_{k}": v for k, v in result.metrics.items()}
                self.metrics.log_eval(self.step, {**(self._last_val or {}), **test})
            logger.info("test (weights of step %d): accuracy %.4f (%d of %d)", self.best.step,
                        result.metrics["acc"], result.metrics["correct"],
                        result.metrics["total"])  # fmt: skip
        if self.dist.is_main:
            (self.output_dir / RESULT_FILE).write_text(json.dumps(report, indent=2) + "\n")
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
        for name in ("step_fn", "model", "optimizer", "lr_scheduler", "loader", "best", "plan",
                     "dist"):  # fmt: skip
            if hasattr(self, name):
                delattr(self, name)
        self.run.close(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_training_recipe(BlipFinetuneNlvrRecipe, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BlipFinetuneNlvrRecipe", "main"]
