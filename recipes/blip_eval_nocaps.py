"""NoCaps-style caption evaluation (the reference's `eval_nocaps.py`).

Captions every image of a split with a captioning checkpoint (the reference's COCO captioner,
beam search: 3 beams, 5-20 tokens, repetition penalty 1.1, prompt "a picture of ", 384 px),
split across ranks, and writes the submission file the official NoCaps evaluation server takes:
`[{"image_id": int, "caption": str}]`, one entry per image id. When the annotation gives
reference captions (a validation split), also scores BLEU-1..4 and CIDEr-D, overall and for
each domain the annotation names (in-domain / near-domain / out-domain).

    blip run blip_eval_nocaps --config eval_nocaps eval.checkpoint=model_base_caption_capfilt_large.pth
    blip run --nproc-per-node 8 blip_eval_nocaps --config eval_nocaps \\
        eval.checkpoint=outputs/finetune_caption_coco/best/step-N \\
        eval.annotation=data/annotations/nocaps_test.json job.output_dir=outputs/nocaps_test

`eval.annotation`: the reference's list of `{"image", "img_id"}` records (optionally with
`"caption"` and `"domain"`), or the official `{"images": [...], "annotations": [...]}` file.
Decoding follows the `[caption]` section. `eval.checkpoint` takes every format
`blip_eval_retrieval` does. Writes `<job.output_dir>/submission.json`, `nocaps_metrics.json`
(with references), TensorBoard scalars `nocaps/*`, and prints a table.
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
from blip_recipes.evaluation.captioning import generate_captions
from blip_recipes.evaluation.evaluated_model import eval_autocast, load_evaluated_model
from blip_recipes.evaluation.nocaps import (
    NocapsData,
    load_nocaps_data,
    nocaps_scores,
    submission,
    write_submission,
)
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

NAME = "blip_eval_nocaps"
logger = logging.getLogger(NAME)

SUBMISSION_FILE = "submission.json"
METRICS_FILE = "nocaps_metrics.json"
METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr")


def format_nocaps_table(scores: dict[str, dict[str, float]]) -> str:
    """One row per group (overall, then each domain): images, BLEU-1..4 and CIDEr, x 100 as
    papers report them."""
    lines = [
        f"{'':14}{'images':>8}" + "".join(f"{k.replace('Bleu_', 'B@'):>8}" for k in METRIC_KEYS)
    ]
    for group, values in scores.items():
        cells = "".join(f"{100 * values[k]:8.2f}" for k in METRIC_KEYS)
        lines.append(f"{group:14}{int(values['images']):8d}{cells}")
    return "\n".join(lines)


def load_split(cfg: Config) -> NocapsData:
    """`eval.annotation`'s images (every file checked to exist), ids, references, domains."""
    ev = cfg.eval
    if not ev.annotation:
        raise ValueError("set eval.annotation (NoCaps-style annotations of the split)")
    data = load_nocaps_data(ev.annotation, ev.image_root)
    missing = [p for p in data.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(data.images)} images of {ev.annotation} are not files, "
            f"e.g. {missing[0]} (eval.image_root={ev.image_root!r})"
        )
    return data


class NocapsEvalRecipe:
    """setup -> run -> cleanup; every rank runs all three."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        self.data = load_split(cfg)  # before the model: a bad split fails fast
        self.dist = init_distributed(cfg.parallel.device, timeout_s=cfg.job.collective_timeout_s)
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        loaded = load_evaluated_model(cfg, logger)
        self.model, self.tokenizer = loaded.model.to(self.device), loaded.tokenizer
        self.image_size, self.step = loaded.image_size, loaded.step
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
        data = self.data
        refs = "with reference captions" if data.references else "without references"
        domains = f", domains {sorted(set(data.domains))}" if data.domains else ""
        logger.info(
            "captioning with %s (%s) at %d px: %d images %s%s, %d rank(s) on %s",
            loaded.source, loaded.layout, self.image_size, len(data.images), refs, domains,
            self.dist.world_size, self.device,
        )  # fmt: skip

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Caption (all ranks), then (rank 0) write the submission, scores and the table."""
        cfg, cap = self.cfg, self.cfg.caption
        start = time.perf_counter()
        with eval_autocast(cfg, self.device):
            captions = generate_captions(
                self.model, self.tokenizer, self.data.images, prompt=cap.prompt,
                method=cap.method, image_size=self.image_size, batch_size=cfg.eval.batch_size,
                num_workers=cfg.data.num_workers, device=self.device, num_beams=cap.num_beams,
                max_length=cap.max_length, min_length=cap.min_length,
                repetition_penalty=cap.repetition_penalty,
            )  # fmt: skip
        records = submission(self.data.image_ids, captions)
        scores = {}
        if self.data.references is not None:
            scores = nocaps_scores(captions, self.data.references, self.data.domains)
        if self.dist.is_main:
            self._write_results(records, scores, time.perf_counter() - start)
        return scores

    def _write_results(
        self, records: list[dict[str, Any]], scores: dict[str, dict[str, float]], seconds: float
    ) -> None:
        path = write_submission(records, self.output_dir / SUBMISSION_FILE)
        if scores:
            metrics = self.output_dir / METRICS_FILE
            metrics.write_text(json.dumps(scores, indent=2) + "\n")
            print(format_nocaps_table(scores))
        if scores and self.cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(self.output_dir / "tensorboard")) as writer:
                for group, values in scores.items():
                    for key in METRIC_KEYS:
                        writer.add_scalar(f"nocaps/{group}/{key}", values[key], self.step)
        shown = f"; scores in {self.output_dir / METRICS_FILE}" if scores else ""
        print(f"({seconds:.1f} s; {len(records)} captions for the server in {path}{shown})")
        sys.stdout.flush()

    def cleanup(self, barrier: bool = True) -> None:
        """Release the models and tear the process group down (``barrier=False`` after a
        failure: see :mod:`blip_recipes.runs.recipe_main`)."""
        for name in ("model", "data"):
            if hasattr(self, name):
                delattr(self, name)
        shutdown_distributed(barrier)


def main(argv: list[str] | None = None) -> int:
    return run_inference_recipe(NocapsEvalRecipe, argv, __doc__ or "", NAME)


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["NocapsEvalRecipe", "format_nocaps_table", "main"]
