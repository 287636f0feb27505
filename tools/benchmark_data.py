#!/usr/bin/env python
"""Data throughput: the train transform vs a plain Pillow pipeline, and the loader per source.

    python tools/benchmark_data.py [--images DIR] [--num 200] [--image-size 224] [--workers 2]

Without ``--images`` it writes ``--num`` JPEGs pre-resized to short side ``--short-side`` (384,
textured so they decode like photos) into a temporary folder. It reports, on one core:

- ``train transform``: ours (``Image.draft`` where the crop allows, crop-box resize, RandAugment);
- ``plain pillow``: full decode -> ``convert("RGB")`` -> crop -> resize -> flip -> the same
  RandAugment -> tensor, the straightforward pipeline;

and, for each source (synthetic, json, shards), the loader's images/s in total and per worker.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw


def photo_like_jpeg(seed: int, size: tuple[int, int], quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(5, 60)
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 10, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def plain_pillow(image_size: int):
    """Full decode, then crop/resize, then augment (what a direct port would do)."""
    from blip_recipes.data.randaugment import RandAugment
    from blip_recipes.data.transforms import random_resized_crop_params

    aug = RandAugment(2, 5)

    def run(path: str, rng: random.Random) -> torch.Tensor:
        img = Image.open(path).convert("RGB")
        left, top, w, h = random_resized_crop_params(*img.size, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        img = img.crop((left, top, left + w, top + h)).resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = aug(img, rng)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

    return run


def time_transform(name, fn, paths, repeats, tqdm) -> float:
    n = len(paths) * repeats
    start = time.perf_counter()
    for i in tqdm(range(n), desc=name, unit="img", leave=False, disable=None):
        fn(paths[i % len(paths)], random.Random(i))
    return n / (time.perf_counter() - start)


def time_loader(name, data_cfg, image_size, steps, tqdm) -> float:
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer, build_train_loader

    loader = build_train_loader(
        data_cfg, build_tokenizer(TokenizerConfig(kind="synthetic")), image_size, 0, 0, 1
    )
    next(loader)  # start workers
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=name, unit="batch", leave=False, disable=None):
        next(loader)
    return steps * data_cfg.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="folder of JPEGs (default: generate)")
    parser.add_argument("--num", type=int, default=200, help="images to generate")
    parser.add_argument("--short-side", type=int, default=384, help="short side of generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="transform output side")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="loader batches per source")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from blip_recipes.config import DataConfig, DataSourceConfig
    from blip_recipes.data import build_train_transform, open_image
    from blip_recipes.data.shards import write_shard

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    root = args.images
    if root is None:
        root = os.path.join(tmp.name, "images")
        os.makedirs(root)
        w = args.short_side * 4 // 3
        for i in tqdm(range(args.num), desc="writing JPEGs", disable=None):
            size = (w, args.short_side) if i % 4 else (args.short_side, w)
            with open(os.path.join(root, f"{i:05d}.jpg"), "wb") as f:
                f.write(photo_like_jpeg(i, size))
    names = sorted(n for n in os.listdir(root) if n.lower().endswith((".jpg", ".jpeg")))
    paths = [os.path.join(root, n) for n in names]

    results: dict[str, float] = {}
    ours = build_train_transform(args.image_size)
    results["train_transform_per_core"] = time_transform(
        "ours", lambda p, r: ours(open_image(p), r), paths, args.repeats, tqdm
    )
    results["plain_pillow_per_core"] = time_transform(
        "plain", plain_pillow(args.image_size), paths, args.repeats, tqdm
    )
    results["speedup_vs_plain"] = (
        results["train_transform_per_core"] / results["plain_pillow_per_core"]
    )

    ann = os.path.join(tmp.name, "ann.json")
    with open(ann, "w") as f:
        json.dump([{"image": n, "caption": f"a photo number {i}"} for i, n in enumerate(names)], f)
    shard_dir = os.path.join(tmp.name, "shards")
    os.makedirs(shard_dir)
    per_shard = max(1, len(names) // 4)
    for s in range(0, len(names), per_shard):
        chunk = [
            (f"{i:06d}", open(paths[i], "rb").read(), "jpg", f"a photo number {i}")
            for i in range(s, min(s + per_shard, len(names)))
        ]
        write_shard(os.path.join(shard_dir, f"shards-{s // per_shard:05d}.tar"), chunk)
    sources = {
        "synthetic": DataSourceConfig(kind="synthetic", num_samples=4096),
        "json": DataSourceConfig(kind="json", paths=[ann], image_root=root),
        "shards": DataSourceConfig(kind="shards", paths=[os.path.join(shard_dir, "*")]),
    }
    sources["shards"].paths = sorted(os.path.join(shard_dir, n) for n in os.listdir(shard_dir))
    for name, src in sources.items():
        cfg = DataConfig(
            sources=[src], batch_size=args.batch_size, num_workers=args.workers, pin_memory=False
        )
        total = time_loader(name, cfg, args.image_size, args.steps, tqdm)
        results[f"loader_{name}_total"] = total
        results[f"loader_{name}_per_worker"] = total / max(1, args.workers)

    print(f"{'measure':36s} images/s  ({os.cpu_count()} cores, output {args.image_size}px)")
    for key, value in results.items():
        print(f"{key:36s} {value:8.1f}" + ("x" if key.startswith("speedup") else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
