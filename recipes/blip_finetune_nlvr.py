"""BLIP NLVR2 fine-tuning: is a sentence true of a pair of images? (two-image classifier)

    blip run blip_finetune_nlvr --config finetune_nlvr checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_nlvr --config finetune_nlvr key=value

The pretraining recipe's loop, checkpoints (bitwise resume), stop signals, metrics and parallel
set-up, with these parts swapped (docs/nlvr.md):

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
from typing import Any

import torch

from blip_recipes.checkpoint import MOMENTUM
from blip_recipes.config import to_toml
from blip_recipes.data import normalize_images
from blip_recipes.data.nlvr import NlvrExample, build_nlvr_train_loader, load_nlvr_annotations
from blip_recipes.data.transforms import EvalTransform
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.nlvr import (
    SELECTION_KEY,
    NlvrBatch,
    NlvrEvalResult,
    NlvrStep,
    build_nlvr,
    check_nlvr_config,
    evaluate_nlvr,
)
from blip_recipes.training.optim import EpochCosineLR
from blip_recipes.training.step import StepResult
from recipes.blip_pretrain import BlipPretrainRecipe

logger = logging.getLogger("blip_finetune_nlvr")

BEST_STATE = "nlvr_best"
"""Checkpoint key of the best dev accuracy so far (a resumed run keeps comparing to it)."""
RESULT_FILE = "nlvr_finetune.json"
SHOWN_PAIRS = 4
"""Dev pairs drawn into TensorBoard at each validation."""


class _EpochEndEvaluation:
    """What the training loop calls after every step: validation at the due steps."""

    def __init__(self, recipe: BlipFinetuneNlvrRecipe) -> None:
        self.recipe = recipe

    def maybe_run(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        if not self.recipe.validation_due(step):
            return None
        return self.recipe.validate()


class BlipFinetuneNlvrRecipe(BlipPretrainRecipe):
    """Fine-tune a pretrained BLIP model on NLVR2 (module docstring)."""

    METRIC_KEYS = ("loss", "acc")
    BEST_EVAL_KEY = f"val_{SELECTION_KEY}"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.dev: list[NlvrExample] | None = None
        self.test_set: list[NlvrExample] | None = None
        self._last_val: dict[str, float] | None = None
        super().setup()
        logger.info("NLVR fine-tuning: %d training pairs, dev %s, test %s",
                    self.loader.epoch_length, len(self.dev) if self.dev else "none",
                    len(self.test_set) if self.test_set else "none")  # fmt: skip

    def _build_loader(self) -> Any:
        """The pair loader; first the [nlvr] files are read (after the rank log is open, before
        anything is built), so a bad annotation ends the run in one line."""
        cfg = self.cfg
        check_nlvr_config(cfg)
        nl = cfg.nlvr
        if nl.dev_annotation:
            self.dev = load_nlvr_annotations(nl.dev_annotation, nl.image_root)
        if nl.test_annotation:
            self.test_set = load_nlvr_annotations(nl.test_annotation, nl.image_root)
        return build_nlvr_train_loader(
            cfg.data, self.tokenizer, cfg.nlvr.train_annotation or "", cfg.nlvr.image_root,
            image_size=cfg.model.image_size, seed=cfg.job.seed, rank=self.dist.rank,
            world_size=self.dist.world_size,
        )  # fmt: skip

    def _build_model_and_momentum(self) -> None:
        """The NLVR model (no momentum state), parallelized and initialised."""
        self.model, self.plan = build_nlvr(self.cfg, self.tokenizer, self.dist, self.compute_dtype)
        self.momentum = None
        self.best = BestWeights(self.output_dir, SELECTION_KEY, to_toml(self.cfg))
        if self.resume_from is None:
            self.best.clear_stale(self.dist.is_main)

    def _build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine over `training.epochs` epochs, constant within an epoch (the reference's)."""
        cfg = self.cfg
        return EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.nlvr.min_lr,
                             self.steps_per_epoch, cfg.training.epochs)  # fmt: skip

    def _build_step(self) -> NlvrStep:
        return NlvrStep.from_config(self.cfg, self.model, self.optimizer, self.lr_scheduler,
                                    self.dist, self.compute_dtype)  # fmt: skip

    def _build_evaluator(self) -> Any:
        return _EpochEndEvaluation(self)

    def _flops_per_sample(self) -> float | None:
        return None  # the pretraining FLOP table does not apply (two images per sample)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        states = super()._checkpoint_states()
        del states[MOMENTUM]
        states[BEST_STATE] = self.best
        return states

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
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def _step_log_fields(self, result: StepResult) -> dict[str, Any]:
        return {}

    def train(self) -> None:
        """Fine-tune (the pretraining loop), then score the test split with the kept weights."""
        super().train()
        if self._stop_signal is None and self.step >= self.total_steps:
            self.final_report()

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


def main(argv: list[str] | None = None) -> int:
    return BlipFinetuneNlvrRecipe.run(argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BlipFinetuneNlvrRecipe", "main"]
