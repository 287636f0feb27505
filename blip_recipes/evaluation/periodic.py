"""Retrieval evaluation and sample captions every ``eval.every_steps`` during pretraining."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from blip_recipes.config.sections import EvalConfig
from blip_recipes.evaluation.retrieval import evaluate_retrieval
from blip_recipes.evaluation.retrieval_data import RetrievalData, load_retrieval_data
from blip_recipes.parallel.fsdp import reshard_all

logger = logging.getLogger(__name__)


class PeriodicEvaluator:
    """Runs the reference retrieval protocol on a held-out set and captions a few fixed images.

    Collective: every rank calls :meth:`maybe_run` at the same steps (the evaluation splits its
    work across ranks). Results go to the metrics logger (``eval.jsonl``, TensorBoard ``eval/*``,
    the captions as TensorBoard text and as an image grid with each caption under its image).

    Args:
        cfg: the ``[eval]`` section (``every_steps``, ``annotation``, ``k_test``...).
        tokenizer: the run's tokenizer.
        metrics: the run's :class:`~blip_recipes.metrics.MetricsLogger`.
        image_size: the model's input size.
        max_words: caption cleaning length (``data.max_words``).
    """

    def __init__(
        self, cfg: EvalConfig, tokenizer: Any, metrics: Any, image_size: int, max_words: int
    ) -> None:
        self.cfg, self.tokenizer, self.metrics, self.image_size = (
            cfg,
            tokenizer,
            metrics,
            image_size,
        )
        self.data: RetrievalData | None = None
        if cfg.every_steps > 0:
            if not cfg.annotation:
                raise ValueError("eval.every_steps > 0 needs eval.annotation (a held-out set)")
            self.data = load_retrieval_data(cfg.annotation, cfg.image_root, max_words)

    def due(self, step: int) -> bool:
        return self.data is not None and step % self.cfg.every_steps == 0

    def maybe_run(self, step: int, model: nn.Module) -> dict[str, float] | None:
        """Evaluate at multiples of ``every_steps``; returns the metrics there, else None."""
        if not self.due(step):
            return None
        assert self.data is not None
        from blip_recipes.evaluation.generation import caption_images

        results = evaluate_retrieval(
            model,
            self.tokenizer,
            self.data,
            k_test=self.cfg.k_test,
            batch_size=self.cfg.batch_size,
            text_max_length=self.cfg.text_max_length,
            image_size=self.image_size,
        )
        self.metrics.log_eval(step, results)
        images = list(self.data.images[: self.cfg.num_captions])
        if images:
            captions = caption_images(
                model, self.tokenizer, images, method="greedy", image_size=self.image_size
            )
            text = "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions))
            self.metrics.log_text("eval/captions", text, step)
            self.metrics.log_images(step, "eval/captioned_images", images, captions)
        reshard_all(model)  # evaluation ran forwards only (both calls restore train mode)
        return results
