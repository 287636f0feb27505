"""BLIP image-text retrieval fine-tuning (COCO, Flickr30k): ITC + ITM, positives by image id.

    blip run blip_finetune_retrieval --config finetune_retrieval_coco \\
        checkpoint.init_from=outputs/blip_base/checkpoints/step-N
    blip run --nproc-per-node 8 blip_finetune_retrieval --config finetune_retrieval_flickr key=value

The pretraining recipe's loop, checkpoints (bitwise resume), stop signals, metrics and parallel
set-up, with what fine-tuning changes (docs/finetune-retrieval.md):

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
from dataclasses import replace
from typing import Any

import torch

from blip_recipes.config import Config, to_toml
from blip_recipes.data import normalize_images
from blip_recipes.evaluation.retrieval import evaluate_retrieval
from blip_recipes.evaluation.retrieval_data import RetrievalData, load_retrieval_data
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.training.best_weights import BestWeights
from blip_recipes.training.build import build_pretraining
from blip_recipes.training.momentum import MomentumState
from blip_recipes.training.optim import EpochCosineLR
from blip_recipes.training.retrieval import RetrievalBatch, RetrievalStep
from blip_recipes.training.retrieval_setup import SELECTION_KEY, freeze_decoder, load_pretrained
from recipes.blip_eval_retrieval import format_table
from recipes.blip_pretrain import BlipPretrainRecipe

logger = logging.getLogger("blip_finetune_retrieval")

BEST_KEY = "retrieval_best"
"""Checkpoint key of the best validation result so far."""
RESULT_FILE = "retrieval_finetune.json"


class BlipFinetuneRetrievalRecipe(BlipPretrainRecipe):
    """Fine-tune a BLIP model for image-text retrieval (module docstring)."""

    METRIC_KEYS = ("loss", "loss_ita", "loss_itm", "itm_acc", "itm_pos_prob", "itm_neg_prob")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.val_data: RetrievalData | None = None
        self.test_data: RetrievalData | None = None
        self._last_val_record: dict[str, float] | None = None

    # ------------------------------------------------------------------ set-up hooks
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

    def _build_lr_scheduler(self) -> EpochCosineLR:
        """Per-epoch cosine over `training.epochs` (or more, when `training.steps` asks for
        more steps): a run cut short with `training.steps` follows the same schedule."""
        cfg = self.cfg
        epochs = max(cfg.training.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        return EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.lr_scheduler.min_lr,
                             self.steps_per_epoch, epochs)  # fmt: skip

    def _build_step(self) -> RetrievalStep:
        return RetrievalStep.from_config(
            self.cfg, self.model, self.optimizer, self.lr_scheduler, self.dist,
            self.compute_dtype, momentum=self.momentum,
        )  # fmt: skip

    def _build_evaluator(self) -> BlipFinetuneRetrievalRecipe:
        """The recipe evaluates itself at epoch ends (`maybe_run`); the best weights go to
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
        return self

    def _flops_per_sample(self) -> None:
        return None  # the tabulated FLOPs are pretraining's (224 px, with the decoder)

    def _checkpoint_states(self) -> dict[str, Any]:
        states = super()._checkpoint_states()
        states[BEST_KEY] = self.best
        return states

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

    def maybe_run(self, step: int, model: Any = None) -> dict[str, float] | None:
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
    def train(self) -> None:
        super().train()
        if self.step >= self.total_steps:
            self.final_report()

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


def main(argv: list[str] | None = None) -> int:
    return BlipFinetuneRetrievalRecipe.run(argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BlipFinetuneRetrievalRecipe", "main"]
