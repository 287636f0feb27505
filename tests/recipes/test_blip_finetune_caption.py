"""End-to-end: the caption fine-tuning recipe through the real `blip run` CLI on the tiny model.

Training data is the synthetic source (shapes whose captions say what is where); the validation
and test splits are synthetic images of other seeds written to disk with their captions.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_recipes.api import load_model
from blip_recipes.config import load_config
from blip_recipes.config.registry import resolve_config
from blip_recipes.data import build_tokenizer
from blip_recipes.data.synthetic import synthetic_sample
from blip_recipes.evaluation.captioning import evaluate_captions, load_caption_data
from blip_recipes.models import build_model
from blip_recipes.training.build import model_kwargs
from blip_recipes.training.caption import as_captioner, captioning_initial_weights
from tests.recipes.launch import REPO, TINY, Run, env, run_recipe
from tests.recipes.test_blip_pretrain import final_weights

GENERATION = ["caption.max_length=30", "caption.num_beams=3", "caption.min_length=5"]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """val.json / test.json: 16 synthetic images each, one reference caption per image."""
    root = tmp_path_factory.mktemp("caption_splits")
    for split, seed in (("val", 1001), ("test", 2002)):
        records = []
        for i in range(16):
            image, caption = synthetic_sample(seed, i, 64)
            name = f"{split}_{i:06d}.png"
            image.save(root / name)
            records.append({"image": name, "caption": [caption]})
        (root / f"{split}.json").write_text(json.dumps(records))
    return root


def overrides(splits: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "metrics.log_every=1", f"job.output_dir={output_dir}",
            f"eval.annotation={splits / 'val.json'}", f"eval.image_root={splits}",
            f"caption.test_annotation={splits / 'test.json'}", *GENERATION, *extra]  # fmt: skip


def finetune(splits: Path, output_dir: Path, *extra: str, nproc: int = 1) -> Run:
    launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_finetune_caption",
            "--config", "debug", *overrides(splits, output_dir, *extra)]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env())
    return Run(proc, output_dir)


def eval_records(run: Run) -> list[dict]:
    lines = (run.output_dir / "eval.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_ok(run: Run) -> None:
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]


def test_finetuning_improves_validation_and_keeps_the_best(splits, tmp_path):
    """Start from a 32 px pretraining checkpoint, fine-tune at 48 px (position embedding
    interpolated); the validation scores rise above the starting point's, and the weights
    kept in best/ are those of the best validation, which the test split is scored with."""
    pretrained = run_recipe(tmp_path / "pretrain", "training.steps=2")
    assert pretrained.proc.returncode == 0, pretrained.proc.stderr[-3000:]
    init = pretrained.checkpoints()[-1]
    extra = ["model.image_size=48", f"checkpoint.init_from={init}", "training.steps=none",
             "training.epochs=4", "training.steps_per_epoch=100", "optimizer.lr=1e-3",
             "data.sources.0.num_samples=4096"]  # fmt: skip
    run = finetune(splits, tmp_path / "finetune", *extra, "metrics.log_every=10")
    assert_ok(run)
    assert "visual_encoder.pos_embed interpolated to (1, 10, 64)" in run.proc.stderr

    # the starting point, scored the same way
    cfg = load_config(resolve_config("debug"), overrides(splits, tmp_path / "x", *extra))
    tok = build_tokenizer(cfg.tokenizer)
    start = as_captioner(build_model(cfg.model.name, **model_kwargs(cfg, tok)))
    start.load_state_dict(captioning_initial_weights(cfg, tok))
    val = load_caption_data(str(splits / "val.json"), str(splits))
    generate = dict(max_length=30, min_length=5, num_beams=3, image_size=48)
    baseline = evaluate_captions(start, tok, val, **generate).metrics

    records = eval_records(run)
    assert [r["step"] for r in records] == [100, 200, 300, 400]
    best = max(records, key=lambda r: r["val_score"])
    assert best["val_CIDEr"] > baseline["CIDEr"] + 1.0
    assert best["val_Bleu_4"] > baseline["Bleu_4"] + 0.15
    kept = json.loads((run.output_dir / "caption_best.json").read_text())
    assert kept["step"] == best["step"] and kept["val_score"] == best["val_score"]
    assert [p.name for p in (run.output_dir / "best").glob("step-*")] == [f"step-{kept['step']}"]
    # the kept weights reproduce the logged validation score
    model, tokenizer = load_model(run.output_dir / "best" / f"step-{kept['step']}")
    again = evaluate_captions(model, tokenizer, val, **generate).metrics
    assert again["score"] == pytest.approx(best["val_score"], rel=1e-9)
    for step in (100, 200, 300, 400):
        written = json.loads((run.output_dir / "captions" / f"val_step{step}.json").read_text())
        assert [r["image_id"] for r in written] == list(range(16))
    written = json.loads((run.output_dir / "captions" / f"val_step{kept['step']}.json").read_text())
    assert len({r["caption"] for r in written}) >= 4  # captions depend on the image
    test = json.loads((run.output_dir / "caption_test.json").read_text())
    assert test["step"] == kept["step"] and test["test_CIDEr"] > baseline["CIDEr"]
    assert len(json.loads((run.output_dir / "captions" / "test.json").read_text())) == 16
    metrics = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").open()]
    assert len(metrics) == 40  # metrics.log_every=10
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    lr = {m["step"]: m["lr"] for m in metrics}  # logged after the step: the next step's LR
    assert lr[10] == 1e-3 and lr[390] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert lr[120] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(0.25 * math.pi))) and lr[400] == 0


def test_bitwise_resume(splits, tmp_path):
    """8 steps straight == 4 steps, then a resume for 4 more: losses, validation scores, the
    kept step and the final weights."""
    extra = ["training.epochs=2", "training.steps_per_epoch=4", "checkpoint.interval=100",
             "caption.method=greedy", "caption.max_length=24"]  # fmt: skip
    straight = finetune(splits, tmp_path / "straight", "training.steps=8", *extra)
    assert_ok(straight)
    stale = tmp_path / "resumed" / "best" / "step-4" / "left-by-an-earlier-run"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    first = finetune(splits, tmp_path / "resumed", "training.steps=4", *extra)
    assert_ok(first)
    assert not stale.exists()  # a fresh start clears best/
    second = finetune(splits, tmp_path / "resumed", "training.steps=8", *extra)
    assert_ok(second)
    assert "resumed from" in second.proc.stderr
    assert second.losses() == straight.losses()
    assert eval_records(second) == [
        {k: v for k, v in r.items() if k != "time"} | {"time": s["time"]}
        for r, s in zip(eval_records(straight), eval_records(second))
    ]
    best = [
        json.loads((r.output_dir / "caption_best.json").read_text()) for r in (straight, second)
    ]
    assert {k: v for k, v in best[0].items() if k != "checkpoint"} == {
        k: v for k, v in best[1].items() if k != "checkpoint"
    }
    a, b = final_weights(straight, tmp_path), final_weights(second, tmp_path)
    assert a.keys() == b.keys() and "momentum" not in " ".join(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_ranks_fsdp(splits, tmp_path):
    """2 ranks (FSDP2): training, sharded validation and test decoding, the kept weights."""
    run = finetune(splits, tmp_path / "two", "training.steps=4", "training.steps_per_epoch=2",
                   "training.epochs=2", nproc=2)  # fmt: skip
    assert_ok(run)
    assert [r["step"] for r in eval_records(run)] == [2, 4]
    assert (run.output_dir / "caption_test.json").is_file()


def test_listed_and_config_validates(tmp_path):
    out = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "ls"], cwd=REPO,
                         capture_output=True, text=True, env=env())  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if "blip_finetune_caption" in x)
    assert "finetune_caption_coco" in line
    for path in ("pretrained/bert-base-uncased/vocab.txt", "pretrained/blip_base_dcp/.metadata"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("[PAD]\n" * 30522 if path.endswith(".txt") else "")
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    (tmp_path / "data" / "images" / "coco").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (tmp_path / "data" / "annotations" / f"coco_karpathy_{split}.json").write_text(
            json.dumps([{"image": "a.jpg", "caption": "a dog"}] * 32)  # one global batch
        )
    out = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "validate", "--config",
                          "finetune_caption_coco"], cwd=tmp_path, capture_output=True, text=True,
                         env=env())  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'prompt = "a picture of "' in out.stdout and "image_size = 384" in out.stdout
