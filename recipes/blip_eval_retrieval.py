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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from blip_recipes.config import Config, to_toml
from blip_recipes.data import build_tokenizer
from blip_recipes.evaluation import RetrievalScores, load_retrieval_data, score_retrieval
from blip_recipes.evaluation.evaluated_model import (  # noqa: F401 - INIT: part of this recipe's names
    INIT,
    _describe_tokenizer,
    _initial_model,
    _step_of,
)
from blip_recipes.interop.loading import build_model_from_weights, tokenizer_from_weights
from blip_recipes.interop.readers import CheckpointWeights, read_weights
from blip_recipes.models.inputs import model_image_size
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

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


class RetrievalEvalRecipe:
    """setup -> run (evaluate) -> cleanup; every rank runs all three.

    A subclass evaluating other media (videos) or another task on the same checkpoint loading
    replaces the data hooks: `_check_data_settings`, `_load_data`, `_describe_data`, `_score`,
    `_metrics`, `_table`, and the class attributes below.
    """

    name = "blip_eval_retrieval"
    result_file = RESULT_FILE
    scalar_prefix = "retrieval"
    media = "images"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log = logging.getLogger(self.name)

    def _check_data_settings(self) -> None:
        if not self.cfg.eval.annotation:
            raise ValueError("set eval.annotation (COCO-Karpathy-style test annotations)")

    def _load_data(self) -> Any:
        ev = self.cfg.eval
        return load_retrieval_data(ev.annotation, ev.image_root, self.cfg.data.max_words)

    def _describe_data(self) -> str:
        data, k_test = self.data, self.cfg.eval.k_test
        return f"{len(data.images)} {self.media} / {len(data.texts)} captions, k_test={k_test}"

    def _score(self) -> RetrievalScores:
        cfg, ev = self.cfg, self.cfg.eval
        return score_retrieval(
            self.model, self.tokenizer, self.data,
            k_test=ev.k_test, batch_size=ev.batch_size, text_max_length=ev.text_max_length,
            image_size=self.image_size, num_workers=cfg.data.num_workers,
            device=self.device, progress=ev.progress,
        )  # fmt: skip

    def _metrics(self, scores: RetrievalScores) -> dict[str, float]:
        return scores.metrics()

    def _table(self, metrics: dict[str, float]) -> str:
        return format_table(metrics)

    def setup(self) -> None:
        cfg, ev = self.cfg, self.cfg.eval
        if not ev.checkpoint:
            raise ValueError(
                "set eval.checkpoint (a DCP checkpoint, reference .pth or HF folder, or init)"
            )
        self._check_data_settings()
        self.dist = init_distributed(cfg.parallel.device, timeout_s=cfg.job.collective_timeout_s)
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        self.data = self._load_data()  # before the model: a bad split fails fast
        if ev.checkpoint == INIT:
            self.tokenizer = build_tokenizer(cfg.tokenizer)
            self.log.info(
                "tokenizer: %s", _describe_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
            )
            self.model = _initial_model(cfg, self.tokenizer)
            source, layout, self.step = "the initial weights of this config", "step 0", 0
        else:
            weights = read_weights(ev.checkpoint)
            self.tokenizer = self._tokenizer_for(weights)
            recorded = weights.model_args or weights.hf_config
            self.model = build_model_from_weights(
                weights, model_name=None if recorded else cfg.model.name, tokenizer=self.tokenizer
            )
            source, layout, self.step = weights.source, weights.layout, _step_of(weights.source)
        self.image_size = self._resolution(source)
        self.model = self.model.to(self.device)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
        self.log.info(
            "evaluating %s (%s) at %d px on %s, %d rank(s) on %s",
            source, layout, self.image_size, self._describe_data(), self.dist.world_size,
            self.device,
        )  # fmt: skip

    def _tokenizer_for(self, weights: CheckpointWeights) -> Any:
        """The tokenizer stored with the checkpoint (HF folder, DCP config.toml or
        model_args.json) when it can be built; else the config's [tokenizer] section."""
        recorded = tokenizer_from_weights(weights)
        section = weights.tokenizer or {}
        if recorded is not None:
            self.log.info(
                "tokenizer: recorded with the checkpoint, %s",
                _describe_tokenizer(section.get("kind"), section.get("path")),
            )
            return recorded
        if section:
            self.log.warning(
                "tokenizer recorded with %s (%s) is not available here; using the config's "
                "[tokenizer] instead",
                weights.source, _describe_tokenizer(section.get("kind"), section.get("path")),
            )  # fmt: skip
        tok = self.cfg.tokenizer
        self.log.info(
            "tokenizer: from the config's [tokenizer], %s", _describe_tokenizer(tok.kind, tok.path)
        )
        return build_tokenizer(tok)

    def _resolution(self, source: str) -> int:
        """model.image_size when it is the resolution the model was trained at; otherwise an
        error, or (eval.allow_resolution_change) a loud warning."""
        trained = model_image_size(self.model)
        wanted = self.cfg.model.image_size
        if wanted == trained:
            self.log.info("resolution: %d px (the checkpoint's)", trained)
            return wanted
        message = (
            f"{source} was trained at {trained} px but model.image_size is {wanted}: evaluating "
            "at another resolution interpolates the position embeddings and usually lowers the "
            "scores."
        )
        if not self.cfg.eval.allow_resolution_change:
            raise ValueError(
                f"{message} Set model.image_size={trained}, or eval.allow_resolution_change=true "
                f"to evaluate at {wanted} px anyway"
            )
        self.log.warning(
            "%s Evaluating at %d px because eval.allow_resolution_change=true", message, wanted
        )
        return wanted

    def _autocast(self):
        choice = self.cfg.training.mixed_precision
        if choice == "auto":
            choice = "bf16" if self.device.type == "cuda" else "fp32"
        if choice == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def run(self) -> dict[str, float]:
        """Score, then (rank 0) write retrieval.json, TensorBoard scalars and the table."""
        start = time.perf_counter()
        with self._autocast():
            scores = self._score()
        metrics = self._metrics(scores)
        if self.dist.is_main:
            self._write(metrics, scores, time.perf_counter() - start)
        return metrics

    def _write(self, metrics: dict[str, float], scores: RetrievalScores, seconds: float) -> None:
        (self.output_dir / self.result_file).write_text(json.dumps(metrics, indent=2) + "\n")
        if self.cfg.eval.save_scores:
            torch.save(scores.to("cpu").__dict__, self.output_dir / SCORES_FILE)
        if self.cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(self.output_dir / "tensorboard")) as writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"{self.scalar_prefix}/{key}", value, self.step)
        print(self._table(metrics))
        print(f"({seconds:.1f} s; results in {self.output_dir / self.result_file})")
        sys.stdout.flush()

    def cleanup(self) -> None:
        for name in ("model", "data"):
            if hasattr(self, name):
                delattr(self, name)
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    return run_inference_recipe(RetrievalEvalRecipe, argv, __doc__ or "", "blip_eval_retrieval")


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["RetrievalEvalRecipe", "format_table", "main"]
