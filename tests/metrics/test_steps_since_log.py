"""The steps since the last log step: device sums of applied steps only, one record at a log step."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from blip_recipes.metrics.steps_since_log import StepsSinceLog


def _result(loss: float, ok: bool, grad_norm: float = 1.5) -> SimpleNamespace:
    return SimpleNamespace(
        output=SimpleNamespace(loss=torch.tensor(loss)),
        ok=torch.tensor(ok),
        grad_norm=torch.tensor(grad_norm),
    )


def test_means_skip_the_skipped_steps_and_the_record_counts_them():
    since_log = StepsSinceLog(torch.device("cpu"), ("loss",))
    for loss, ok in ((2.0, True), (float("nan"), False), (4.0, True)):
        since_log.add(_result(loss, ok))
    since_log.data_wait = 0.0
    assert since_log.means() == {"loss": 3.0} and since_log.skipped() == 1
    record = since_log.record(
        _result(4.0, True, grad_norm=0.25), lr=1e-4, samples_per_step=8, world_size=2,
        flops_per_sample=None, bad_samples=3, nonfinite_before=5, epoch=1, extra={"temp": 0.07},
    )  # fmt: skip
    assert list(record) == ["loss", "lr", "temp", "grad_norm", "samples_per_sec", "mfu",
                            "max_memory_gib", "data_wait_frac", "bad_samples",
                            "nonfinite_steps", "epoch"]  # fmt: skip
    assert record["loss"] == 3.0 and record["grad_norm"] == 0.25 and record["mfu"] is None
    assert record["nonfinite_steps"] == 6 and record["bad_samples"] == 3
    assert record["samples_per_sec"] > 0 and record["data_wait_frac"] == 0.0


def test_a_window_of_skipped_steps_only_logs_nan():
    since_log = StepsSinceLog(torch.device("cpu"), ("loss", "loss_ita"))
    since_log.add(SimpleNamespace(output=SimpleNamespace(loss=torch.tensor(1.0),
                                                         loss_ita=torch.tensor(2.0)),
                                  ok=torch.tensor(False)))  # fmt: skip
    means = since_log.means()
    assert set(means) == {"loss", "loss_ita"}
    assert all(v != v for v in means.values())  # NaN
    assert since_log.skipped() == 1
