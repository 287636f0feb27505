"""BLIP caption fine-tuning (COCO, Karpathy splits): image encoder + text decoder, LM loss only.

    blip run blip_finetune_caption --config finetune_caption_coco checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_caption --config finetune_caption_coco

The same library components as the pretraining recipe (run set-up, stop protocol, checkpoints,
metrics), its own loop, with these parts different (see docs/finetune-caption.md):

- data: the training captions are cleaned with `pre_caption` and the prompt ("a picture of ")
  is put in front (`caption.prompt`);
- model: the pretraining model without momentum encoders, started from
  `checkpoint.init_from` (ViT position embedding interpolated to `model.image_size`), trained
  through its `decoder_logits` entry point only (no ITC, no ITM);
- step: `CaptionStep` (label-smoothed LM loss, prompt tokens excluded from the targets);
- LR: cosine over epochs (`optimizer.lr` -> `caption.min_lr` over `training.epochs`), constant
  within an epoch;
- evaluation: every `caption.eval_every_epochs` epochs and at the last step the validation split
  (`eval.annotation`) is captioned (beam search) across ranks and scored (BLEU-4, CIDEr-D); the
  weights with the best CIDEr + BLEU-4 are kept in `best/step-N`; at the end the test split
  (`caption.test_annotation`) is captioned and scored with them.

Writes, besides the pretraining recipe's files: `captions/val_step<N>.json` and
`captions/test.json` (`[{"image_id", "caption"}]`), the validation scores in `eval.jsonl`,
`caption_best.json` (step, epoch and scores of the kept weights) and `caption_test.json`.
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
from blip_recipes.data import build_tokenizer, build_train_loader, normalize_images
from blip_recipes.evaluation.captioning import (
    SELECTION_KEY,
    CaptionData,
    CaptionEvalResult,
    evaluate_captions,
    load_caption_data,
)
from blip_recipes.evaluation.generation import prompt_ids
from blip_recipes.metrics.steps_since_log import StepsSinceLog
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.runs.checkpoints import RunCheckpoints, loader_state, train_state_at
from blip_recipes.runs.nonfinite import NonFiniteRun
from blip_recipes.runs.recipe_main import run_training_recipe
from blip_recipes.runs.training_run import TrainingRun, steps_per_epoch
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.build import compute_dtype, set_determinism
from blip_recipes.training.caption import CaptionStep, PromptedTokenizer, build_captioning
from blip_recipes.training.optim import EpochCosineLR, build_optimizer
from blip_recipes.training.step import DeviceBatch, StepResult

logger = logging.getLogger("blip_finetune_caption")

BEST_STATE = "caption_best"
"""Checkpoint key of the best validation score so far (a resumed run keeps comparing to it)."""
BEST_RECORD = "caption_best.json"


class BlipFinetuneCaptionRecipe:
    """Fine-tune a pretrained BLIP model for captioning (module docstring)."""

    METRIC_KEYS = ("loss",)
    BEST_EVAL_KEY = f"val_{SELECTION_KEY}"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.nonfinite_steps = 0
        self.run = TrainingRun(cfg, "blip_finetune_caption", logger)
        self.val_data: CaptionData | None = None
        self.test_data: CaptionData | None = None

    @property
    def step(self) -> int:
        """Optimizer steps completed: a view of `train_state.step`, the one counter (saved with
        each checkpoint; the LR scheduler's count is checked against it on resume)."""
        return self.train_state.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.eval.annotation:
            self.val_data = load_caption_data(cfg.eval.annotation, cfg.eval.image_root)
        if cfg.caption.test_annotation:
            self.test_data = load_caption_data(cfg.caption.test_annotation, cfg.eval.image_root)
        self.run.start()  # stop handlers, process group, output folder lock, rank log, threads
        run = self.run
        self.dist, self.device, self.output_dir = run.dist, run.device, run.output_dir
        self.checkpoints = RunCheckpoints(self.output_dir, cfg)
        self.resume_from = self.checkpoints.resume_path()
        torch.manual_seed(cfg.job.seed)
        set_determinism(cfg.training.deterministic)
        self.compute_dtype = compute_dtype(cfg.training.mixed_precision, self.device)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.loader = build_train_loader(  # tokenizing `caption.prompt + pre_caption(caption)`
            cfg.data,
            PromptedTokenizer(self.tokenizer, cfg.caption.prompt),
            image_size=cfg.model.image_size,
            seed=cfg.job.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.loader.stop_requested = self.run.stop.requested  # a stuck wait ends
        self.steps_per_epoch = steps_per_epoch(self.loader, cfg)
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        # the captioning model (no momentum state), parallelized and initialised
        self.model, self.plan = build_captioning(cfg, self.tokenizer, self.dist, self.compute_dtype)
        self.best = BestWeights(self.output_dir, SELECTION_KEY, to_toml(cfg))
        if self.resume_from is None:  # a fresh start owns best/ and the best record
            self.best.clear_stale(self.dist.is_main)
            if self.dist.is_main:
                (self.output_dir / BEST_RECORD).unlink(missing_ok=True)
        self.run.stop.refuse_start_if_requested(self.dist)  # before metrics.jsonl is touched

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        # cosine over `training.epochs` epochs, constant within an epoch
        self.lr_scheduler = EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.caption.min_lr,
                                          self.steps_per_epoch, cfg.training.epochs)  # fmt: skip
        self.prompt_length = len(prompt_ids(self.tokenizer, cfg.caption.prompt))
        self.step_fn = CaptionStep.from_config(
            cfg, self.model, self.optimizer, self.lr_scheduler, self.dist, self.compute_dtype,
            prompt_length=self.prompt_length,
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
        self.run.record_start(self, self.step, self.resume_from, self.total_steps,
                              self.steps_per_epoch, self.compute_dtype)  # fmt: skip
        logger.info(
            "caption fine-tuning: prompt %r (%d tokens excluded from the loss), validation %s, "
            "test %s", cfg.caption.prompt, self.prompt_length,
            f"{len(self.val_data.images)} images" if self.val_data else "none",
            f"{len(self.test_data.images)} images" if self.test_data else "none",
        )  # fmt: skip

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
    def _to_device(self, batch: dict[str, torch.Tensor]) -> DeviceBatch:
        return DeviceBatch(
            normalize_images(batch["images"].to(self.device, non_blocking=True)),
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
        )

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `CaptionStep`)."""
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def train(self) -> None:
        """Fine-tune until `training.steps` (or `epochs`), a stop signal or too many bad steps,
        validating at the due steps; then score the test split with the kept weights."""
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
        if not stop.requested() and self.test_data is not None:
            self.test()

    def _log(self, since_log: StepsSinceLog, result: StepResult) -> None:
        """Host sync point: the steps since the last log step as one metrics record (no MFU:
        the pretraining FLOP table does not apply, no ITC/ITM and longer captions)."""
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
        """At every `caption.eval_every_epochs` epochs (0: never) and at the last step."""
        if self.val_data is None:
            return False
        every = self.cfg.caption.eval_every_epochs * self.steps_per_epoch
        return step == self.total_steps or (every > 0 and step % every == 0)

    def _autocast(self) -> Any:
        dtype = self.compute_dtype
        if self.dist.sharded or dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def caption_split(self, data: CaptionData) -> CaptionEvalResult:
        """Caption and score a split with the current weights (collective, every rank)."""
        cfg, cap = self.cfg, self.cfg.caption
        with self._autocast():
            result = evaluate_captions(
                self.model, self.tokenizer, data, prompt=cap.prompt, method=cap.method,
                image_size=cfg.model.image_size, batch_size=cfg.eval.batch_size,
                num_workers=cfg.data.num_workers, device=self.device, num_beams=cap.num_beams,
                max_length=cap.max_length, min_length=cap.min_length,
                repetition_penalty=cap.repetition_penalty,
            )  # fmt: skip
        reshard_all(self.model)
        return result

    def validate(self) -> dict[str, float]:
        """Caption the validation split, log its scores, keep the weights when they are the
        best so far (collective: every rank computes the same scores, so all agree)."""
        assert self.val_data is not None
        result = self.caption_split(self.val_data)
        epoch = self.step / self.steps_per_epoch
        values = {"epoch": epoch, **{f"val_{k}": v for k, v in result.metrics.items()}}
        if self.dist.is_main:
            result.write(self.val_data, self.output_dir / "captions" / f"val_step{self.step}.json")
            self.metrics.log_eval(self.step, values)
        m = result.metrics
        logger.info(
            "validation at step %d (epoch %.2f): BLEU-4 %.4f, CIDEr %.4f, CIDEr + BLEU-4 %.4f "
            "(best so far %.4f)", self.step, epoch, m["Bleu_4"], m["CIDEr"], m[SELECTION_KEY],
            self.best.score,
        )  # fmt: skip
        epoch_index = (self.step - 1) // self.steps_per_epoch
        if self.best.offer(self.step, epoch_index, m, self.model) and self.dist.is_main:
            record = {"step": self.step, **values, "checkpoint": str(self.best.path)}
            (self.output_dir / BEST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return values

    def test(self) -> dict[str, float]:
        """Caption and score the test split with the kept (best validation) weights, or the
        final ones when there was no validation; writes captions/test.json, caption_test.json."""
        assert self.test_data is not None
        best = self.best.load_into(self.model)
        result = self.caption_split(self.test_data)
        record = {
            "step": int(best.name.split("-")[1]) if best is not None else self.step,
            "checkpoint": str(best) if best is not None else "final weights",
            **{f"test_{k}": v for k, v in result.metrics.items()},
        }
        if self.dist.is_main:
            result.write(self.test_data, self.output_dir / "captions" / "test.json")
            text = json.dumps(record, indent=2) + "\n"
            (self.output_dir / "caption_test.json").write_text(text)
        logger.info(
            "test (weights of step %d): BLEU-4 %.4f, CIDEr %.4f", record["step"],
            result.metrics["Bleu_4"], result.metrics["CIDEr"],
        )  # fmt: skip
        return record

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
    return run_training_recipe(BlipFinetuneCaptionRecipe, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["BlipFinetuneCaptionRecipe", "main"]
