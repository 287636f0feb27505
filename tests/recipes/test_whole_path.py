"""The README's whole BLIP path on the tiny model, each recipe feeding the next through the real
CLI: pretrain -> fine-tune a captioner and a filter from it -> CapFilt with their best weights ->
pretrain again on CapFilt's output. Checks the hand-offs (checkpoint layouts, tokenizers
recorded with the weights, output formats), not the quality; opt-in (about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.launch import REPO, env

pytestmark = pytest.mark.slow

TINY = ["model.image_size=32", "momentum.queue_size=32", "data.batch_size=8", "data.num_workers=0",
        "metrics.tensorboard=false"]  # fmt: skip


def blip(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "blip_recipes.cli", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def only(folder: Path) -> Path:
    (path,) = sorted(folder.glob("step-*"))
    return path


def test_pretrain_finetune_capfilt_pretrain_again(tmp_path):
    data = tmp_path / "data"
    blip("data", "synthetic", "--out", str(data), "--num", "64", "--image-size", "64", "--jsonl")
    images = data / "images"
    records = json.loads((data / "annotations.json").read_text())[:16]
    val = tmp_path / "val.json"
    val.write_text(json.dumps([{"image": r["image"], "caption": [r["caption"]]} for r in records]))
    split = [f"eval.annotation={val}", f"eval.image_root={images}", "training.steps=4",
             "training.steps_per_epoch=2"]  # fmt: skip

    blip("run", "blip_pretrain", "--config", "debug", *TINY, f"job.output_dir={tmp_path / 'pre'}",
         "training.steps=4", "checkpoint.interval=4")  # fmt: skip
    pretrained = tmp_path / "pre" / "checkpoints" / "step-4"
    start = f"checkpoint.init_from={pretrained}"
    blip("run", "blip_finetune_caption", "--config", "debug", *TINY, *split, start,
         f"job.output_dir={tmp_path / 'cap'}", "caption.max_length=12", "caption.min_length=3")  # fmt: skip
    blip("run", "blip_finetune_retrieval", "--config", "debug", *TINY, *split, start,
         f"job.output_dir={tmp_path / 'ret'}", "eval.k_test=4")  # fmt: skip
    captioner, filter_ = only(tmp_path / "cap" / "best"), only(tmp_path / "ret" / "best")

    out = tmp_path / "capfilt"
    blip("run", "blip_capfilt", "--config", "capfilt", "tokenizer.kind=synthetic",
         f"job.output_dir={out}", f"capfilt.captioner={captioner}", f"capfilt.filter={filter_}",
         f'capfilt.inputs=["{data / "annotations.jsonl"}"]', f"capfilt.image_root={images}",
         "capfilt.threshold=0.0", "capfilt.unit_size=16")  # fmt: skip
    kept = [json.loads(line) for line in (out / "capfilt.jsonl").read_text().splitlines()]
    assert len(kept) == 64  # threshold 0 keeps every image, with its web + synthetic caption
    assert all(r["capfilt"]["sources"][0] == "web" for r in kept)
    assert kept[0]["capfilt"]["captioner"] == str(captioner)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images_kept"] == 64 and stats["synthetic"]["captions"] == 64

    again = tmp_path / "pre2"
    blip("run", "blip_pretrain", "--config", "debug", *TINY, f"job.output_dir={again}",
         "training.steps=4", "data.sources.0.kind=jsonl",
         f'data.sources.0.paths=["{out / "capfilt.jsonl"}"]', f"data.sources.0.image_root={images}")  # fmt: skip
    metrics = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4
