"""A test recipe: resolves its config, all-reduces across ranks, writes what it saw."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from blip_recipes.config import parse_recipe_args


def main(argv=None) -> int:
    cfg = parse_recipe_args(argv, description="echo recipe for tests")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    total = rank + 1
    if world > 1:
        dist.init_process_group("gloo")
        t = torch.tensor([rank + 1])
        dist.all_reduce(t)
        total = int(t)
        dist.barrier()
        dist.destroy_process_group()
    out = Path(cfg.job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world": world,
        "sum": total,
        "steps": cfg.training.steps,
        "batch_size": cfg.data.batch_size,
        "lr": cfg.optimizer.lr,
    }
    (out / f"echo-rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
