"""MetricsLogger files read back (JSONL, TensorBoard via EventAccumulator), console line, MFU."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from blip_recipes.metrics import (
    VIT_B_FLOPS_PER_SAMPLE,
    MetricsLogger,
    effective_mfu,
    flops_per_sample,
    format_duration,
    max_memory_gib,
    peak_flops,
)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_tensorboard_and_console(tmp_path):
    lines = []
    logger = MetricsLogger(
        tmp_path, rank=0, tensorboard=True, total_steps=30, print_fn=lines.append
    )
    for step in (10, 20, 30):
        logger.log(step, {"loss": torch.tensor(3.0 - step / 10), "lr": 1e-4, "mfu": None,
                          "samples_per_sec": 100.0, "itm_acc": 0.5, "bad_samples": 2})  # fmt: skip
    logger.log(31, {"loss": float("nan"), "grad_norm": math.inf})
    logger.close()
    logger.close()

    recs = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [10, 20, 30, 31]
    assert list(recs[0])[:2] == ["step", "time"]
    assert all(abs(r["time"] - time.time()) < 600 for r in recs)  # UNIX seconds
    assert {k: v for k, v in recs[0].items() if k not in ("max_memory_gib", "time")} == {
        "step": 10, "loss": 2.0, "lr": 1e-4, "mfu": None, "samples_per_sec": 100.0,
        "itm_acc": 0.5, "bad_samples": 2}  # fmt: skip
    assert recs[0]["max_memory_gib"] > 0
    assert recs[3]["loss"] is None and recs[3]["grad_norm"] is None  # strict JSON

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/itm_acc", "train/bad_samples"} <= set(tags)
    assert "train/mfu" not in tags  # null values are not scalars
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([2.0, 1.0, 0.0])

    assert lines[0].startswith(
        "step 10/30 | loss 2.0000 | itm acc 50% | lr 1.000e-04 | 100.0 samples/s | mem"
    )
    assert "eta" not in lines[0] and "eta" in lines[1]


def test_mfu_and_memory_are_added(tmp_path, monkeypatch):
    import blip_recipes.metrics.logger as logger_module

    cpu = MetricsLogger(tmp_path / "cpu", tensorboard=False, print_fn=lambda s: None)
    assert cpu.log(1, {"samples_per_sec": 10.0}, flops_per_sample=1e9)["mfu"] is None  # CPU
    cpu.close()
    monkeypatch.setattr(logger_module, "peak_flops", lambda device: 989e12)
    logger = MetricsLogger(tmp_path, tensorboard=False, world_size=4, print_fn=lambda s: None)
    rec = logger.log(5, {"samples_per_sec": 4520.0}, flops_per_sample=VIT_B_FLOPS_PER_SAMPLE,
                     total_steps=100)  # fmt: skip
    assert rec["mfu"] == pytest.approx(1130.0 * 306.8e9 / 989e12)  # per device: 4520 / 4
    assert rec["max_memory_gib"] > 0 and logger.total_steps == 100
    rec = logger.log(6, {"samples_per_sec": 10.0})  # no FLOP count (tiny model): null
    assert rec["mfu"] is None
    logger.close()


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "out", rank=1, print_fn=lambda s: pytest.fail(s))
    assert logger.log(1, {"loss": 1.0}) is None
    logger.close()
    assert not (tmp_path / "out").exists()


def test_resume_appends_and_drops_later_records(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, print_fn=lambda s: None)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # cut short by a crash
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2, print_fn=lambda s: None)
    logger.log(3, {"loss": 30.0})
    logger.close()
    assert [(r["step"], r["loss"]) for r in _records(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]  # fmt: skip


def test_mfu_and_peaks():
    assert effective_mfu(1130.0, VIT_B_FLOPS_PER_SAMPLE, 989e12) == pytest.approx(0.3505, abs=1e-3)
    assert effective_mfu(100.0, VIT_B_FLOPS_PER_SAMPLE, None) is None
    assert effective_mfu(100.0, None, 989e12) is None
    assert peak_flops(torch.device("cpu")) is None
    assert flops_per_sample("blip_pretrain_base") == 306.8e9
    assert flops_per_sample("blip_pretrain_large") == 681.0e9
    assert flops_per_sample("blip_pretrain_tiny") is None
    assert 0.01 < max_memory_gib(torch.device("cpu")) < 1000
    assert format_duration(3723) == "1:02:03" and format_duration(59) == "0:59"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_flops_on_gpu():
    name = torch.cuda.get_device_name()
    peak = peak_flops(torch.device("cuda"))
    if "H100" in name or "H200" in name:
        assert peak == 989e12
    torch.ones(1024, 1024, device="cuda")
    assert max_memory_gib(torch.device("cuda")) >= 4 / 1024


def test_log_eval_writes_its_own_file_and_tensorboard(tmp_path):
    lines: list[str] = []
    logger = MetricsLogger(tmp_path, rank=0, tensorboard=True, print_fn=lines.append)
    logger.log_eval(5, {"txt_r1": 50.0, "r_mean": 62.5})
    logger.close()
    record = json.loads((tmp_path / "eval.jsonl").read_text())
    assert abs(record.pop("time") - time.time()) < 600
    assert record == {"step": 5, "txt_r1": 50.0, "r_mean": 62.5}
    assert not (tmp_path / "metrics.jsonl").read_text()  # training records stay separate
    assert lines == ["eval at step 5 | r_mean 62.50"]
    logger = MetricsLogger(tmp_path / "caption", rank=0, print_fn=lines.append)
    logger.log_eval(9, {"val_Bleu_4": 0.78601, "val_CIDEr": 4.5382})  # no headline: all shown
    logger.close()
    assert lines[-1] == "eval at step 9 | val_Bleu_4 0.786 | val_CIDEr 4.538"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"eval/txt_r1", "eval/r_mean"} <= set(acc.Tags()["scalars"])


def _quiet(tmp_path, **kwargs):
    return MetricsLogger(tmp_path, tensorboard=False, print_fn=lambda s: None, **kwargs)


def _write_run(tmp_path, steps, loss=1.0):
    """Append records as a run without restart handling would."""
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def test_fresh_start_moves_old_records_to_a_backup(tmp_path):
    _write_run(tmp_path, [1, 2, 3])  # a run that died before its first checkpoint
    (tmp_path / "eval.jsonl").write_text('{"step": 2, "r_mean": 1.0}\n')
    lines = []
    logger = MetricsLogger(tmp_path, tensorboard=False, print_fn=lines.append)
    logger.log(1, {"loss": 10.0})
    logger.close()
    assert [(r["step"], r["loss"]) for r in _records(tmp_path / "metrics.jsonl")] == [(1, 10.0)]
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl.1")] == [1, 2, 3]
    assert not (tmp_path / "eval.jsonl").exists()
    assert _records(tmp_path / "eval.jsonl.1") == [{"step": 2, "r_mean": 1.0}]
    assert logger.backups == [tmp_path / "metrics.jsonl.1", tmp_path / "eval.jsonl.1"]
    assert any("metrics.jsonl.1" in line for line in lines)
    # A second fresh start: the next free number, older backups untouched.
    _quiet(tmp_path).close()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl.2")] == [1]
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl.1")] == [1, 2, 3]


def test_fresh_start_on_an_empty_file_makes_no_backup(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    _quiet(tmp_path).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_drops_later_and_repeated_steps_keeping_a_backup(tmp_path):
    # What the old behaviour left behind: a dead run's rows after the checkpoint at step 4, and
    # a second pass over steps 3..6 appended after them.
    _write_run(tmp_path, [1, 2, 3, 4, 5, 6], loss=1.0)
    _write_run(tmp_path, [3, 4, 5, 6], loss=2.0)
    original = (tmp_path / "metrics.jsonl").read_text()
    logger = _quiet(tmp_path, resume_step=4)
    for step in (5, 6):
        logger.log(step, {"loss": 3.0})
    logger.close()
    recs = _records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [
        (1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 3.0), (6, 3.0)]  # fmt: skip
    assert (tmp_path / "metrics.jsonl.1").read_text() == original  # nothing lost


def test_resume_with_nothing_to_drop_makes_no_backup(tmp_path):
    _write_run(tmp_path, [1, 2])
    _quiet(tmp_path, resume_step=2).close()
    assert not (tmp_path / "metrics.jsonl.1").exists()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_tensorboard_after_restarts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(resume_step, steps, loss):
        logger = MetricsLogger(tmp_path, resume_step=resume_step, print_fn=lambda s: None)
        for step in steps:
            logger.log(step, {"loss": loss})
        logger.close()

    def scalars(folder):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    run(None, [1, 2, 3], 1.0)
    run(2, [3, 4], 2.0)  # resumed at step 2: the first run's step 3 is hidden
    assert scalars(tmp_path / "tensorboard") == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    run(None, [1], 5.0)  # a fresh start moves the old events aside
    assert scalars(tmp_path / "tensorboard") == [(1, 5.0)]
    assert (tmp_path / "tensorboard.1").is_dir()
