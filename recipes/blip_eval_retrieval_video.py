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

import logging
import sys
from typing import Any

from blip_recipes.evaluation import RetrievalData, RetrievalScores
from blip_recipes.evaluation.video_retrieval import (
    load_video_retrieval_data,
    missing_videos,
    score_video_retrieval,
    video_retrieval_metrics,
)
from blip_recipes.runs.recipe_main import run_inference_recipe
from recipes.blip_eval_retrieval import RetrievalEvalRecipe

NAME = "blip_eval_retrieval_video"
logger = logging.getLogger(NAME)


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


class VideoRetrievalEvalRecipe(RetrievalEvalRecipe):
    """The image retrieval evaluation with videos as the visual side."""

    name = NAME
    result_file = "video_retrieval.json"
    scalar_prefix = "video_retrieval"
    media = "videos"

    def _check_data_settings(self) -> None:
        if not self.cfg.video.annotation:
            raise ValueError("set video.annotation (MSRVTT-style test annotations)")
        from blip_recipes.data.video import require_av

        require_av()

    def _load_data(self) -> RetrievalData:
        video = self.cfg.video
        data = load_video_retrieval_data(
            video.annotation, video.root, self.cfg.data.max_words, video.suffix
        )
        missing = missing_videos(data)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(data.images)} videos of {video.annotation} are not "
                f"files, e.g. {missing[0]} (video.root={video.root!r})"
            )
        logger.info("%d frames per video", video.num_frames)
        return data

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

    def _metrics(self, scores: RetrievalScores) -> dict[str, float]:
        return video_retrieval_metrics(scores)

    def _table(self, metrics: dict[str, float]) -> str:
        return format_video_table(metrics)


def main(argv: list[str] | None = None) -> int:
    return run_inference_recipe(
        VideoRetrievalEvalRecipe, argv, __doc__ or "", NAME, failures=(ImportError,)
    )


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["VideoRetrievalEvalRecipe", "format_video_table", "main"]
