"""BLIP VQA fine-tuning (VQAv2 / OK-VQA-style question files): answer decoder over question states.

    blip run blip_finetune_vqa --config finetune_vqa checkpoint.init_from=CKPT
    blip run --nproc-per-node 8 blip_finetune_vqa --config finetune_vqa

The same library components as the pretraining recipe (run set-up, stop protocol, checkpoints,
metrics), its own loop, with these parts different (see docs/vqa.md):

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
import time
from collections import Counter
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
from blip_recipes.config import Config, ConfigError
from blip_recipes.data import build_tokenizer, normalize_images
from blip_recipes.data.sources import AnnotationError
from blip_recipes.data.vqa import build_vqa_train_loader, load_answer_list, load_vqa_records
from blip_recipes.evaluation.vqa import VqaResult, evaluate_vqa
from blip_recipes.metrics.steps_since_log import StepsSinceLog
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.runs.checkpoints import RunCheckpoints, loader_state, train_state_at
from blip_recipes.runs.nonfinite import NonFiniteRun
from blip_recipes.runs.recipe_main import run_training_recipe
from blip_recipes.runs.training_run import TrainingRun, steps_per_epoch
from blip_recipes.training.build import compute_dtype, set_determinism
from blip_recipes.training.optim import EpochCosineLR, build_optimizer
from blip_recipes.training.step import StepResult
from blip_recipes.training.vqa import VqaBatch, VqaStep, build_vqa

logger = logging.getLogger("blip_finetune_vqa")

RESULT_FILE = "vqa_result.json"


class BlipFinetuneVqaRecipe:
    """Fine-tune a pretrained BLIP model for VQA (module docstring)."""

    METRIC_KEYS = ("loss",)
    BEST_EVAL_KEY = "vqa_accuracy"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.train_state = TrainState()
        self.nonfinite_steps = 0
        self.run = TrainingRun(cfg, "blip_finetune_vqa", logger)
        self.eval_records: Any = None
        self.candidates: Any = None

    @property
    def step(self) -> int:
        """Optimizer steps completed: a view of `train_state.step`, the one counter (saved with
        each checkpoint; the LR scheduler's count is checked against it on resume)."""
        return self.train_state.step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
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
        self.run.start()  # stop handlers, process group, output folder lock, rank log, threads
        run = self.run
        self.dist, self.device, self.output_dir = run.dist, run.device, run.output_dir
        self.checkpoints = RunCheckpoints(self.output_dir, cfg)
        self.resume_from = self.checkpoints.resume_path()
        torch.manual_seed(cfg.job.seed)
        set_determinism(cfg.training.deterministic)
        self.compute_dtype = compute_dtype(cfg.training.mixed_precision, self.device)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        try:
            self.loader = build_vqa_train_loader(cfg.data, self.tokenizer, cfg.model.image_size,
                                                 cfg.job.seed, self.dist.rank,
                                                 self.dist.world_size)  # fmt: skip
        except AnnotationError as e:
            raise ConfigError(str(e)) from None
        self.loader.stop_requested = self.run.stop.requested  # a stuck wait ends
        self.steps_per_epoch = steps_per_epoch(self.loader, cfg)
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        self.model = build_vqa(cfg, self.tokenizer, self.dist, self.compute_dtype)
        self.run.stop.refuse_start_if_requested(self.dist)  # before metrics.jsonl is touched

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        # cosine over `training.epochs` epochs, constant within an epoch
        self.lr_scheduler = EpochCosineLR(self.optimizer, cfg.optimizer.lr, cfg.vqa.min_lr,
                                          self.steps_per_epoch, cfg.training.epochs)  # fmt: skip
        self.step_fn = VqaStep.from_config(cfg, self.model, self.optimizer, self.lr_scheduler,
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
        logger.info(
            "VQA fine-tuning: inference %s%s, evaluation %s", cfg.vqa.inference,
            f" over {len(self.candidates)} candidates (k={cfg.vqa.k_test})"
            if self.candidates else "",
            f"{len(self.eval_records)} questions" if self.eval_records else "none",
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
        }

    def save_checkpoint(self) -> None:
        """Save everything a bitwise resume needs into checkpoints/step-N/."""
        self.checkpoints.save(self.step, self._checkpoint_states())

    # ------------------------------------------------------------------ training
    def _to_device(self, batch: dict[str, torch.Tensor]) -> VqaBatch:  # type: ignore[override]
        def move(key: str) -> torch.Tensor:
            return batch[key].to(self.device, non_blocking=True)

        return VqaBatch(normalize_images(move("images")), move("question_ids"),
                        move("question_mask"), move("answer_ids"), move("answer_mask"),
                        move("answer_weights"), move("answer_question"))  # fmt: skip

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        return self.step_fn([self._to_device(batch) for batch in batches], self.step)

    def train(self) -> None:
        """Fine-tune until `training.steps` (or `epochs`), a stop signal or too many bad steps,
        answering the evaluation questions at the due steps."""
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
            if self.evaluation_due(self.step):
                self.evaluate()
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self.run.check_folder(self.step)
                self.save_checkpoint()
        self.run.check_folder(self.step)
        self.save_checkpoint()
        self.run.log_summary(self.step, self.metrics, self.checkpoints.step_dir(self.step),
                             self.BEST_EVAL_KEY)  # fmt: skip

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

    # ------------------------------------------------------------------ cleanup
    def cleanup(self, barrier: bool = True) -> None:
        """Flush metrics, finish pending saves, release modules, tear the process group down
        and free the output folder (``barrier=False`` after a failure)."""
        for name in ("metrics", "checkpoints"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
        if hasattr(self, "loader"):
            self.loader.close_bad_sample_log()
        for name in ("step_fn", "model", "optimizer", "lr_scheduler", "loader", "dist"):
            if hasattr(self, name):
                delattr(self, name)
        self.run.close(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_training_recipe(BlipFinetuneVqaRecipe, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["BlipFinetuneVqaRecipe", "main"]
