"""A user's own images and captions through the whole BLIP path with the configs `blip data
init` writes, each stage a plain `blip run RECIPE --config STAGE.toml` (no overrides): pretrain
-> retrieval eval -> caption and retrieval fine-tuning -> CapFilt -> pretrain on CapFilt's output
-> `commands.sh`'s caption of a validation image -> HF export loaded by transformers. Where the
small run's filter has not learnt ITM (it keeps fewer images than one batch), pretraining again
must be refused before launch in one line, and the first pretraining is exported instead. The
images are photo-like (a smooth noisy colour field, as the loader benchmarks use) under shapes the
captions describe. Opt-in: several minutes on CPU."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_recipes.config import load_toml
from tests.recipes.launch import REPO, env

pytestmark = pytest.mark.slow


def blip(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "blip_recipes.cli", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def photo_like_captioned(folder: Path, n: int) -> Path:
    """``n`` photo-like JPEGs with captions that describe them; returns the annotation file."""
    from blip_recipes.benchmarking.photo_like import photo_like_image
    from blip_recipes.data.synthetic import synthetic_sample

    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(n):
        shapes, caption = synthetic_sample(seed=3, index=i, size=96)
        field = photo_like_image(1000 + i, (96, 96))
        photo = Image.blend(shapes, field, 0.25)
        noisy = np.asarray(photo, dtype=np.float32) + np.random.default_rng(i).normal(
            0, 6, (96, 96, 3)
        )
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
            images / f"{i:04d}.jpg", quality=90
        )
        records.append({"image": f"{i:04d}.jpg", "caption": caption})
    ann = folder / "captions.json"
    ann.write_text(json.dumps(records))
    return ann


def test_own_data_runs_the_whole_path_from_data_init(tmp_path):
    ann = photo_like_captioned(tmp_path / "mine", 96)
    run = tmp_path / "my_run"
    init = blip("data", "init", "--ann", str(ann), "--image-root", str(tmp_path / "mine" / "images"),
                "--out", str(run), "--device", "cpu", "--steps", "300")  # fmt: skip
    assert "300 steps" in init.stdout and "compile off" in init.stdout
    script = (run / "commands.sh").read_text().splitlines()
    stages = [line.split()[2:] for line in script if line.startswith("blip run ")]
    assert [s[0] for s in stages] == ["blip_pretrain", "blip_eval_retrieval",
                                      "blip_finetune_caption", "blip_finetune_retrieval",
                                      "blip_capfilt", "blip_pretrain"]  # fmt: skip
    for recipe, flag, config in stages[:-1]:
        proc = blip("run", recipe, flag, config, cwd=tmp_path)
        assert "warning:" not in proc.stderr, proc.stderr[-2000:]
    runs = run / "runs"
    assert json.loads((runs / "eval_retrieval" / "retrieval.json").read_text())
    stats = json.loads((runs / "capfilt" / "stats.json").read_text())
    assert stats["images"] == len(json.loads((run / "train_images.json").read_text()))
    kept = (runs / "capfilt" / "capfilt.jsonl").read_text().splitlines()
    assert all(c.strip() for line in kept for c in json.loads(line)["caption"])
    batch = load_toml(Path(stages[-1][2])).data.batch_size
    again = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "run", *stages[-1]],
                           cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=1800)  # fmt: skip
    if stats["images_kept"] >= batch:  # the filter learnt: pretrain again on what it kept
        assert again.returncode == 0, again.stderr[-4000:]
        metrics = (runs / "pretrain_capfilt" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] == 300
        exported = runs / "pretrain_capfilt"
    else:  # it did not: refused before launch in one line, no traceback
        assert again.returncode == 2 and "Traceback" not in again.stderr
        assert "fewer than one global batch" in again.stderr or "no records" in again.stderr
        exported = runs / "pretrain"

    (caption_line,) = [line for line in script if line.startswith("blip caption ")]
    captioned = blip(*shlex.split(caption_line)[1:], cwd=tmp_path)  # as written in commands.sh
    image, caption = captioned.stdout.strip().split("\t")
    assert Path(image).is_file() and caption.strip(), captioned.stdout
    hf = tmp_path / "hf"
    blip("convert", str(exported), str(hf), "--to", "hf", cwd=tmp_path)
    import transformers

    for name, cls in (("retrieval", transformers.BlipForImageTextRetrieval),
                      ("captioning", transformers.BlipForConditionalGeneration)):  # fmt: skip
        _, info = cls.from_pretrained(hf / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (name, info)
