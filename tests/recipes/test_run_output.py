"""What a pretraining run says and leaves behind: rank-0 console, per-rank log files,
checkpoint-save lines, the end-of-run summary, run_info.json, timestamps, TensorBoard caption
images and hparams."""

from __future__ import annotations

import json
import re
import socket

from tests.recipes.launch import run_recipe


def _ok(run):
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]


def test_two_ranks_rank0_speaks_every_rank_logs_to_a_file(tmp_path):
    run = run_recipe(tmp_path / "run", "training.steps=3", "checkpoint.interval=2", nproc=2)
    _ok(run)
    out, err = run.proc.stdout, run.proc.stderr
    assert "[rank1]" not in err  # other ranks keep to their files
    assert err.count("setup done") == 1
    assert "all_gather_into_tensor" not in err and "wrong gradients" not in err
    assert len(re.findall(r"^step 3/3 \|", out, re.M)) == 1
    for step in (2, 3):
        assert re.search(rf"checkpoint step-{step} saved: [\d.]+ [KMG]?i?B in [\d.]+ s", err), err
    assert re.search(r"run summary: 3 steps \(0 -> 3\) in \d+:\d\d, [\d.]+ samples/s", err)
    assert "  last: loss " in err and f"checkpoint: {run.output_dir}/checkpoints/step-3" in err

    logs = run.output_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    rank1 = (logs / "rank1.log").read_text()
    assert "[rank1]" in rank1 and "setup done" in rank1
    assert "run summary" in (logs / "rank0.log").read_text()

    info = json.loads((run.output_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["hosts"] == [socket.gethostname()] * 2
    assert info["data_parallel"]["kind"] == "fsdp"
    assert info["data_parallel"]["mesh"] == {"dp_shard": 2}
    assert info["seed"] == info["config"]["job"]["seed"]
    assert info["config"]["training"]["steps"] == 3
    for name in ("python", "torch", "torchao", "torchdata", "transformers", "tiktoken"):
        assert info["versions"][name], name
    assert info["start_time"] and "git_commit" in info
    assert info["recipe"]["path"].endswith("recipes/blip_pretrain.py") and info["recipe"]["builtin"]
    assert len(info["recipe"]["sha256"]) == 64
    summary = info["summary"]
    assert summary["steps"] == 3 and summary["samples"] == 3 * 8 * 2
    assert summary["last"]["loss"] == run.metrics[-1]["loss"]
    times = [m["time"] for m in run.metrics]
    assert times == sorted(times) and abs(times[-1] - info["start_time_unix"]) < 600


def test_eval_captions_as_images_and_hparams_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from blip_recipes.data import synthetic_sample

    entries = []
    for i in range(4):
        image, caption = synthetic_sample(123, i, size=48)
        image.save(tmp_path / f"{i}.jpg")
        entries.append({"image": f"{i}.jpg", "caption": [caption]})
    (tmp_path / "test.json").write_text(json.dumps(entries))
    run = run_recipe(tmp_path / "run", "training.steps=2", "eval.every_steps=2", "eval.k_test=2",
                     f"eval.annotation={tmp_path / 'test.json'}", f"eval.image_root={tmp_path}",
                     "eval.num_captions=3", "eval.progress=false",
                     "metrics.tensorboard=true")  # fmt: skip
    _ok(run)
    acc = EventAccumulator(str(run.output_dir / "tensorboard"))
    acc.Reload()
    (grid,) = acc.Images("eval/captioned_images")
    assert grid.step == 2 and grid.width == 3 * 160
    assert "eval/captions/text_summary" in acc.Tags()["tensors"]
    assert "hparam/final_loss" in acc.Tags()["scalars"]
    assert "hparam/best_r_mean" in acc.Tags()["scalars"]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    assert "best eval (step 2)" in run.proc.stderr
    info = json.loads((run.output_dir / "run_info.json").read_text())
    assert info["summary"]["best_eval"]["step"] == 2
    evals = [json.loads(x) for x in (run.output_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["time"] > 0
