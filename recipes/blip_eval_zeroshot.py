"""BLIP zero-shot image classification: class prompts through ITC, optionally reranked by ITM.

    blip run blip_eval_zeroshot --config eval_zeroshot eval.checkpoint=outputs/blip_base \\
        zeroshot.image_folder=data/imagenette/val
    blip run --nproc-per-node 8 blip_eval_zeroshot --config eval_zeroshot zeroshot.rerank_k=5

Every class name is put into each of `zeroshot.templates`; the prompts' unit-norm ITC text
features are averaged per class and normalised again (CLIP's zero-shot protocol). Each image's
class scores are its ITC feature's cosine similarities with them: top-1 and top-5 accuracy.
With `zeroshot.rerank_k=k` each image's top-k classes are re-scored with the ITM head (match
logit averaged over the templates + ITC similarity), as BLIP's retrieval protocol reranks.
Images are split across ranks. Data: `zeroshot.image_folder` (one subfolder per class), or
`zeroshot.annotation` records with `zeroshot.classes`.

`eval.checkpoint` is read as by blip_eval_retrieval (a pretraining run's DCP checkpoint or run
folder, reference .pth, HF folder, consolidated file, or `init`). Writes
`<job.output_dir>/zeroshot.json` (metrics, classes, templates, each image's top-5 classes),
TensorBoard scalars `zeroshot/*` and a grid of the first images with label and prediction.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from blip_recipes.config import Config, to_toml
from blip_recipes.evaluation.evaluated_model import eval_autocast, load_evaluated_model
from blip_recipes.evaluation.zeroshot import (
    ClassificationData,
    ZeroShotResult,
    evaluate_zeroshot,
    load_annotated,
    load_image_folder,
)
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

NAME = "blip_eval_zeroshot"
logger = logging.getLogger(NAME)

RESULT_FILE = "zeroshot.json"
SHOWN_IMAGES = 8
"""Images drawn with their label and prediction into TensorBoard."""


def load_classification(cfg: Config) -> ClassificationData:
    """The `[zeroshot]` section's images, labels and class names."""
    zs = cfg.zeroshot
    if zs.annotation:
        if not zs.classes:
            raise ValueError("zeroshot.annotation needs zeroshot.classes (a JSON class list)")
        return load_annotated(zs.annotation, zs.classes, zs.image_folder or "")
    if not zs.image_folder:
        raise ValueError("set zeroshot.image_folder (root/<class>/<images>) or zeroshot.annotation")
    return load_image_folder(zs.image_folder)


class ZeroShotEvalRecipe:
    """setup -> run -> cleanup; every rank runs all three."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        self.data = load_classification(cfg)  # before the model: bad data fails fast
        self.dist = init_distributed(cfg.parallel.device, timeout_s=cfg.job.collective_timeout_s)
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        loaded = load_evaluated_model(cfg, logger)
        self.model, self.tokenizer = loaded.model.to(self.device), loaded.tokenizer
        self.image_size, self.step = loaded.image_size, loaded.step
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
        logger.info("zero-shot: %s at %d px, %d images, %d classes, %d templates, rerank top-%d, "
                    "%d rank(s) on %s", loaded.source, self.image_size, len(self.data.images),
                    len(self.data.classes), len(cfg.zeroshot.templates), cfg.zeroshot.rerank_k,
                    self.dist.world_size, self.device)  # fmt: skip

    def run(self) -> dict[str, float]:
        """Classify (all ranks), then (rank 0) write zeroshot.json, TensorBoard and a line."""
        cfg, ev = self.cfg, self.cfg.eval
        start = time.perf_counter()
        with eval_autocast(cfg, self.device):
            result = evaluate_zeroshot(
                self.model, self.tokenizer, self.data, cfg.zeroshot.templates,
                image_size=self.image_size, device=self.device, batch_size=ev.batch_size,
                rerank_k=cfg.zeroshot.rerank_k, num_workers=cfg.data.num_workers,
                text_max_length=ev.text_max_length,
            )  # fmt: skip
        if self.dist.is_main:
            self._write_result(result, time.perf_counter() - start)
        return result.metrics

    def _write_result(self, result: ZeroShotResult, seconds: float) -> None:  # rank 0
        cfg = self.cfg
        report = {"metrics": result.metrics, "classes": self.data.classes,
                  "templates": list(cfg.zeroshot.templates), "checkpoint": cfg.eval.checkpoint,
                  "predictions": result.records(self.data)}  # fmt: skip
        (self.output_dir / RESULT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        if cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            from blip_recipes.data.transforms import EvalTransform
            from blip_recipes.metrics.backends import caption_grid

            with SummaryWriter(str(self.output_dir / "tensorboard")) as writer:
                for key, value in result.metrics.items():
                    writer.add_scalar(f"zeroshot/{key}", value, self.step)
                shown = range(min(SHOWN_IMAGES, len(self.data.images)))
                transform = EvalTransform(self.image_size)
                images = [transform(self.data.images[i]) for i in shown]
                captions = [f"{self.data.classes[self.data.labels[i]]} -> "
                            f"{self.data.classes[int(result.ranking[i, 0])]}" for i in shown]  # fmt: skip
                writer.add_image("zeroshot/predictions", caption_grid(images, captions),
                                 self.step, dataformats="CHW")  # fmt: skip
        m = result.metrics
        line = f"zero-shot top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}"
        if "rerank_top1" in m:
            line += f"  (ITM rerank: top-1 {m['rerank_top1']:.2f}  top-5 {m['rerank_top5']:.2f})"
        print(f"{line}  chance {m['chance_top1']:.2f}  ({int(m['images'])} images, "
              f"{int(m['classes'])} classes)")  # fmt: skip
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
    return run_inference_recipe(ZeroShotEvalRecipe, argv, __doc__ or "", NAME)


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["ZeroShotEvalRecipe", "load_classification", "main"]
