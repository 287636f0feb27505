"""Executed model FLOPs per sample of one pretraining step (no GPU, no memory).

    blip benchmark flops --model blip_pretrain_base blip_pretrain_large

Builds each preset as fake tensors and counts one full step (momentum targets, ITC, ITM, LM,
backward) with PyTorch's FLOP counter. See ``blip_recipes/benchmarking/flops.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from blip_recipes.benchmarking.flops import step_flops
from blip_recipes.cli.help import HelpFormatter


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model",
        nargs="+",
        default=["blip_pretrain_base", "blip_pretrain_large"],
        help="model preset",
    )
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (default 8)")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    p.add_argument("--json", help="also write the counts to this file")
    args = p.parse_args(argv)
    results = []
    for name in args.model:
        counted = step_flops(name, args.batch, args.image_size)
        results.append(counted.__dict__)
        print(
            f"{name}: {counted.total:.1f} GFLOP per sample (batch {args.batch}), of which "
            f"{counted.momentum:.1f} in the momentum encoders"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
