"""BLIP VQA fine-tuning (VQAv2 / OK-VQA-style question files): answer decoder over question states.

    blip run blip_finetune_vqa --config finetune_vqa checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_vqa --config finetune_vqa

The pretraining recipe's loop, checkpoints, stop signals and metrics, with these parts swapped
(see docs/vqa.md):

- data: VQA question records (`data.sources`, kind json/jsonl); each distinct answer of a
  question is one decoder row weighted by its share of the annotators (`data.vqa`);
- model: `BlipVQA` (ViT, question encoder, answer decoder), started from
  `checkpoint.init_from` (a pretraining model: its text encoder and decoder; or a VQA model in
  any layout), ViT position embedding interpolated to `model.image_size`;
- step: `VqaStep` (the reference's weighted, label-smoothed answer loss);
- LR: cosine over epochs (`optimizer.lr` -> `vqa.min_lr` over `training.epochs`), constant
  within an epoch;
- evaluation: every `vqa.eval_every_epochs` epochs and after the last step the questions of
  `eval.annotation` are answered across ranks (`vqa.inference`: rank `vqa.answer_list` or
  generate), written in the official results format and, when the records have answers,
  scored with the VQA accuracy; TensorBoard shows `vqa.num_examples` images with their
  question and predicted answer.

Writes, besides the pretraining recipe's files: `results/vqa_step<N>.json` (every evaluation)
and `vqa_result.json` (the last), `[{"question_id", "answer"}]`; the accuracy in `eval.jsonl`.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import Any

import torch

from blip_recipes.checkpoint import MOMENTUM
from blip_recipes.config import ConfigError
from blip_recipes.data import normalize_images
from blip_recipes.data.sources import AnnotationError
from blip_recipes.data.vqa import build_vqa_train_loader, load_answer_list, load_vqa_records
from blip_recipes.evaluation.vqa import VqaResult, evaluate_vqa
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.training.optim import EpochCosineLR
from blip_recipes.training.step import StepResult
from blip_recipes.training.vqa import VqaBatch, VqaStep, build_vqa
from recipes.blip_pretrain import BlipPretrainRecipe

logger = logging.getLogger("blip_finetune_vqa")

RESULT_FILE = "vqa_result.json"


class _Evaluation:
    """What the training loop calls after every step: the evaluation split at the due steps."""

    def __init__(self, recipe: BlipFinetuneVqaRecipe) -> None:
        self.recipe = recipe

    def maybe_run(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        if not self.recipe.evaluation_due(step):
            return None
        return self.recipe.evaluate()


class BlipFinetuneVqaRecipe(BlipPretrainRecipe):
    """Fine-tune a pretrained BLIP model for VQA (module docstring)."""

    METRIC_KEYS = ("loss",)
    BEST_EVAL_KEY = "vqa_accuracy"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.eval_records, self.candidates = None, None
        try:
            if cfg.eval.annotation:
                self.eval_records = load_vqa_records(cfg.eval.annotation, cfg.eval.image_root,
                                                     need_answers=False)  # fmt: skip
            if cfg.vqa.inference == "rank":
                if not cfg.vqa.answer_list:
                    raise ConfigError(
                        "vqa.inference='rank' needs 'vqa.answer_list' (a JSON list of candidate "
                        "answers); set it, or vqa.inference='generate'"
                    )
                self.candidates = load_answer_list(cfg.vqa.answer_list)
        except AnnotationError as e:
            raise ConfigError(str(e)) from None
        super().setup()
        logger.info(
            "VQA fine-tuning: inference %s%s, evaluation %s", cfg.vqa.inference,
            f" over {len(self.candidates)} candidates (k={cfg.vqa.k_test})"
            if self.candidates else "",
            f"{len(self.eval_records)} questions" if self.eval_records else "none",
        )  # fmt: skip

    def _build_loader(self) -> Any:
        cfg = self.cfg
        try:
            return build_vqa_train_loader(cfg.data, self.tokenizer, cfg.model.image_size,
                                          cfg.job.seed, self.dist.rank,
                                          self.dist.world_size)  # fmt: skip
        except AnnotationError as e:
            raise ConfigError(str(e)) from None

    def _build_model_and_momentum(self) -> None:
        self.model = build_vqa(self.cfg, self.tokenizer, self.dist, self.compute_dtype)
        self.momentum = None

    def _build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine over `training.epochs` epochs, constant within an epoch."""
        cfg = self.cfg
        return EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.vqa.min_lr,
                             self.steps_per_epoch, cfg.training.epochs)  # fmt: skip

    def _build_step(self) -> VqaStep:
        return VqaStep.from_config(self.cfg, self.model, self.optimizer, self.lr_scheduler,
                                   self.dist, self.compute_dtype)  # fmt: skip

    def _build_evaluator(self) -> Any:
        return _Evaluation(self)

    def _flops_per_sample(self) -> float | None:
        return None  # the pretraining FLOP table does not apply

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        states = super()._checkpoint_states()
        del states[MOMENTUM]
        return states

    # ------------------------------------------------------------------ training
    def _to_device(self, batch: dict[str, torch.Tensor]) -> VqaBatch:  # type: ignore[override]
        def move(key: str) -> torch.Tensor:
            return batch[key].to(self.device, non_blocking=True)

        return VqaBatch(normalize_images(move("images")), move("question_ids"),
                        move("question_mask"), move("answer_ids"), move("answer_mask"),
                        move("answer_weights"), move("answer_question"))  # fmt: skip

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def _step_log_fields(self, result: StepResult) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ evaluation
    def evaluation_due(self, step: int) -> bool:
        """At every `vqa.eval_every_epochs` epochs (0: never) and after the last step."""
        if self.eval_records is None:
            return False
        every = self.cfg.vqa.eval_every_epochs * self.steps_per_epoch
        return step == self.total_steps or (every > 0 and step % every == 0)

    def _autocast(self) -> Any:
        dtype = self.compute_dtype
        if self.dist.sharded or dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def answer_split(self) -> VqaResult:
        """Answer (and score) the evaluation split with the current weights (collective)."""
        cfg, vqa = self.cfg, self.cfg.vqa
        assert self.eval_records is not None
        with self._autocast():
            result = evaluate_vqa(
                self.model, self.tokenizer, self.eval_records, inference=vqa.inference,
                candidates=self.candidates, k=vqa.k_test, image_size=cfg.model.image_size,
                batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                device=self.device, num_beams=vqa.num_beams, max_length=vqa.max_length,
                min_length=vqa.min_length,
            )  # fmt: skip
        reshard_all(self.model)
        return result

    def evaluate(self) -> dict[str, float]:
        """Answer the evaluation split, write the results file, log the accuracy and examples."""
        result = self.answer_split()
        epoch = self.step / self.steps_per_epoch
        values: dict[str, float] = {"epoch": epoch}
        if result.accuracy is not None:
            values["vqa_accuracy"] = result.accuracy
        if self.dist.is_main:
            result.write(self.output_dir / "results" / f"vqa_step{self.step}.json")
            if self.step == self.total_steps:
                result.write(self.output_dir / RESULT_FILE)
            self.metrics.log_eval(self.step, values)
            self._log_examples(result)
        accuracy = "" if result.accuracy is None else f", VQA accuracy {100 * result.accuracy:.2f}"
        logger.info("evaluation at step %d (epoch %.2f): %d questions answered%s", self.step,
                    epoch, len(result.answers), accuracy)  # fmt: skip
        return values

    def _log_examples(self, result: VqaResult) -> None:
        """TensorBoard / W&B: the first `vqa.num_examples` images, question and answers."""
        assert self.eval_records is not None
        records = self.eval_records[: self.cfg.vqa.num_examples]
        if not records:
            return
        captions = []
        for record, answer in zip(records, result.answers):
            counts = Counter(record.answers).most_common()
            truth = ", ".join(f"{a} x{n}" for a, n in counts)
            captions.append(
                f"Q: {record.question}  A: {answer}" + (f"  ({truth})" if truth else "")
            )
        self.metrics.log_text("eval/vqa_answers", "\n\n".join(captions), self.step)
        self.metrics.log_images(
            self.step, "eval/vqa_examples", [r.image for r in records], captions
        )


def main(argv: list[str] | None = None) -> int:
    return BlipFinetuneVqaRecipe.run(argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["BlipFinetuneVqaRecipe", "main"]
