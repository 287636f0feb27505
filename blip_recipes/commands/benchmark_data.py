"""Data throughput: the train transform vs a plain Pillow pipeline, and the loader per source.

    blip benchmark data [--images DIR] [--num 200] [--short-side 384] [--image-size 224]
        [--repeats 5] [--workers 2] [--skip-loader] [--draft-snap] [--target 1130]
        [--max-workers 14] [--json out.json]

Without ``--images`` it writes ``--num`` JPEGs pre-resized to short side ``--short-side`` (384,
textured so they decode like photos) into a temporary folder. It reports, on one core (one torch
thread; images per CPU second of the timing thread, so other processes on the host distort it
less than wall time, which is reported too):

- ``train_transform``: ours (:class:`blip_recipes.data.transforms.TrainTransform`);
- ``plain_pillow``: what a direct port writes: full decode -> ``convert("RGB")`` -> crop ->
  bicubic resize -> flip -> RandAugment ops applied one by one with Pillow as timm does ->
  tensor (see :func:`plain_pillow`);
- ``plain_pillow_fastpaths``: the same with our op shortcuts (no-op ops skipped, integer
  translations pasted), the baseline this benchmark used before;
- with ``--draft-snap``, ours with ``draft_snap=True`` (matters only where JPEGs get drafted);
- the speedups, and how far ours is from the plain pipeline on the same seeds;

and, for each source (synthetic, json, shards), the loader's images/s in total and per worker
with ``--workers`` workers, and per core (``--workers 0``: the loader in the timing thread, CPU
seconds). With ``--target R`` it sizes the host: workers needed to feed R samples/s at the
per-core shard rate, and the data wait ``--max-workers`` would leave if they scaled linearly.
The pipelines run interleaved image by image; each pass over the images is a round and the median
round is reported with the range.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from blip_recipes.benchmarking.photo_like import photo_like_jpeg, photo_like_size
from blip_recipes.cli.help import HelpFormatter


def plain_pillow(image_size: int, fast_paths: bool = False):
    """The plain Pillow pipeline a direct port would write: full decode -> ``convert("RGB")`` ->
    crop -> bicubic resize (torchvision's ``resized_crop`` on PIL) -> ``transpose`` flip -> two
    RandAugment ops applied one by one with Pillow the way timm's ``auto_augment`` (and
    torchvision's PIL functional ops) do -> ``pil_to_tensor``. Same crop sampling, same op draws
    and arguments as ours (same ``rng`` use), so both compute the same transform.

    ``fast_paths=True`` gives it our op shortcuts too (no-op ops skipped, integer translations as
    a paste): the baseline the previous benchmark used.
    """
    from blip_recipes.data.randaugment import BLIP_OPS, FILL, OPS, op_arguments
    from blip_recipes.data.transforms import random_resized_crop_params

    bilinear = {"resample": Image.Resampling.BILINEAR, "fillcolor": FILL}

    def affine(img, data):
        return img.transform(img.size, Image.Transform.AFFINE, data, **bilinear)

    typical = {  # timm.data.auto_augment's ops (with the reference's sign conventions)
        "Identity": lambda img: img,
        "AutoContrast": lambda img: ImageOps.autocontrast(img),
        "Equalize": lambda img: ImageOps.equalize(img),
        "Brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
        "Sharpness": lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
        "ShearX": lambda img, f: affine(img, (1, -f, 0, 0, 1, 0)),
        "ShearY": lambda img, f: affine(img, (1, 0, 0, -f, 1, 0)),
        "TranslateX": lambda img, t: affine(img, (1, 0, t, 0, 1, 0)),
        "TranslateY": lambda img, t: affine(img, (1, 0, 0, 0, 1, t)),
        "Rotate": lambda img, deg: img.rotate(deg, **bilinear),
    }
    ops = OPS if fast_paths else typical

    def run(path: str, rng: random.Random) -> torch.Tensor:
        img = Image.open(path).convert("RGB")
        left, top, w, h = random_resized_crop_params(*img.size, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        img = img.crop((left, top, left + w, top + h)).resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name in [rng.choice(BLIP_OPS) for _ in range(2)]:
            if rng.random() > 0.5:
                continue
            img = ops[name](img, *op_arguments(name, 5, rng))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

    return run


def time_transforms(fns: dict, paths: list[str], repeats: int, tqdm) -> dict[str, dict]:
    """Images/s per core of each transform, interleaved image by image so that load from other
    processes hits them alike. Per core = images / CPU seconds of this thread (one torch thread,
    Pillow runs in it); wall = images / wall seconds. Each pass over ``paths`` is one round; the
    median round is reported, with the spread of the per-core figure."""
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    order = list(fns)
    bar = tqdm(total=repeats * len(paths), desc="transforms", unit="img", leave=False, disable=None)
    for r in range(repeats):
        cpu = dict.fromkeys(fns, 0.0)
        wall = dict.fromkeys(fns, 0.0)
        for i, path in enumerate(paths):
            seed = r * len(paths) + i
            for name in order[i % len(order) :] + order[: i % len(order)]:
                c0, w0 = time.thread_time(), time.perf_counter()
                fns[name](path, random.Random(seed))
                cpu[name] += time.thread_time() - c0
                wall[name] += time.perf_counter() - w0
            bar.update()
        for name in fns:
            rounds[name].append((len(paths) / cpu[name], len(paths) / wall[name]))
    bar.close()
    out = {}
    for name, values in rounds.items():
        per_core = sorted(v[0] for v in values)
        out[name] = {
            "per_core": statistics.median(per_core),
            "per_core_min": per_core[0],
            "per_core_max": per_core[-1],
            "wall": statistics.median(v[1] for v in values),
        }
    return out


def output_agreement(ours, plain, paths: list[str], n: int = 50) -> dict[str, float]:
    """How far ours is from the plain pipeline on the same seeds (same transform, other kernels)."""
    from blip_recipes.data import open_image

    diffs = [
        (ours(open_image(p), random.Random(i)).int() - plain(p, random.Random(i)).int()).abs()
        for i, p in enumerate(paths[:n])
    ]
    d = torch.stack(diffs).float()
    return {
        "mean_abs_diff": d.mean().item(),
        "frac_pixels_off_by_more_than_1": (d > 1).float().mean().item(),
    }


def time_loader(name, data_cfg, image_size, steps, tqdm) -> tuple[float, float]:
    """(images/s wall, images per CPU second of this process) of the training loader.

    With ``data_cfg.num_workers == 0`` the loader makes each batch in this process (in its
    fetch thread, while this thread waits), so the second figure is what one loader core
    delivers (read, decode, augment, tokenize, collate): the number that sizes a host's worker
    count. With workers, it only counts the main process's share.
    """
    from blip_recipes.config import TokenizerConfig
    from blip_recipes.data import build_tokenizer, build_train_loader

    loader = build_train_loader(
        data_cfg, build_tokenizer(TokenizerConfig(kind="synthetic")), image_size, 0, 0, 1
    )
    next(loader)  # start workers
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in tqdm(range(steps), desc=name, unit="batch", leave=False, disable=None):
        next(loader)
    images = steps * data_cfg.batch_size
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return images / wall, images / max(cpu, 1e-9)


def feed_budget(per_core: float, target: float, max_workers: int) -> dict[str, float]:
    """Loader workers a step rate of ``target`` samples/s needs at ``per_core`` images/s per
    worker, and the data wait (fraction of the step) ``max_workers`` workers would leave if
    workers scaled linearly: ``max(0, 1 - max_workers * per_core / target)``."""
    supply = max_workers * per_core
    return {
        "feed_target_samples_per_s": target,
        "feed_workers_needed": target / per_core,
        "feed_supply_over_target": supply / target,
        "feed_predicted_data_wait_frac": max(0.0, 1.0 - supply / target),
    }


def report(results: dict[str, float], args) -> None:
    print(
        f"{'measure':36s} images/s  ({os.cpu_count()} cores, {len(os.listdir(args.images_dir))} "
        f"JPEGs, short side {args.short_side}, output {args.image_size}px; per core = per CPU "
        "second, median of rounds [min-max])"
    )
    for key, value in results.items():
        if key.endswith(("_min", "_max")):
            continue
        if key.startswith(("speedup", "feed_supply")):
            print(f"{key:36s} {value:8.2f}x")
        elif key in ("mean_abs_diff", "frac_pixels_off_by_more_than_1"):
            print(f"ours vs plain {key:22s} {value:8.4f}")
        elif f"{key}_min" in results:
            print(
                f"{key:36s} {value:8.1f}  [{results[key + '_min']:.1f}-{results[key + '_max']:.1f}]"
            )
        else:
            print(f"{key:36s} {value:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--images", help="folder of JPEGs (default: generate)")
    parser.add_argument("--num", type=int, default=200, help="images to generate")
    parser.add_argument("--short-side", type=int, default=384, help="short side of generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="transform output side")
    parser.add_argument("--repeats", type=int, default=5, help="passes over the images")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=20, help="loader batches per source")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--target",
        type=float,
        default=0.0,
        help="step rate to feed in samples/s (e.g. 1130, ViT-B on an H200): report the workers "
        "it needs at the measured per-core shard-loader rate",
    )
    parser.add_argument("--max-workers", type=int, default=14, help="workers the host can give")
    parser.add_argument("--skip-loader", action="store_true", help="time the transforms only")
    parser.add_argument("--draft-snap", action="store_true", help="also time draft_snap=True")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from blip_recipes.config import DataConfig, DataSourceConfig
    from blip_recipes.data import build_train_transform, open_image
    from blip_recipes.data.tar_format import write_shard

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    root = args.images
    if root is None:
        root = os.path.join(tmp.name, "images")
        os.makedirs(root)
        for i in tqdm(range(args.num), desc="writing JPEGs", disable=None):
            with open(os.path.join(root, f"{i:05d}.jpg"), "wb") as f:
                f.write(photo_like_jpeg(i, photo_like_size(i, args.short_side)))
    args.images_dir = root
    names = sorted(n for n in os.listdir(root) if n.lower().endswith((".jpg", ".jpeg")))
    paths = [os.path.join(root, n) for n in names]

    results: dict[str, float] = {}
    ours = build_train_transform(args.image_size)
    plain = plain_pillow(args.image_size)
    fns = {
        "train_transform": lambda p, r: ours(open_image(p), r),
        "plain_pillow": plain,
        "plain_pillow_fastpaths": plain_pillow(args.image_size, fast_paths=True),
    }
    if args.draft_snap:
        snap = build_train_transform(args.image_size, draft_snap=True)
        fns["train_transform_draft_snap"] = lambda p, r: snap(open_image(p), r)
    for _ in range(min(5, len(paths))):  # warm up (caches, lazy imports)
        for fn in fns.values():
            fn(paths[0], random.Random(0))
    timed = time_transforms(fns, paths, args.repeats, tqdm)
    for name, t in timed.items():
        results[f"{name}_per_core"] = t["per_core"]
        results[f"{name}_per_core_min"] = t["per_core_min"]
        results[f"{name}_per_core_max"] = t["per_core_max"]
        results[f"{name}_wall"] = t["wall"]
    per_core = {name: t["per_core"] for name, t in timed.items()}
    results["speedup_vs_plain"] = per_core["train_transform"] / per_core["plain_pillow"]
    results["speedup_vs_plain_fastpaths"] = (
        per_core["train_transform"] / per_core["plain_pillow_fastpaths"]
    )
    results.update(output_agreement(ours, plain, paths))

    if args.skip_loader:
        report(results, args)
        tmp.cleanup()
        return 0
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
        total, _ = time_loader(name, cfg, args.image_size, args.steps, tqdm)
        results[f"loader_{name}_total"] = total
        results[f"loader_{name}_per_worker"] = total / max(1, args.workers)
        cfg.num_workers = 0
        _, per_core = time_loader(f"{name} in-thread", cfg, args.image_size, args.steps, tqdm)
        results[f"loader_{name}_per_core"] = per_core
    if args.target:
        results.update(
            feed_budget(results["loader_shards_per_core"], args.target, args.max_workers)
        )

    report(results, args)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
