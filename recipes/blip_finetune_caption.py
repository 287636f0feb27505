"""BLIP caption fine-tuning (COCO, Karpathy splits): image encoder + text decoder, LM loss only.

    blip run blip_finetune_caption --config finetune_caption_coco checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_caption --config finetune_caption_coco

The pretraining recipe's loop, checkpoints, stop signals and metrics, with these parts swapped
(see docs/finetune-caption.md):

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
from typing import Any

import torch

from blip_recipes.checkpoint import (
    MOMENTUM,
)
from blip_recipes.config import to_toml
from blip_recipes.data import build_train_loader
from blip_recipes.evaluation.captioning import (
    SELECTION_KEY,
    CaptionData,
    CaptionEvalResult,
    evaluate_captions,
    load_caption_data,
)
from blip_recipes.evaluation.generation import prompt_ids
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.caption import CaptionStep, PromptedTokenizer, build_captioning
from blip_recipes.training.optim import EpochCosineLR
from blip_recipes.training.step import StepResult
from recipes.blip_pretrain import BlipPretrainRecipe

logger = logging.getLogger("blip_finetune_caption")

BEST_STATE = "caption_best"
"""Checkpoint key of the best validation score so far (a resumed run keeps comparing to it)."""
BEST_RECORD = "caption_best.json"


class _EpochEndEvaluation:
    """What the training loop calls after every step: validation at the due steps."""

    def __init__(self, recipe: BlipFinetuneCaptionRecipe) -> None:
        self.recipe = recipe

    def maybe_run(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        if not self.recipe.validation_due(step):
            return None
        return self.recipe.validate()


class BlipFinetuneCaptionRecipe(BlipPretrainRecipe):
    """Fine-tune a pretrained BLIP model for captioning (module docstring)."""

    METRIC_KEYS = ("loss",)
    BEST_EVAL_KEY = f"val_{SELECTION_KEY}"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.val_data: CaptionData | None = None
        self.test_data: CaptionData | None = None
        if cfg.eval.annotation:
            self.val_data = load_caption_data(cfg.eval.annotation, cfg.eval.image_root)
        if cfg.caption.test_annotation:
            self.test_data = load_caption_data(cfg.caption.test_annotation, cfg.eval.image_root)
        super().setup()
        logger.info(
            "caption fine-tuning: prompt %r (%d tokens excluded from the loss), validation %s, "
            "test %s", cfg.caption.prompt, self.prompt_length,
            f"{len(self.val_data.images)} images" if self.val_data else "none",
            f"{len(self.test_data.images)} images" if self.test_data else "none",
        )  # fmt: skip

    def _build_loader(self) -> Any:
        """The training loader, tokenizing `caption.prompt + pre_caption(caption)`."""
        cfg = self.cfg
        return build_train_loader(
            cfg.data,
            PromptedTokenizer(self.tokenizer, cfg.caption.prompt),
            image_size=cfg.model.image_size,
            seed=cfg.job.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _build_model_and_momentum(self) -> None:
        """The captioning model (no momentum state), parallelized and initialised."""
        self.model, self.plan = build_captioning(
            self.cfg, self.tokenizer, self.dist, self.compute_dtype
        )
        self.momentum = None
        self.best = BestWeights(self.output_dir, SELECTION_KEY, to_toml(self.cfg))
        if self.resume_from is None:  # a fresh start owns best/ and the best record
            self.best.clear_stale(self.dist.is_main)
            if self.dist.is_main:
                (self.output_dir / BEST_RECORD).unlink(missing_ok=True)

    def _build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine over `training.epochs` epochs, constant within an epoch."""
        cfg = self.cfg
        return EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.caption.min_lr,
                             self.steps_per_epoch, cfg.training.epochs)  # fmt: skip

    def _build_step(self) -> CaptionStep:
        self.prompt_length = len(prompt_ids(self.tokenizer, self.cfg.caption.prompt))
        return CaptionStep.from_config(
            self.cfg, self.model, self.optimizer, self.lr_scheduler, self.dist,
            self.compute_dtype, prompt_length=self.prompt_length,
        )  # fmt: skip

    def _build_evaluator(self) -> Any:
        return _EpochEndEvaluation(self)

    def _flops_per_sample(self) -> float | None:
        return None  # the pretraining FLOP table does not apply (no ITC/ITM, longer captions)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        states = super()._checkpoint_states()
        del states[MOMENTUM]
        states[BEST_STATE] = self.best
        return states

    # ------------------------------------------------------------------ training
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `CaptionStep`)."""
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def _step_log_fields(self, result: StepResult) -> dict[str, Any]:
        return {}

    def train(self) -> None:
        """Fine-tune (the pretraining loop), then score the test split with the kept weights."""
        super().train()
        if self._stop_signal is None and self.test_data is not None:
            self.test()

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


def main(argv: list[str] | None = None) -> int:
    return BlipFinetuneCaptionRecipe.run(argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["BlipFinetuneCaptionRecipe", "main"]
