"""BLIP JSON annotations + images -> webdataset tar shards (``KEY.jpg`` + ``KEY.txt``).

    blip data build-shards --ann coco.json vg.json --image-root /data/images \\
        --out /data/shards --per-shard 1000 --resize 384

Every image is opened and decoded first: missing, unreadable, truncated, empty or absurd-aspect
images and empty captions are reported and skipped. With ``--resize S`` images whose short side
exceeds S are resized (bicubic) to short side S and re-encoded as JPEG; others keep their bytes
(non-JPEG inputs are re-encoded as JPEG). A shard is written to a temporary file and renamed when
complete, so an interrupted run never leaves a half-written shard. Caption lists are stored as
``KEY.json`` (``{"caption": [...]}``) so every caption stays available. A ``sizes.json``
(``{"shards-00000.tar": 1000, ...}``) is written beside the shards, so training knows how many
samples an epoch holds without ``training.steps_per_epoch``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

from PIL import Image

from blip_recipes.cli.help import HelpFormatter
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.sources import AnnotationError, iter_annotations
from blip_recipes.data.transforms import BadImage, check_size, load_rgb, open_image


def prepare(path: str, resize: int, quality: int, max_aspect: float) -> tuple[bytes, str]:
    """(bytes, extension) of one image ready for a shard; raises BadImage."""
    img = open_image(path)
    check_size(img, max_aspect)
    fmt = img.format
    if resize and min(img.size) > resize:
        short = min(img.size)
        img.draft("RGB", (-(-img.size[0] * resize // short), -(-img.size[1] * resize // short)))
    rgb = load_rgb(img)
    if fmt == "JPEG" and not (resize and min(rgb.size) > resize) and img.size == rgb.size:
        with open(path, "rb") as f:
            return f.read(), "jpg"
    if resize and min(rgb.size) > resize:
        w, h = rgb.size
        scale = resize / min(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _write(path: str, samples: list[tuple[str, bytes, str, object]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w") as tar:
        for key, data, ext, caption in samples:
            if isinstance(caption, list):
                meta = (f"{key}.json", json.dumps({"caption": caption}).encode("utf-8"))
            else:
                meta = (f"{key}.txt", caption.encode("utf-8"))
            for name, payload in ((f"{key}.{ext}", data), meta):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)


def _write_sizes(folder: str, sizes: dict[str, int]) -> None:
    """Merge ``sizes`` into ``folder/sizes.json`` (kept entries of other shards), atomically."""
    path = os.path.join(folder, "sizes.json")
    table: dict[str, int] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            table = old if isinstance(old, dict) else {}
        except (OSError, ValueError):
            table = {}
    table.update(sizes)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(sorted(table.items())), f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--ann", nargs="+", required=True,
                        help="BLIP annotation files (.json lists or .jsonl lines)")  # fmt: skip
    parser.add_argument("--image-root", default="", help="folder the image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--prefix", default="shards", help="shard file prefix")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--resize", type=int, default=0, help="pre-resize to this short side")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=20.0,
        help="images with a longer side / shorter side above this are skipped",
    )
    parser.add_argument("--max-words", type=int, default=0, help="check captions (0: 30)")
    args = parser.parse_args(argv)
    if not args.force and os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"--out {args.out} is not empty; pass --force to write into it")

    from tqdm import tqdm

    try:
        records = [record for ann in args.ann for record in iter_annotations(ann)]
    except (AnnotationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    samples, shard_id, written, bad = [], 0, 0, []
    sizes: dict[str, int] = {}
    for i, (image, caption) in enumerate(tqdm(records, desc="shards", unit="img", disable=None)):
        path = os.path.join(args.image_root, image)
        texts = caption if isinstance(caption, list) else [caption]
        if not any(isinstance(t, str) and pre_caption(t, args.max_words or 30) for t in texts):
            bad.append(f"{path}: empty caption after cleaning")
            continue
        try:
            data, ext = prepare(path, args.resize, args.quality, args.max_aspect_ratio)
        except BadImage as e:
            bad.append(f"{path}: {e}")
            continue
        samples.append((f"{i:09d}", data, ext, caption))
        if len(samples) == args.per_shard:
            name = f"{args.prefix}-{shard_id:05d}.tar"
            _write(os.path.join(args.out, name), samples)
            sizes[name] = len(samples)
            written, samples, shard_id = written + len(samples), [], shard_id + 1
    if samples:
        name = f"{args.prefix}-{shard_id:05d}.tar"
        _write(os.path.join(args.out, name), samples)
        sizes[name] = len(samples)
        written, shard_id = written + len(samples), shard_id + 1
    if sizes:
        _write_sizes(args.out, sizes)
    for message in bad[:50]:
        print(f"skipped {message}", file=sys.stderr)
    if len(bad) > 50:
        print(f"... and {len(bad) - 50} more", file=sys.stderr)
    pattern = f"{args.prefix}-{{00000..{shard_id - 1:05d}}}.tar" if shard_id else "(none)"
    print(f"wrote {written} samples in {shard_id} shards to {args.out} ({pattern}); "
          f"skipped {len(bad)} bad inputs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
