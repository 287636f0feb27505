"""Per-layer float8 benchmark: every distinct linear shape of a BLIP preset, bf16 vs float8.

    # Any machine: the shapes and what the "auto" float8 filter decides, no timing:
    blip benchmark float8-layers --model blip_pretrain_large --dry-run

    # One H100/H200 (float8 needs SM 8.9+): time them, write JSON:
    blip benchmark float8-layers --model blip_pretrain_large --batch 128 \\
        --json results/float8_layers_large.json

The model is built on the meta device and its ``nn.Linear`` modules are grouped into (M, K, N)
GEMMs: M = batch * 197 image tokens for the ViT and the cross-attention key/value, text batch
(default: batch) * 30 text tokens for the other text linears. Each shape is timed as forward + backward of one
compiled module, bf16 ``nn.Linear`` vs torchao ``Float8Linear`` per recipe, with CUDA events.
The table gives bf16 ms, float8 ms and speedup (bf16 / float8, > 1 = float8 faster) per recipe
next to the auto filter's decision, and the count-weighted time of one pass through all the
linears with float8 everywhere, as the auto filter decides, and best per layer. The heads
(``vision_proj``, ``text_proj``, ``itm_head``, ``lm_head``) are skipped by name and not timed.
Exit code 2 without a float8-capable CUDA GPU (unless ``--dry-run``), 1 if a timing failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from blip_recipes.benchmarking.float8_layers import (
    TEXT_TOKENS,
    benchmark_layer_shapes,
    build_meta_model,
    collect_layer_shapes,
    image_tokens_of,
)
from blip_recipes.benchmarking.float8_report import (
    compact_layers,
    float8_flop_share,
    format_layer_table,
    format_summary,
    summarize,
)
from blip_recipes.cli.help import HelpFormatter
from blip_recipes.parallel.float8 import FLOAT8_RECIPES, FLOAT8_SKIP_FQNS

MODELS = ("blip_pretrain_base", "blip_pretrain_large", "blip_pretrain_tiny")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=MODELS, default="blip_pretrain_base", help="model preset")
    p.add_argument("--batch", type=int, default=128, help="images per pass (per device)")
    p.add_argument(
        "--text-batch",
        type=int,
        default=None,
        help="captions per pass through the text linears (default: --batch)",
    )
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="tokens per caption")
    p.add_argument(
        "--image-tokens",
        type=int,
        default=None,
        help="tokens per image (default: the model's, 197 at 224 px)",
    )
    p.add_argument(
        "--recipes",
        default=",".join(FLOAT8_RECIPES),
        help="comma-separated float8 recipes (tensorwise, rowwise)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed iterations (compile happens here)"
    )
    p.add_argument("--iters", type=int, default=20, help="timed iterations; the median is reported")
    p.add_argument("--eager", action="store_true", help="time without torch.compile")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the shapes and the auto filter's decisions only (no GPU needed)",
    )
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    return p


def parse_recipes(text: str) -> list[str]:
    """``"tensorwise,rowwise"`` -> the list; ValueError on an unknown recipe."""
    recipes = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in recipes if r not in FLOAT8_RECIPES]
    if bad or not recipes:
        raise ValueError(f"--recipes: expected some of {', '.join(FLOAT8_RECIPES)}, got {text!r}")
    return recipes


def cuda_problem() -> str | None:
    """Why float8 cannot be timed here, or None on a CUDA GPU with SM 8.9+."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: the per-layer float8 benchmark needs one"
    if torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name()
        return f"{name} has no float8 matmuls (needs SM 8.9+, e.g. H100/H200)"
    return None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        recipes = parse_recipes(args.recipes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and (problem := cuda_problem()):
        print(
            f"error: {problem}; use --dry-run for the shapes and filter decisions", file=sys.stderr
        )
        return 2

    import torch

    from blip_recipes.benchmarking.report import environment

    model = build_meta_model(args.model)
    image_tokens = args.image_tokens or image_tokens_of(model)
    text_batch = args.text_batch or args.batch
    shapes, by_name = collect_layer_shapes(
        model, args.batch, image_tokens, args.text_tokens, recipes, FLOAT8_SKIP_FQNS, text_batch
    )
    print(
        f"{args.model}: {args.batch} images x {image_tokens} tokens, {text_batch} captions x "
        f"{args.text_tokens} tokens: {len(shapes)} distinct linear shapes"
    )
    if args.dry_run:
        rows = [s.as_dict() for s in shapes]
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
        rows = benchmark_layer_shapes(
            shapes, recipes, device, compile=not args.eager, warmup=args.warmup,
            iters=args.iters, log=lambda line: print(line, flush=True),
        )  # fmt: skip
    summary = summarize(rows, recipes) if not args.dry_run else {}
    print()
    print(format_layer_table(rows, recipes))
    print(f"\nskipped by name (high precision, not timed): {compact_layers(by_name)}")
    share = float8_flop_share(rows, recipes)
    print(
        "linear FLOPs in float8 under the auto filter: "
        + ", ".join(f"{r} {100 * share[r]:.0f}%" for r in recipes)
    )
    if summary:
        print(format_summary(summary, recipes))
    if args.json_path:
        report = {
            "meta": {
                "model": args.model, "batch": args.batch, "text_batch": text_batch,
                "text_tokens": args.text_tokens,
                "image_tokens": image_tokens, "recipes": recipes, "dry_run": args.dry_run,
                "compile": not args.eager, "warmup": args.warmup, "iters": args.iters,
                "skip_fqns": list(FLOAT8_SKIP_FQNS), "environment": environment(device),
            },
            "layers": rows,
            "skipped_by_name": by_name,
            "auto_float8_flop_share": share,
            "totals": summary,
        }  # fmt: skip
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")
    failed = [r for r in rows if r.get("errors")]
    if failed:
        print(
            f"\n{len(failed)} shape(s) had failed timings (see errors in the JSON)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
