"""BLIP image-text retrieval evaluation (the reference protocol).

Scores every image-text pair of a COCO-Karpathy-style test set with ITC, reranks each query's top
`eval.k_test` candidates with ITM (`[ENC]` first, captions of 35 tokens) and reports recall@1/5/10
for text retrieval (image queries) and image retrieval (text queries), their mean, and the
ITC-only numbers. Features and reranking are split across ranks.

    blip run blip_eval_retrieval --config eval_retrieval eval.checkpoint=outputs/blip_base
    blip run --nproc-per-node 8 blip_eval_retrieval --config eval_retrieval \\
        eval.checkpoint=model_base.pth eval.annotation=data/coco_karpathy_test.json

`eval.checkpoint` may be a DCP checkpoint of the pretraining recipe (or its run folder: newest
step), a reference BLIP `.pth`, a Hugging Face BLIP folder (or a folder of retrieval + captioning
folders), or a consolidated `.pt` / `.safetensors`; or `init`: the model a pretraining run of the
same config starts from (step 0: `model.text_init`, `model.vision_init`, `checkpoint.init_from`),
for a baseline before training. Writes `<job.output_dir>/retrieval.json`, TensorBoard scalars
`retrieval/*`, and prints a table.

The tokenizer is the checkpoint's when it carries one (the tokenizer files of an HF folder, the
`[tokenizer]` recorded in a DCP checkpoint's config.toml / model_args.json) and can be built
here; otherwise the config's `[tokenizer]`. The log names the one used. Images are evaluated at
`model.image_size`, which must be the resolution the checkpoint was trained at (read from its
position embeddings): a mismatch is refused, unless `eval.allow_resolution_change=true`, which
evaluates with interpolated position embeddings and logs a warning.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blip_recipes.config import Config, to_toml
from blip_recipes.evaluation import (
    RetrievalData,
    RetrievalScores,
    load_retrieval_data,
    score_retrieval,
)
from blip_recipes.evaluation.evaluated_model import eval_autocast, load_evaluated_model
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

NAME = "blip_eval_retrieval"
logger = logging.getLogger(NAME)

RESULT_FILE = "retrieval.json"
SCORES_FILE = "retrieval_scores.pt"


def format_table(metrics: dict[str, float]) -> str:
    """Recall table: rows text/image retrieval for ITM-reranked and ITC-only scores."""
    lines = [f"{'':30}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for prefix, label in (("", "ITM rerank"), ("itc_", "ITC only")):
        for side, name in (("txt", "text retrieval"), ("img", "image retrieval")):
            values = [metrics[f"{prefix}{side}_r{k}"] for k in (1, 5, 10)]
            values.append(metrics[f"{prefix}{side}_r_mean"])
            lines.append(f"{name + ' (' + label + ')':30}" + "".join(f"{v:8.2f}" for v in values))
        lines.append(f"{'r_mean (' + label + ')':30}{metrics[prefix + 'r_mean']:8.2f}")
    return "\n".join(lines)


def load_test_set(cfg: Config) -> RetrievalData:
    """`eval.annotation`'s images and captions (COCO-Karpathy-style)."""
    ev = cfg.eval
    if not ev.annotation:
        raise ValueError("set eval.annotation (COCO-Karpathy-style test annotations)")
    return load_retrieval_data(ev.annotation, ev.image_root, cfg.data.max_words)


class RetrievalEvalRecipe:
    """setup -> run -> cleanup; every rank runs all three."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        self.data = load_test_set(cfg)  # before the model: a bad split fails fast
        self.dist = init_distributed(cfg.parallel.device, timeout_s=cfg.job.collective_timeout_s)
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        loaded = load_evaluated_model(cfg, logger)
        self.model, self.tokenizer = loaded.model.to(self.device), loaded.tokenizer
        self.image_size, self.step = loaded.image_size, loaded.step
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
        logger.info(
            "evaluating %s (%s) at %d px on %d images / %d captions, k_test=%d, %d rank(s) on %s",
            loaded.source, loaded.layout, self.image_size, len(self.data.images),
            len(self.data.texts), cfg.eval.k_test, self.dist.world_size, self.device,
        )  # fmt: skip

    def run(self) -> dict[str, float]:
        """Score, then (rank 0) write retrieval.json, TensorBoard scalars and the table."""
        cfg, ev = self.cfg, self.cfg.eval
        start = time.perf_counter()
        with eval_autocast(cfg, self.device):
            scores = score_retrieval(
                self.model, self.tokenizer, self.data,
                k_test=ev.k_test, batch_size=ev.batch_size, text_max_length=ev.text_max_length,
                image_size=self.image_size, num_workers=cfg.data.num_workers,
                device=self.device, progress=ev.progress,
            )  # fmt: skip
        metrics = scores.metrics()
        if self.dist.is_main:
            self._write(metrics, scores, time.perf_counter() - start)
        return metrics

    def _write(self, metrics: dict[str, float], scores: RetrievalScores, seconds: float) -> None:
        (self.output_dir / RESULT_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if self.cfg.eval.save_scores:
            torch.save(scores.to("cpu").__dict__, self.output_dir / SCORES_FILE)
        if self.cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(self.output_dir / "tensorboard")) as writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"retrieval/{key}", value, self.step)
        print(format_table(metrics))
        print(f"({seconds:.1f} s; results in {self.output_dir / RESULT_FILE})")
        sys.stdout.flush()

    def cleanup(self, barrier: bool = True) -> None:
        """Release the models and tear the process group down (``barrier=False`` after a
        failure: see :mod:`blip_recipes.runs.recipe_main`)."""
        for name in ("model", "data"):
            if hasattr(self, name):
                delattr(self, name)
        shutdown_distributed(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_inference_recipe(RetrievalEvalRecipe, argv, __doc__ or "", NAME)


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["RetrievalEvalRecipe", "format_table", "load_test_set", "main"]
