"""Your images and captions -> the configs of the whole BLIP path, sized to the data and machine.

    blip data init --ann my.json --image-root imgs --out my_run

Reads BLIP annotations (``[{"image": "a.jpg", "caption": "..." or [...]}]``, or ``.jsonl``),
holds out a validation split of whole images, and writes into ``--out`` (new or empty):

    train.json, val.json          the split (train: one record per caption; val: {"image",
                                  "caption": [texts]} per image; train_images.json: train
                                  grouped per image, CapFilt's input)
    pretrain.toml                 blip_pretrain on train.json, retrieval on val.json at its end
    eval_retrieval.toml           blip_eval_retrieval of the pretrained model on val.json
    finetune_caption.toml         blip_finetune_caption from the pretrained model
    finetune_retrieval.toml       blip_finetune_retrieval from the pretrained model
    capfilt.toml                  blip_capfilt over train.json with both fine-tuned models
    pretrain_capfilt.toml         blip_pretrain again, on CapFilt's output
    commands.sh                   the commands, in order (also printed), ending with the HF export

Each config reads the previous stage's output folder (under ``--out``/runs), so the stages run
with no overrides. The sizes follow the data and the machine: the model (tiny on a CPU, ViT-B on
a GPU; ``--model``), the resolution, the batch (at most a quarter of the data set per rank),
the steps (``--steps``; by default about 30 epochs, 300 to 3000 steps), the warmup (a tenth of
the run), the momentum queue (a multiple of the global batch, at most half the data set), the
loader workers (fewer than the cores per rank) and ``parallel.compile`` (on a GPU only). The
tokenizer is ``--tokenizer`` (a WordPiece vocab.txt / tokenizer folder, or a ``.tiktoken`` BPE
file), else the built-in one of the demo (``kind = "synthetic"``: its word list plus single
characters, so any caption is tokenized).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import sys
from pathlib import Path
from typing import Any

from blip_recipes.cli.help import HelpFormatter
from blip_recipes.config.advice import cpu_cores

PRESETS = {
    "tiny": "blip_pretrain_tiny",
    "base": "blip_pretrain_base",
    "large": "blip_pretrain_large",
}


def _records(paths: list[str]) -> list[tuple[str, list[str]]]:
    """(image, [captions]) per image, in first-appearance order (records of one image merged)."""
    from blip_recipes.data.sources import iter_annotations

    by_image: dict[str, list[str]] = {}
    for path in paths:
        for image, caption in iter_annotations(path):
            texts = caption if isinstance(caption, list) else [caption]
            kept = [t for t in texts if isinstance(t, str) and t.strip()]
            if kept:
                by_image.setdefault(image, []).extend(kept)
    return list(by_image.items())


def _split(images: list[tuple[str, list[str]]], fraction: float, seed: int):
    """(train, val): ``fraction`` of the images (at least 2, at most 1000) held out at random."""
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    n_val = min(1000, max(2, round(fraction * len(images)))) if fraction > 0 else 0
    held = set(order[:n_val])
    train = [images[i] for i in range(len(images)) if i not in held]
    val = [images[i] for i in sorted(held)]
    return train, val


def _device(choice: str) -> tuple[str, int]:
    """(device, accelerators on this machine)."""
    if choice == "cpu":
        return "cpu", 0
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cuda" and not gpus:
        raise SystemExit("error: --device cuda, but torch sees no CUDA device here")
    return ("cuda", gpus) if gpus else ("cpu", 0)


def plan(samples: int, device: str, world_size: int, model: str, steps: int | None,
         cores: int) -> dict[str, Any]:  # fmt: skip
    """The sizes of a pretraining run over ``samples`` training captions (module docstring)."""
    per_rank = {"tiny": 16, "base": 48, "large": 24}[model]
    batch = max(2, min(per_rank, samples // (4 * world_size)))
    global_batch = batch * world_size
    per_epoch = max(1, samples // global_batch)
    if steps is None:
        steps = max(300, min(3000, 30 * per_epoch))
    queue = max(global_batch, min(57600, samples // 2) // global_batch * global_batch)
    workers = max(0, min(4, cores // max(1, min(world_size, cores)) - 1))
    return {
        "batch_size": batch,
        "global_batch": global_batch,
        "steps_per_epoch": per_epoch,
        "steps": steps,
        "epochs": math.ceil(steps / per_epoch),
        "warmup": max(1, steps // 10),
        "queue_size": queue,
        "num_workers": workers,
        "image_size": 64 if model == "tiny" else 224,
        "compile": device == "cuda",
    }


def _tokenizer(path: str | None) -> dict[str, Any]:
    if not path:
        return {"kind": "synthetic", "path": None}
    p = Path(path).absolute()
    if not p.exists():
        raise SystemExit(f"error: --tokenizer {path} does not exist")
    kind = "bpe" if p.suffix == ".tiktoken" else "wordpiece"
    return {"kind": kind, "path": str(p)}


def build_configs(train_json: Path, val_json: Path, image_root: str, runs: Path, sizes: dict,
                  model: str, device: str, tokenizer: dict, k_test: int) -> dict[str, Any]:  # fmt: skip
    """The stage configs (name -> Config), each reading the previous stage's outputs."""
    from blip_recipes.config import load_toml
    from blip_recipes.config.registry import CONFIGS_DIR
    from blip_recipes.config.sections import DataSourceConfig

    cfg = load_toml(CONFIGS_DIR / ("debug.toml" if model == "tiny" else "base.toml"))
    cfg.job.name, cfg.job.output_dir, cfg.job.seed = "pretrain", str(runs / "pretrain"), 0
    cfg.model.name, cfg.model.image_size = PRESETS[model], sizes["image_size"]
    cfg.momentum.queue_size = sizes["queue_size"]
    if model != "tiny":
        cfg.model.text_init = cfg.model.vision_init = None  # random weights: nothing to fetch
        cfg.model.embed_dim = 256
    cfg.tokenizer.kind, cfg.tokenizer.path = tokenizer["kind"], tokenizer["path"]
    cfg.tokenizer.max_length = 30
    d = cfg.data
    d.sources = [DataSourceConfig(kind="json", paths=[str(train_json)], image_root=image_root)]
    d.batch_size, d.num_workers, d.pin_memory = (
        sizes["batch_size"],
        sizes["num_workers"],
        device == "cuda",
    )
    d.randaugment = False  # a small data set learns faster without it in a short run
    d.min_scale = 0.5
    cfg.training.steps, cfg.training.epochs = sizes["steps"], sizes["epochs"]
    cfg.momentum.alpha_ramp_epochs = min(cfg.momentum.alpha_ramp_epochs, sizes["epochs"] / 4)
    cfg.training.mixed_precision = "auto"
    cfg.lr_scheduler.name, cfg.lr_scheduler.warmup_steps = "cosine", sizes["warmup"]
    cfg.parallel.device, cfg.parallel.compile = device, sizes["compile"]
    cfg.checkpoint.interval = max(1, sizes["steps"] // 2)
    cfg.checkpoint.keep_latest_k = 2
    cfg.metrics.log_every = max(1, min(50, sizes["steps"] // 20))
    cfg.eval.annotation, cfg.eval.image_root = str(val_json), image_root
    cfg.eval.every_steps, cfg.eval.k_test = sizes["steps"], k_test
    cfg.eval.batch_size = min(cfg.eval.batch_size, 64)
    pretrained = runs / "pretrain" / "checkpoints" / f"step-{sizes['steps']}"

    ev = copy.deepcopy(cfg)
    ev.job.name, ev.job.output_dir = "eval_retrieval", str(runs / "eval_retrieval")
    ev.eval.every_steps, ev.eval.checkpoint = 0, str(runs / "pretrain")

    finetune_steps = max(1, sizes["steps"] // 2)
    finetune_epochs = math.ceil(finetune_steps / sizes["steps_per_epoch"])

    def finetune(name: str) -> Any:
        f = copy.deepcopy(cfg)
        f.job.name, f.job.output_dir = name, str(runs / name)
        f.checkpoint.init_from = str(pretrained)
        f.training.steps, f.training.epochs = None, finetune_epochs
        f.lr_scheduler.warmup_steps = 0
        f.optimizer.lr = cfg.optimizer.lr / 2
        f.eval.every_steps = 0
        return f

    cap = finetune("finetune_caption")
    cap.tokenizer.max_length = 40  # the prompt is tokenized with the caption
    cap.caption.eval_every_epochs = finetune_epochs  # validation (CIDEr) at the end
    cap.caption.test_annotation = None
    cap.caption.min_lr = 0.0
    ret = finetune("finetune_retrieval")
    ret.retrieval.eval_every_epochs = finetune_epochs
    ret.retrieval.test_annotation = None

    cf = load_toml(CONFIGS_DIR / "capfilt.toml")
    cf.job.output_dir = str(runs / "capfilt")
    cf.model.name = PRESETS[model]
    cf.tokenizer = copy.deepcopy(cfg.tokenizer)
    cf.parallel.device = device
    cf.data.num_workers = sizes["num_workers"]
    c = cf.capfilt
    c.captioner, c.filter = (
        str(runs / "finetune_caption" / "best"),
        str(runs / "finetune_retrieval" / "best"),
    )
    c.inputs, c.image_root = [str(train_json.with_name("train_images.json"))], image_root
    c.batch_size = min(c.batch_size, 2 * sizes["batch_size"])

    again = copy.deepcopy(cfg)
    again.job.name, again.job.output_dir = "pretrain_capfilt", str(runs / "pretrain_capfilt")
    again.data.sources = [DataSourceConfig(kind="jsonl", paths=[str(runs / "capfilt" / "capfilt.jsonl")],
                                           image_root=image_root)]  # fmt: skip
    return {"pretrain": cfg, "eval_retrieval": ev, "finetune_caption": cap,
            "finetune_retrieval": ret, "capfilt": cf, "pretrain_capfilt": again}  # fmt: skip


RECIPE_OF = {"pretrain": "blip_pretrain", "eval_retrieval": "blip_eval_retrieval",
             "finetune_caption": "blip_finetune_caption",
             "finetune_retrieval": "blip_finetune_retrieval", "capfilt": "blip_capfilt",
             "pretrain_capfilt": "blip_pretrain"}  # fmt: skip


def commands(out: Path, runs: Path, world_size: int, example_image: Path) -> list[str]:
    """The whole path as shell lines; the caption line captions ``example_image`` (a
    validation image, so the script runs as written)."""
    launch = f"--nproc-per-node {world_size} " if world_size > 1 else ""
    lines = [f"blip run {launch}{RECIPE_OF[name]} --config {shlex.quote(str(out / name))}.toml"
             for name in RECIPE_OF]  # fmt: skip
    lines.append(f"blip caption {shlex.quote(str(runs / 'finetune_caption'))} "
                 f"{shlex.quote(str(example_image))}")  # fmt: skip
    hf = runs / "pretrain_capfilt_hf"
    lines.append(
        f"blip convert {shlex.quote(str(runs / 'pretrain_capfilt'))} {shlex.quote(str(hf))} --to hf"
    )
    return lines


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("--ann", nargs="+", required=True,
                        help="BLIP annotation files (.json lists or .jsonl lines)")  # fmt: skip
    parser.add_argument("--image-root", default="", help="folder the image paths are relative to")
    parser.add_argument("--out", required=True, help="folder for the configs (new or empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="vocab.txt / tokenizer folder (WordPiece) or .tiktoken file (BPE); "
                        "default: the built-in synthetic tokenizer")  # fmt: skip
    parser.add_argument("--model", choices=sorted(PRESETS), default=None,
                        help="model size (default: tiny on a CPU, base on a GPU)")  # fmt: skip
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="device to run on"
    )
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to train on (default: the GPUs of this machine, else 1)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None,
                        help="pretraining steps (default: about 30 epochs, 300 to 3000)")  # fmt: skip
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="images held out for validation (at least 2, at most 1000)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; choose a new one")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    from blip_recipes.data.sources import AnnotationError

    try:
        images = _records(args.ann)
    except (AnnotationError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(images) < 8:
        print(f"error: {', '.join(args.ann)}: {len(images)} captioned image(s); at least 8 are "
              "needed (a training and a validation split)", file=sys.stderr)  # fmt: skip
        return 2
    image_root = str(Path(args.image_root).absolute()) if args.image_root else ""
    missing = [img for img, _ in images[:1000] if not Path(image_root, img).is_file()]
    if missing:
        print(f"error: {len(missing)} image(s) not found under --image-root "
              f"{args.image_root or '.'}, e.g. {missing[0]}", file=sys.stderr)  # fmt: skip
        return 2
    device, gpus = _device(args.device)
    world_size = args.world_size or max(1, gpus)
    model = args.model or ("base" if device == "cuda" else "tiny")
    tokenizer = _tokenizer(args.tokenizer)

    train, val = _split(images, args.val_fraction, args.seed)
    samples = sum(len(c) for _, c in train)
    sizes = plan(samples, device, world_size, model, args.steps, cpu_cores())
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    train_json, val_json = out / "train.json", out / "val.json"
    train_json.write_text(json.dumps([{"image": i, "caption": t} for i, caps in train for t in caps],
                                     indent=0))  # fmt: skip
    (out / "train_images.json").write_text(  # CapFilt's input: one record per image
        json.dumps([{"image": i, "caption": caps} for i, caps in train], indent=0)
    )
    val_json.write_text(json.dumps([{"image": i, "caption": caps} for i, caps in val], indent=0))
    configs = build_configs(train_json, val_json, image_root, runs, sizes, model, device,
                            tokenizer, k_test=min(256, max(1, len(val))))  # fmt: skip
    from blip_recipes.config import to_toml

    for name, cfg in configs.items():
        header = (f"# {RECIPE_OF[name]} on {len(train)} images ({samples} captions) of "
                  f"{', '.join(args.ann)}; written by `blip data init`.\n"
                  f"#   blip run {RECIPE_OF[name]} --config {out / name}.toml\n")  # fmt: skip
        (out / f"{name}.toml").write_text(header + to_toml(cfg))
    lines = commands(out, runs, world_size, Path(image_root, val[0][0]))
    script = out / "commands.sh"
    script.write_text("#!/bin/sh\n# The whole path, in order (written by `blip data init`).\nset -e\n"
                      + "\n".join(lines) + "\n")  # fmt: skip
    os.chmod(script, 0o755)
    print(
        f"{len(train)} training images ({samples} captions), {len(val)} validation images; "
        f"{PRESETS[model]} at {sizes['image_size']} px on {device} x {world_size}: batch "
        f"{sizes['batch_size']} per rank, {sizes['steps']} steps ({sizes['epochs']} epochs), "
        f"warmup {sizes['warmup']}, queue {sizes['queue_size']}, {sizes['num_workers']} loader "
        f"worker(s), compile {'on' if sizes['compile'] else 'off'}; tokenizer "
        f"{tokenizer['path'] or tokenizer['kind']}"
    )
    print(f"wrote {out}/{{train,val}}.json, {len(configs)} configs and commands.sh; run, in order:")
    print("\n".join(f"  {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
