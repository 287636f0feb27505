"""End-to-end: the VQA fine-tuning recipe through the real `blip run` CLI on the tiny model, on
synthetic VQA data (questions about the colour, shape, count of shapes and the background)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip_recipes.data.synthetic_vqa import write_synthetic_vqa
from blip_recipes.evaluation.vqa_metrics import vqa_accuracy
from tests.recipes.launch import REPO, Run, env
from tests.recipes.test_blip_pretrain import final_weights

QUESTION_PRIOR = (1 / 6 + 3 * (1 / 3)) / 4
"""Accuracy of the best question-only guess on the synthetic questions (module docstring of
`blip_recipes.data.synthetic_vqa`): about 0.29."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_vqa(tmp_path_factory.mktemp("vqa"), 256, 32, seed=0, size=32)


def overrides(data: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return ["model.image_size=32", "momentum.queue_size=32", "data.batch_size=8",
            "data.num_workers=0", "metrics.log_every=1", "metrics.tensorboard=false",
            "data.sources.0.kind=json", f'data.sources.0.paths=["{data["train"]}"]',
            f"data.sources.0.image_root={data['image_root']}",
            f"eval.annotation={data['test']}", f"eval.image_root={data['image_root']}",
            f"vqa.answer_list={data['answer_list']}", "vqa.k_test=4", "eval.batch_size=16",
            "training.steps=none", f"job.output_dir={output_dir}", *extra]  # fmt: skip


def args(data, output_dir, *extra, nproc: int = 1) -> list[str]:
    launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_finetune_vqa",
            "--config", "debug", *overrides(data, output_dir, *extra)]  # fmt: skip


def finetune(data, output_dir, *extra, nproc: int = 1) -> Run:
    proc = subprocess.run(args(data, output_dir, *extra, nproc=nproc), cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env())  # fmt: skip
    return Run(proc, output_dir)


def assert_ok(run: Run) -> None:
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]


def eval_records(run: Run) -> list[dict]:
    lines = (run.output_dir / "eval.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines if x.strip()]


@pytest.mark.slow
def test_short_run_writes_results_and_resumes_bitwise_after_sigterm(data, tmp_path):
    """8 steps straight == SIGTERM after step 3 (checkpoint saved, exit 0) + a resume: losses,
    the evaluation, the results file and the final weights."""
    extra = ["training.epochs=1", "training.steps_per_epoch=8", "checkpoint.interval=100",
             "checkpoint.signal_check_every=1", "vqa.inference=generate"]  # fmt: skip
    straight = finetune(data, tmp_path / "straight", *extra)
    assert_ok(straight)
    results = json.loads((straight.output_dir / "vqa_result.json").read_text())
    test = json.loads(data["test"].read_text())
    assert [r["question_id"] for r in results] == [r["question_id"] for r in test]
    assert all(isinstance(r["answer"], str) for r in results)
    accuracy = sum(vqa_accuracy(r["answer"], t["answer"]) for r, t in zip(results, test)) / 32
    assert eval_records(straight)[-1]["vqa_accuracy"] == pytest.approx(accuracy)

    proc = subprocess.Popen(args(data, tmp_path / "resumed", *extra), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics, deadline = tmp_path / "resumed" / "metrics.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    first = Run(subprocess.CompletedProcess([], 0, "", err), tmp_path / "resumed")
    stopped_at = int(first.checkpoints()[-1].name.split("-")[1])
    assert 3 <= stopped_at < 8 and not (tmp_path / "resumed" / "vqa_result.json").exists()
    second = finetune(data, tmp_path / "resumed", *extra)
    assert_ok(second)
    assert "resumed from" in second.proc.stderr
    assert second.losses() == straight.losses()
    assert eval_records(second) == eval_records(straight)
    assert (second.output_dir / "vqa_result.json").read_text() == json.dumps(results) + "\n"
    a, b = final_weights(straight, tmp_path), final_weights(second, tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("answer_decoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_ranks_train_and_answer_the_split(data, tmp_path):
    """2 gloo ranks (FSDP2) of batch 4: training, the sharded evaluation and the results file in
    question order. (That 2 ranks give one process's loss and gradients, without dropout, is
    tests/training/test_vqa.py; with dropout the random masks differ by world size.)"""
    extra = ["training.epochs=1", "training.steps_per_epoch=4", "data.batch_size=4"]
    two = finetune(data, tmp_path / "two", *extra, nproc=2)
    assert_ok(two)
    results = json.loads((two.output_dir / "vqa_result.json").read_text())
    assert [r["question_id"] for r in results] == list(range(256, 288))
    assert 0.0 <= eval_records(two)[-1]["vqa_accuracy"] <= 1.0


@pytest.mark.slow
def test_finetuning_beats_the_question_prior(tmp_path):
    """The whole path on CPU (about a minute on 2 cores): the debug pretraining (500 steps on
    synthetic captions), then 2 VQA epochs from its checkpoint on 2048 synthetic questions at
    64 px. The ranked answers' VQA accuracy on 128 held-out questions is well above the best
    question-only guess (~0.29; uniform over the 15 answers: 0.07). Measured: 0.48 (background
    1.0, shape colour right more than half the time, count and kind near their priors); from
    scratch, 4 epochs reach 0.41. Whole images (min_scale 1): a random crop can cut the shapes
    away."""
    pretrain = [sys.executable, "-m", "blip_recipes.cli", "run", "blip_pretrain", "--config",
                "debug", "training.steps=500", "data.num_workers=0", "metrics.tensorboard=false",
                f"job.output_dir={tmp_path / 'pretrain'}"]  # fmt: skip
    proc = subprocess.run(pretrain, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = write_synthetic_vqa(tmp_path / "data", 2048, 128, seed=0, size=64)
    init = tmp_path / "pretrain" / "checkpoints" / "step-500"
    run = finetune(data, tmp_path / "run", "model.image_size=64", "data.batch_size=16",
                   "training.epochs=2", "optimizer.lr=1e-3", "metrics.log_every=50",
                   "vqa.k_test=8", "data.min_scale=1.0", f"checkpoint.init_from={init}")  # fmt: skip
    assert_ok(run)
    assert "VQA model initialised from" in run.proc.stderr
    accuracy = eval_records(run)[-1]["vqa_accuracy"]
    assert accuracy > QUESTION_PRIOR + 0.12, accuracy


@pytest.mark.slow
def test_listed_validated_and_bad_files_named(data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "ls"], cwd=REPO,
                         capture_output=True, text=True, env=env())  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if "blip_finetune_vqa" in x)
    assert "finetune_vqa" in line
    for path in ("pretrained/bert-base-uncased/vocab.txt", "pretrained/blip_base_dcp/.metadata"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("[PAD]\n" * 30522 if path.endswith(".txt") else "")
    vqa = tmp_path / "data" / "vqa"
    vqa.mkdir(parents=True)
    record = {"image": "a.jpg", "question": "what?", "answer": ["x"] * 10, "question_id": 1}
    for name in ("vqa_train", "vqa_val", "vg_qa", "vqa_test"):
        (vqa / f"{name}.json").write_text(json.dumps([record] * 16))
    (vqa / "answer_list.json").write_text(json.dumps(["x", "y"]))
    for folder in ("coco", "visual_genome"):
        (tmp_path / "data" / "images" / folder).mkdir(parents=True)
    validate = [sys.executable, "-m", "blip_recipes.cli", "validate", "finetune_vqa"]
    out = subprocess.run(validate, cwd=tmp_path, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert "image_size = 480" in out.stdout and 'inference = "rank"' in out.stdout
    (vqa / "answer_list.json").unlink()
    out = subprocess.run(validate, cwd=tmp_path, capture_output=True, text=True, env=env())
    assert out.returncode == 2 and "'vqa.answer_list' data/vqa/answer_list.json does not" in (
        out.stderr
    )
    bad = tmp_path / "bad.json"
    good = {"image": "a.jpg", "question": "q?", "answer": "x"}
    bad.write_text(json.dumps([good] * 15 + [{**good, "answer": 7}]))
    run = finetune(data, tmp_path / "bad", f'data.sources.0.paths=["{bad}"]', "training.epochs=1")
    assert run.proc.returncode == 2
    assert f"{bad} record 15: 'answer' must be a non-empty list" in run.proc.stderr
    assert "Traceback" not in run.proc.stderr
