"""CapFilt: bootstrap a pretraining corpus with a captioner and a filter (BLIP's dataset
bootstrapping).

For every web image-text pair of `capfilt.inputs` (BLIP JSON / JSONL annotations or tar shards),
the captioner (`capfilt.captioner`, a model fine-tuned for captioning) samples
`capfilt.num_captions` synthetic captions by nucleus sampling (top_p 0.9, prompt "a picture of ",
stripped); the filter (`capfilt.filter`, a model fine-tuned for retrieval) scores the web caption
and every synthetic one with its ITM head (probability of "match", `[ENC]` first, the image at the
filter's resolution); captions scoring at least `capfilt.threshold` are kept (optionally only the
`capfilt.synthetic_top_k` synthetic ones of highest ITC similarity), and an image is kept when
one of its captions is. The result is a new annotation set that blip_pretrain reads directly.

    blip run blip_capfilt --config capfilt capfilt.captioner=model_large_caption.pth \\
        capfilt.filter=model_large_retrieval_coco.pth capfilt.inputs='["cc3m.json"]' \\
        capfilt.image_root=data/cc3m job.output_dir=outputs/capfilt_cc3m
    blip run --nproc-per-node 8 blip_capfilt --config capfilt capfilt.inputs='["web-{00000..00999}.tar"]' ...

The work is cut into units (an input shard, or `capfilt.unit_size` annotation records), unit `u`
runs on rank `u % world size`, and each unit's output is written under a temporary name and
renamed when complete. A restarted job (same inputs and settings, same `job.output_dir`) skips
the finished units and produces byte-identical output; a folder holding anything else is refused
(exit status 2). Writes, under `job.output_dir`: `capfilt.jsonl` (JSON/JSONL inputs; image paths
relative to `capfilt.image_root`) or `shards/capfilt-NNNNN.tar` + `shards/sizes.json` (shard
inputs), `stats.json`, per-unit files under `units/`, `config.toml`. See docs/capfilt.md.
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
import torch.distributed as dist

from blip_recipes.capfilt import (
    AnnotationInputs,
    FilterSettings,
    ModelCaptioner,
    ModelScorer,
    OutputFolderError,
    RunFolder,
    UnitStats,
    WorkUnit,
    claim,
    decode_threads,
    input_kind,
    load_checkpoint,
    merge_stats,
    process_unit,
    run_identity,
    shard_pairs,
    shard_units,
    units_of_rank,
)
from blip_recipes.capfilt.outputs import (
    concatenate,
    jsonl_bytes,
    remove_leftovers,
    shard_bytes,
    write_atomic,
)
from blip_recipes.config import Config, ConfigError, to_toml
from blip_recipes.data import build_tokenizer
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.recipe_main import run_inference_recipe

logger = logging.getLogger("blip_capfilt")


class CapfiltRecipe:
    """setup -> run -> cleanup; every rank runs all three, rank 0 also merges at the end."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ---- setup
    def setup(self) -> None:
        c = self.cfg.capfilt
        self.threads = decode_threads()
        missing = [k for k in ("captioner", "filter") if not getattr(c, k)]
        if missing or not c.inputs:
            what = [f"capfilt.{k}" for k in missing] + ([] if c.inputs else ["capfilt.inputs"])
            raise ConfigError(f"set {', '.join(what)} (see docs/capfilt.md)")
        for key in ("unit_size", "num_captions", "batch_size"):
            if getattr(c, key) <= 0:
                raise ConfigError(f"'capfilt.{key}' must be positive, got {getattr(c, key)}")
        try:
            self.kind = input_kind(c.inputs, c.input_kind)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dist = init_distributed(
            self.cfg.parallel.device, timeout_s=self.cfg.job.collective_timeout_s
        )
        self.device = self.dist.device
        self.folder = RunFolder(self.cfg.job.output_dir)
        self._plan_units()
        identity = run_identity(c, self.input_list, self.cfg.job.seed, self.cfg.data.max_words)
        self.resumed = self._claim_folder(identity)
        self._load_models()

    def _plan_units(self) -> None:
        c, rank, world = self.cfg.capfilt, self.dist.rank, self.dist.world_size
        if self.kind == "shards":
            self.units = shard_units(c.inputs)
            self.input_list = [u.source for u in self.units]
            self.annotations = None
        else:
            for path in c.inputs:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"capfilt.inputs: {path} is not a file")
            self.annotations = AnnotationInputs(
                c.inputs, c.image_root, c.unit_size, keep=lambda u: u % world == rank,
                kind=self.kind,
            )  # fmt: skip
            self.units = self.annotations.units()
            self.input_list = list(c.inputs)
        self.my_units = units_of_rank(self.units, rank, world)

    def _claim_folder(self, identity: dict) -> bool:
        """Rank 0 claims the folder (or refuses it); every rank learns the outcome."""
        outcome: list[Any] = [None, None]
        if self.dist.is_main:
            try:
                outcome[0] = claim(self.folder, identity)
                for sub in (self.folder.units, self.folder.shards, self.folder.root):
                    for path in remove_leftovers(sub):
                        logger.info("removed %s, left by an interrupted run", path)
                if self.kind == "shards":
                    self.folder.shards.mkdir(exist_ok=True)
                write_atomic(self.folder.root / "config.toml", to_toml(self.cfg).encode())
            except (OutputFolderError, OSError) as e:
                outcome[1] = str(e)
        if self.dist.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise OutputFolderError(outcome[1])
        return bool(outcome[0])

    def _load_models(self) -> None:
        c, cfg = self.cfg.capfilt, self.cfg
        try:
            fallback = build_tokenizer(cfg.tokenizer)
        except (OSError, ValueError) as e:
            fallback = None
            logger.info("the config's [tokenizer] cannot be built (%s)", e)
        caption_model, caption_tok, where = load_checkpoint(
            c.captioner, fallback, cfg.model.name, self.device
        )
        logger.info("captioner %s (tokenizer: %s)", c.captioner, where)
        if c.filter == c.captioner:
            filter_model, filter_tok = caption_model, caption_tok
        else:
            filter_model, filter_tok, where = load_checkpoint(
                c.filter, fallback, cfg.model.name, self.device
            )
        logger.info("filter %s (tokenizer: %s)", c.filter, where)
        self.captioner = ModelCaptioner(
            caption_model, caption_tok, c.num_captions, prompt=c.prompt,
            max_length=c.max_length, min_length=c.min_length, top_p=c.top_p,
            top_k=c.sampling_top_k, repetition_penalty=c.repetition_penalty,
        )  # fmt: skip
        self.scorer = ModelScorer(filter_model, filter_tok, c.text_max_length, cfg.data.max_words)
        logger.info(
            "%d unit(s) of %s inputs, %d on this rank (%d of %d); captioner at %d px, filter at "
            "%d px; %s", len(self.units), self.kind, len(self.my_units), self.dist.rank,
            self.dist.world_size, self.captioner.image_size, self.scorer.image_size,
            "continuing an earlier run" if self.resumed else "new run",
        )  # fmt: skip

    def _autocast(self):
        choice = self.cfg.training.mixed_precision
        if choice == "auto":
            choice = "bf16" if self.device.type == "cuda" else "fp32"
        if choice == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- run
    def run(self) -> dict | None:
        """Process this rank's unfinished units; rank 0 then merges. Returns the stats (rank 0)."""
        c = self.cfg.capfilt
        settings = FilterSettings(c.threshold, c.synthetic_top_k)
        start = time.perf_counter()
        done = {"units": 0, "skipped": 0, "images": 0, "captions": 0}
        for unit in self.my_units:
            if self.folder.is_done(unit):
                done["skipped"] += 1
                continue
            pairs = shard_pairs(unit) if unit.kind == "shards" else self.annotations.pairs(unit)
            with self._autocast():
                kept, stats = process_unit(unit, pairs, self.captioner, self.scorer, settings,
                                           self.cfg.job.seed, c.batch_size, self.threads)  # fmt: skip
            to_bytes = shard_bytes if unit.kind == "shards" else jsonl_bytes
            write_atomic(self.folder.unit_output(unit), to_bytes(kept, c.captioner, c.filter))
            write_atomic(self.folder.unit_stats(unit), _json(stats.to_dict()))
            done["units"] += 1
            done["images"] += stats.images
            done["captions"] += stats.captions_generated
            self._log_unit(unit, stats)
        if done["skipped"]:
            logger.info("skipped %d unit(s) finished by an earlier run", done["skipped"])
        totals = self._sum_over_ranks(done)
        seconds = time.perf_counter() - start
        if not self.dist.is_main:
            return None
        return self._finish(totals, seconds)

    def _log_unit(self, unit: WorkUnit, s: UnitStats) -> None:
        seconds = max(s.seconds, 1e-9)
        logger.info(
            "%s (%s): %d images (%d bad), %d kept; web %d/%d kept, synthetic %d/%d kept; "
            "%.1f images/s, %.1f captions/s", unit.name, unit.source, s.images,
            len(s.bad_images), s.images_kept, s.web.kept, s.web.captions, s.synthetic.kept,
            s.synthetic.captions, s.images / seconds, s.captions_generated / seconds,
        )  # fmt: skip
        for bad in s.bad_images:
            logger.warning("skipped bad image %s: %s", bad["image"], bad["reason"])

    def _sum_over_ranks(self, done: dict[str, int]) -> dict[str, int]:
        """Every rank's counts summed (also the barrier before rank 0 merges)."""
        keys = sorted(done)
        values = torch.tensor([done[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(values)
        return {k: int(v) for k, v in zip(keys, values.tolist())}

    def _finish(self, totals: dict[str, int], seconds: float) -> dict:
        """Rank 0: check every unit is done, merge outputs and statistics, print a summary."""
        c, folder = self.cfg.capfilt, self.folder
        missing = [u.name for u in self.units if not folder.is_done(u)]
        if missing:
            raise RuntimeError(f"units not finished: {', '.join(missing[:10])}")
        unit_stats = [UnitStats.from_dict(json.loads(folder.unit_stats(u).read_text()))
                      for u in self.units]  # fmt: skip
        stats = merge_stats(unit_stats)
        if self.kind == "shards":
            sizes = {folder.unit_output(u).name: s.images_kept
                     for u, s in zip(self.units, unit_stats)}  # fmt: skip
            write_atomic(folder.shards / "sizes.json", _json(sizes))
            last = len(self.units) - 1
            source = {"kind": "shards",
                      "paths": [str(folder.shards / f"capfilt-{{00000..{last:05d}}}.tar")]}  # fmt: skip
        else:
            concatenate([folder.unit_output(u) for u in self.units], folder.merged)
            source = {"kind": "jsonl", "paths": [str(folder.merged)], "image_root": c.image_root}
        seconds = max(seconds, 1e-9)
        stats |= {
            "captioner": c.captioner,
            "filter": c.filter,
            "threshold": c.threshold,
            "num_captions": c.num_captions,
            "synthetic_top_k": c.synthetic_top_k,
            "pretrain_source": source,
            "this_run": {
                "world_size": self.dist.world_size,
                "units_processed": totals["units"],
                "units_skipped": totals["skipped"],
                "images": totals["images"],
                "captions_generated": totals["captions"],
                "seconds": seconds,
                "images_per_s": totals["images"] / seconds,
                "captions_per_s": totals["captions"] / seconds,
            },
        }
        write_atomic(folder.stats, _json(stats))
        self._print_summary(stats, source)
        return stats

    def _print_summary(self, stats: dict, source: dict) -> None:
        run = stats["this_run"]
        lines = [
            f"CapFilt: {stats['images_kept']} of {stats['images']} images kept "
            f"({stats['bad_images']} bad images skipped)",
        ]
        for name in ("web", "synthetic"):
            s = stats[name]
            frac = "-" if s["kept_fraction"] is None else f"{100 * s['kept_fraction']:.1f}%"
            mean = "-" if s["mean_itm"] is None else f"{s['mean_itm']:.3f}"
            lines.append(f"  {name:9} captions {s['kept']:>8} / {s['captions']:<8} kept "
                         f"({frac}), mean ITM {mean}{_quantile_text(s['itm_quantiles'])}")  # fmt: skip
        lines.append(f"  this run: {run['images']} images in {run['seconds']:.1f} s on "
                     f"{run['world_size']} rank(s): {run['images_per_s']:.1f} images/s, "
                     f"{run['captions_per_s']:.1f} captions/s")  # fmt: skip
        if stats["images_kept"]:
            lines.append("  pretrain on it with:\n    [[data.sources]]")
            lines += [f"    {k} = {json.dumps(v)}" for k, v in source.items()]
        else:
            highest = max((stats[n]["itm_quantiles"].get("p100", 0.0) for n in ("web", "synthetic")),
                          default=0.0)  # fmt: skip
            lines.append(
                f"  kept nothing: no caption's ITM score reached capfilt.threshold="
                f"{stats['threshold']} (the highest is below {highest:.2f}); the filter does not "
                "yet tell matching pairs from others (fine-tune it longer or on more data), or "
                "lower capfilt.threshold. There is nothing to pretrain on."
            )
        lines.append(f"  (statistics in {self.folder.stats})")
        print("\n".join(lines))
        sys.stdout.flush()

    def cleanup(self, barrier: bool = True) -> None:
        """Release the models and tear the process group down (``barrier=False`` after a
        failure: see :mod:`blip_recipes.runs.recipe_main`)."""
        for name in ("captioner", "scorer", "annotations"):
            if hasattr(self, name):
                delattr(self, name)
        shutdown_distributed(barrier)


def _quantile_text(quantiles: dict[str, float]) -> str:
    """`, ITM min/p10/median/p90/max 0.01/0.10/0.32/0.90/1.00` (empty when nothing was scored)."""
    if not quantiles:
        return ""
    values = "/".join(f"{quantiles[k]:.2f}" for k in ("p0", "p10", "p50", "p90", "p100"))
    return f", ITM min/p10/median/p90/max {values}"


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    return run_inference_recipe(
        CapfiltRecipe,
        argv,
        __doc__ or "",
        "blip_capfilt",
        user_errors=(ConfigError, OutputFolderError),
    )


if __name__ == "__main__":
    sys.exit(main())


__all__: list[Any] = ["CapfiltRecipe", "main"]
