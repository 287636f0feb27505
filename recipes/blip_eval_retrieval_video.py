"""BLIP zero-shot video-text retrieval (the reference's MSRVTT evaluation).

An image-text model (pretrained, or fine-tuned for COCO retrieval as the reference evaluates)
scores videos it never trained on: `video.num_frames` frames per video, sampled uniformly
(frame i * floor(length / N)) and resized to `model.image_size`, each through the ViT; the
frames' projected `[CLS]` features are averaged for ITC and their token embeddings
concatenated for ITM. Every query's top `eval.k_test` candidates by ITC are reranked with ITM
logit + ITC similarity, as for images. Reports recall@1/5/10 of text retrieval (video queries,
`txt_r*`) and video retrieval (text queries, `vid_r*`), the median rank `vid_mdR`, and the
ITC-only numbers. Videos, ITC and reranking are split across ranks.

    blip run blip_eval_retrieval_video --config eval_retrieval_msrvtt \\
        eval.checkpoint=model_base_retrieval_coco.pth video.root=data/msrvtt/videos
    blip run --nproc-per-node 8 blip_eval_retrieval_video --config eval_retrieval_msrvtt \\
        eval.checkpoint=outputs/finetune_retrieval_coco/best/step-N

`video.annotation`: MSRVTT-style JSON/JSONL, `{"clip_name": "video7010", "caption": "..."}`
(file `<video.root>/<clip_name><video.suffix>`) or `{"video": path, "caption": text or list}`.
Decoding needs PyAV: `pip install blip-recipes[video]`. `eval.checkpoint` takes every format
`blip_eval_retrieval` does. Writes `<job.output_dir>/video_retrieval.json`, TensorBoard scalars
`video_retrieval/*`, and prints a table.
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
from blip_recipes.evaluation import RetrievalData, RetrievalScores
from blip_recipes.evaluation.evaluated_model import eval_autocast, load_evaluated_model
from blip_recipes.evaluation.video_retrieval import (
    load_video_retrieval_data,
    missing_videos,
    score_video_retrieval,
    video_retrieval_metrics,
)
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

NAME = "blip_eval_retrieval_video"
logger = logging.getLogger(NAME)

RESULT_FILE = "video_retrieval.json"
SCORES_FILE = "retrieval_scores.pt"


def format_video_table(metrics: dict[str, float]) -> str:
    """Recall table: text and video retrieval, ITM-reranked and ITC-only, with median ranks."""
    lines = [f"{'':30}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}{'MdR':>8}"]
    for prefix, label in (("", "ITM rerank"), ("itc_", "ITC only")):
        for side, name in (("txt", "text retrieval"), ("vid", "video retrieval")):
            values = [metrics[f"{prefix}{side}_r{k}"] for k in (1, 5, 10)]
            values += [metrics[f"{prefix}{side}_r_mean"], metrics[f"{prefix}{side}_mdR"]]
            lines.append(f"{name + ' (' + label + ')':30}" + "".join(f"{v:8.2f}" for v in values))
        lines.append(f"{'r_mean (' + label + ')':30}{metrics[prefix + 'r_mean']:8.2f}")
    return "\n".join(lines)


def load_videos(cfg: Config) -> RetrievalData:
    """The `[video]` section's annotations, every video file checked to exist."""
    video = cfg.video
    if not video.annotation:
        raise ValueError("set video.annotation (MSRVTT-style test annotations)")
    from blip_recipes.data.video import require_av

    require_av()
    data = load_video_retrieval_data(video.annotation, video.root, cfg.data.max_words, video.suffix)
    missing = missing_videos(data)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(data.images)} videos of {video.annotation} are not "
            f"files, e.g. {missing[0]} (video.root={video.root!r})"
        )
    return data


class VideoRetrievalEvalRecipe:
    """setup -> run -> cleanup; every rank runs all three."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        self.data = load_videos(cfg)  # before the model: a bad split fails fast
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
            "evaluating %s (%s) at %d px on %d videos x %d frames / %d captions, k_test=%d, "
            "%d rank(s) on %s", loaded.source, loaded.layout, self.image_size,
            len(self.data.images), cfg.video.num_frames, len(self.data.texts), cfg.eval.k_test,
            self.dist.world_size, self.device,
        )  # fmt: skip

    def run(self) -> dict[str, float]:
        """Score, then (rank 0) write video_retrieval.json, TensorBoard scalars and the table."""
        start = time.perf_counter()
        with eval_autocast(self.cfg, self.device):
            scores = self._score()
        metrics = video_retrieval_metrics(scores)
        if self.dist.is_main:
            self._write(metrics, scores, time.perf_counter() - start)
        return metrics

    def _score(self) -> RetrievalScores:
        cfg, ev = self.cfg, self.cfg.eval
        try:
            return score_video_retrieval(
                self.model, self.tokenizer, self.data, num_frames=cfg.video.num_frames,
                k_test=ev.k_test, batch_size=ev.batch_size, text_max_length=ev.text_max_length,
                image_size=self.image_size, num_workers=cfg.data.num_workers,
                device=self.device, progress=ev.progress,
            )  # fmt: skip
        except ValueError as e:  # a video that does not decode, maybe inside a loader worker
            message = str(e).strip().splitlines()[-1].removeprefix("ValueError: ")
        # raised outside the handler: the loader and its workers are released first
        raise ValueError(message)

    def _write(self, metrics: dict[str, float], scores: RetrievalScores, seconds: float) -> None:
        (self.output_dir / RESULT_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if self.cfg.eval.save_scores:
            torch.save(scores.to("cpu").__dict__, self.output_dir / SCORES_FILE)
        if self.cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(self.output_dir / "tensorboard")) as writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"video_retrieval/{key}", value, self.step)
        print(format_video_table(metrics))
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
    return run_inference_recipe(VideoRetrievalEvalRecipe, argv, __doc__ or "", NAME,
                                user_errors=(ImportError,))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["VideoRetrievalEvalRecipe", "format_video_table", "load_videos", "main"]
