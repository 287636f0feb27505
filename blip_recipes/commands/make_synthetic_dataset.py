"""Write the synthetic data set to disk: JPEG files + BLIP JSON (and optionally tar shards).

The samples are exactly those of the ``synthetic`` source with the same seed and image size, so
the file-based paths (json / jsonl / shards) can be exercised on known data.

    blip data synthetic --out data/synth --num 1000 [--shards 250] [--jsonl]

Writes ``OUT/images/000000.jpg ...``, ``OUT/annotations.json`` (``[{"image", "caption"}]``,
image paths relative to ``OUT/images``), with ``--jsonl`` also ``OUT/annotations.jsonl``, and with
``--shards K`` ``OUT/shards/shards-00000.tar ...`` holding K samples each (plus the
``sizes.json`` the shards source reads the data size from).

With ``--photo-like`` the images are photo-like JPEGs of short side ``--short-side`` (384 by
default, 4:3, see :mod:`blip_recipes.benchmarking.photo_like`) that decode and augment like web
photos pre-resized by img2dataset, with the synthetic captions (which then do not describe them):
data for loader throughput benchmarks, not for training.

    blip data synthetic --out data/photo --num 20000 --photo-like --shards 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from blip_recipes.benchmarking.photo_like import photo_like_image, photo_like_size
from blip_recipes.cli.help import HelpFormatter
from blip_recipes.data.synthetic import synthetic_sample
from blip_recipes.data.tar_format import write_shard


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=42, help="data seed (job.seed of the run)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--shards", type=int, default=0, help="also write tar shards of K samples")
    parser.add_argument("--jsonl", action="store_true", help="also write annotations.jsonl")
    parser.add_argument(
        "--photo-like",
        action="store_true",
        help="photo-like JPEGs (for loader benchmarks; captions do not match them)",
    )
    parser.add_argument(
        "--short-side", type=int, default=384, help="short side of --photo-like images"
    )
    args = parser.parse_args(argv)
    if not args.force and os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"--out {args.out} is not empty; pass --force to write into it")

    from tqdm import tqdm

    image_dir = os.path.join(args.out, "images")
    os.makedirs(image_dir, exist_ok=True)
    records, shard_samples, shard_id, sizes = [], [], 0, {}
    shard_dir = os.path.join(args.out, "shards")
    if args.shards:
        os.makedirs(shard_dir, exist_ok=True)

    def flush() -> None:
        nonlocal shard_samples, shard_id
        if shard_samples:
            name = f"shards-{shard_id:05d}.tar"
            write_shard(os.path.join(shard_dir, name), shard_samples)
            sizes[name] = len(shard_samples)
            shard_samples, shard_id = [], shard_id + 1

    for i in tqdm(range(args.num), desc="synthetic", unit="img", disable=None):
        image, caption = synthetic_sample(args.seed, i, args.image_size)
        if args.photo_like:
            image = photo_like_image(args.seed * 1_000_003 + i, photo_like_size(i, args.short_side))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=args.quality)
        name = f"{i:06d}.jpg"
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(buf.getvalue())
        records.append({"image": name, "caption": caption})
        if args.shards:
            shard_samples.append((f"{i:06d}", buf.getvalue(), "jpg", caption))
            if len(shard_samples) == args.shards:
                flush()
    flush()
    if args.shards:
        with open(os.path.join(shard_dir, "sizes.json"), "w") as f:
            json.dump(sizes, f, indent=1)
    with open(os.path.join(args.out, "annotations.json"), "w") as f:
        json.dump(records, f)
    if args.jsonl:
        with open(os.path.join(args.out, "annotations.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(
        f"wrote {len(records)} samples to {args.out}"
        + (f" ({shard_id} shards)" if args.shards else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
