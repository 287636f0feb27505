"""Training-step throughput of the BLIP recipe per variant, against a transformers-composed baseline.

    # CPU smoke (tiny model, seconds):
    blip benchmark --model blip_pretrain_tiny --variants eager-fp32,eager-fp32-noshare

    # One H200, ViT-B, every variant, baseline in the same run:
    blip benchmark --model blip_pretrain_base --batch-size 96 128 \\
        --variants full --warmup 10 --steps 30 --profile --json results/base.json

Each variant sets up the real ``BlipPretrainRecipe`` (``recipes/blip_pretrain.py``) and times its
``train_step``; the baseline (``--baseline``, on by default) is one reference BLIP step built from
``BlipVisionModel`` / ``BlipTextModel`` / ``BlipTextLMHeadModel`` on the same sizes and batches.
Reports samples/s, effective MFU (306.8 / 681.0 GFLOP per sample vs the GPU's dense bf16 peak;
null on CPU), peak memory, step time mean and std, and ours / baseline. ``--profile`` adds the
profiler's split of a step into ViT, momentum, text, ITC, ITM, LM, optimizer, queue and other.

Variants are ``-``-joined tokens (see ``blip_recipes/benchmarking/variants.py``): ``eager|compile``,
``fp32|bf16``, ``float8-tensorwise|float8-rowwise``, ``ac-on|ac-off|ac-vitN``, and single
optimisations off: ``noshare``, ``unfused``, ``nofsdp``, ``noreshard``. Presets: ``default``,
``full`` (every precision, float8 recipe and AC mode), ``ablation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from blip_recipes.benchmarking.report import format_table, nan_to_none
from blip_recipes.benchmarking.runner import run_benchmark
from blip_recipes.benchmarking.settings import DATA_MODES, BenchmarkSettings
from blip_recipes.benchmarking.variants import parse_variants
from blip_recipes.cli.help import HelpFormatter

MODELS = ("blip_pretrain_tiny", "blip_pretrain_base", "blip_pretrain_large")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=MODELS, default="blip_pretrain_tiny", help="model preset")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training resolution (default: 224 for base/large, 32 for tiny)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        help="per-device batch sizes, each measured separately (default: 8 tiny, 96 base/large)",
    )
    p.add_argument(
        "--variants",
        default="default",
        help="comma-separated variants or presets (default, full, ablation)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (compile happens here); default 1 on CPU, 10 on CUDA",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps; default 2 on CPU, 30 on CUDA"
    )
    p.add_argument(
        "--data",
        choices=DATA_MODES,
        default="synthetic-device",
        help="synthetic-device: batches already on the device; loader: the recipe's loader",
    )
    p.add_argument("--workers", type=int, default=8, help="loader workers with --data loader")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument(
        "--baseline",
        dest="baseline",
        action="store_true",
        default=True,
        help="also run the transformers-composed baseline (default)",
    )
    baseline.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument(
        "--baseline-precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="baseline autocast: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile extra steps and report the time split per part",
    )
    p.add_argument("--profile-steps", type=int, default=2, help="steps traced by the profiler")
    p.add_argument(
        "--trace-dir", default=None, help="write Chrome traces of the profiled steps here"
    )
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="device to run on"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="ITC queue size (default: the preset's, rounded down to a multiple of the batch)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe config override after the variant's, e.g. --set data.sources.0.kind=shards",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (CPU runs on a shared host: 1 gives steadier ratios)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run everything this many rounds; report the median (for noisy shared hosts)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", dest="json_path", default=None, help="write all results as JSON here")
    return p  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    tiny = args.model == "blip_pretrain_tiny"
    return BenchmarkSettings(
        model=args.model,
        image_size=args.image_size,
        batch_sizes=args.batch_size or [8 if tiny else 96],
        variants=parse_variants(args.variants),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 1),
        steps=args.steps if args.steps is not None else (30 if cuda else 2),
        data=args.data,
        baseline=args.baseline,
        baseline_precision=args.baseline_precision,
        profile=args.profile,
        profile_steps=args.profile_steps,
        trace_dir=args.trace_dir,
        device=args.device,
        workers=args.workers,
        queue_size=args.queue_size,
        overrides=list(args.overrides),
        seed=args.seed,
        repeats=max(1, args.repeats),
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.json_path) if args.json_path else None
    # with --json, the file holds every run finished so far: a run cut off by a time limit
    # keeps what it measured (the final write adds the merged rounds of --repeats)
    report = run_benchmark(
        settings,
        log=lambda line: print(line, flush=True),
        on_partial=(lambda partial: _write_json(path, partial)) if path else None,
    )
    print()
    print(format_table(report))
    if path:
        _write_json(path, report)
        print(f"\nwrote {path}")
    failed = [r["name"] for r in report["results"] if "error" in r]
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write_json(path: Path, report: dict) -> None:
    """Write ``report`` to ``path`` whole (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(nan_to_none(report), indent=2, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
