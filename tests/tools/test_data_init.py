"""`blip data init`: the split, the sizes and the stage configs chained through their outputs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from PIL import Image

from blip_recipes.commands.data_init import main, plan
from blip_recipes.config import LaunchContext, load_toml, validate
from blip_recipes.config.advice import advice


def _data(tmp_path: Path, n: int) -> Path:
    (tmp_path / "imgs").mkdir()
    records = []
    for i in range(n):
        Image.new("RGB", (48, 40), (5 * i % 256, 80, 160)).save(tmp_path / "imgs" / f"{i}.jpg")
        records.append({"image": f"{i}.jpg", "caption": [f"a blue square number {i}", "a square"]})
    ann = tmp_path / "mine.json"
    ann.write_text(json.dumps(records))
    return ann


def test_sizes_follow_the_data_and_the_machine():
    small = plan(270, "cpu", 1, "tiny", None, cores=2)
    assert small["batch_size"] == 16 and small["steps"] == 480 and small["warmup"] == 48
    assert small["queue_size"] == 128 and small["queue_size"] % small["global_batch"] == 0
    assert small["num_workers"] == 1 and not small["compile"] and small["image_size"] == 64
    gpu = plan(100_000, "cuda", 8, "base", None, cores=64)
    assert gpu["batch_size"] == 48 and gpu["global_batch"] == 384 and gpu["steps"] == 3000
    assert gpu["queue_size"] == 49920 and gpu["compile"] and gpu["num_workers"] == 4
    assert plan(40, "cpu", 1, "tiny", 20, cores=1)["batch_size"] == 10  # a quarter of the data


def test_writes_a_split_and_configs_each_reading_the_stage_before(tmp_path, capsys):
    ann = _data(tmp_path, 40)
    out = tmp_path / "run"
    assert main(["--ann", str(ann), "--image-root", str(tmp_path / "imgs"), "--out", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "36 training images (72 captions), 4 validation images" in printed
    val = json.loads((out / "val.json").read_text())
    train = json.loads((out / "train.json").read_text())
    assert len(val) == 4 and all(len(r["caption"]) == 2 for r in val)
    assert len(train) == 72 and not {r["image"] for r in train} & {r["image"] for r in val}
    pre = load_toml(out / "pretrain.toml")
    assert pre.model.name == "blip_pretrain_tiny" and pre.tokenizer.kind == "synthetic"
    assert pre.lr_scheduler.warmup_steps < pre.training.steps
    assert pre.momentum.queue_size % pre.data.batch_size == 0 and pre.momentum.queue_size <= 36
    validate(pre, LaunchContext())
    assert advice(pre) == []
    runs = out / "runs"
    ft = load_toml(out / "finetune_caption.toml")
    assert ft.checkpoint.init_from == str(
        runs / "pretrain" / "checkpoints" / f"step-{pre.training.steps}"
    )
    cf = load_toml(out / "capfilt.toml")
    assert cf.capfilt.captioner == str(runs / "finetune_caption" / "best")
    assert cf.capfilt.filter == str(runs / "finetune_retrieval" / "best")
    again = load_toml(out / "pretrain_capfilt.toml")
    assert again.data.sources[0].paths == [str(runs / "capfilt" / "capfilt.jsonl")]
    script = (out / "commands.sh").read_text()
    assert script.count("blip run ") == 6 and "--to hf" in script
    (caption_line,) = [line for line in script.splitlines() if line.startswith("blip caption ")]
    example = Path(shlex.split(caption_line)[-1])  # a validation image: the script runs as written
    assert example.is_file() and example.name in {r["image"] for r in val}

    with pytest.raises(SystemExit):  # an existing, non-empty --out is never written into
        main(["--ann", str(ann), "--out", str(out)])


def test_refuses_missing_images_and_a_used_folder(tmp_path, capsys):
    ann = _data(tmp_path, 10)
    assert main(["--ann", str(ann), "--out", str(tmp_path / "x")]) == 2  # no --image-root
    assert "image(s) not found under --image-root" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
