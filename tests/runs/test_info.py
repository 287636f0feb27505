"""run_info.json contents, CPU thread choice, git commit, summary, and the first-step timer."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from blip_recipes.config import Config
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.runs.info import (
    available_cores,
    collect_run_info,
    configure_cpu_threads,
    cpu_threads_for,
    flat_config,
    git_commit,
    run_summary,
    summary_lines,
    update_run_info,
    write_run_info,
)


@pytest.mark.parametrize(
    ("device", "configured", "local_world", "env", "cores", "load", "expected"),
    [
        ("cpu", 3, 1, {"OMP_NUM_THREADS": "1"}, 8, 0.0, 3),  # the config wins
        ("cpu", 0, 1, {"OMP_NUM_THREADS": "2"}, 8, 0.0, None),  # OMP_NUM_THREADS respected
        ("cuda", 0, 8, {}, 64, 0.0, None),  # CUDA: torch's default
        ("cpu", 0, 1, {}, 8, 0.0, 8),  # an idle box: every core
        ("cpu", 0, 4, {}, 8, 0.0, 2),  # shared among the host's ranks
        ("cpu", 0, 1, {}, 8, 3.2, 4),  # cores other processes keep busy are left to them
        ("cpu", 0, 1, {}, 2, 6.0, 1),  # an oversubscribed box: one thread
        ("cpu", 0, 16, {}, 8, 0.0, 1),  # never below one
    ],
)
def test_cpu_threads_for(device, configured, local_world, env, cores, load, expected):
    threads, why = cpu_threads_for(device, configured, local_world, env, cores=cores, load=load)
    assert threads == expected and why


def test_configure_cpu_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads("cpu", configured=1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads("cpu") == torch.get_num_threads()  # left as it is
    finally:
        torch.set_num_threads(before)
    assert available_cores() >= 1


def test_git_commit_here_and_outside_a_checkout(tmp_path):
    commit = git_commit()
    if commit is not None:  # the package lives in a git checkout
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "missing") is None


def test_run_info_records_versions_hosts_seed_and_config(tmp_path):
    cfg = Config()
    cfg.job.seed = 7
    info = collect_run_info(cfg, None, start_time=1.7e9, cpu_threads=2)
    assert info["start_time"].startswith("2023-11-14T22:13:20")
    assert info["versions"]["python"] == sys.version.split()[0]
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for name in ("torchao", "torchdata", "transformers", "tiktoken"):
        assert name in info["versions"]
    assert info["hosts"] == [socket.gethostname()] and info["world_size"] == 1
    assert info["seed"] == 7 and info["cpu_threads"] == 2
    assert info["config"]["job"]["seed"] == 7 and info["config"]["model"]["name"]
    assert "git_commit" in info and "data_parallel" in info

    path = write_run_info(tmp_path, info)
    assert json.loads(path.read_text())["seed"] == 7
    write_run_info(tmp_path, {**info, "seed": 8})  # a second launch keeps the first's file
    assert json.loads((tmp_path / "run_info.json.1").read_text())["seed"] == 7
    assert json.loads(path.read_text())["seed"] == 8
    update_run_info(tmp_path, summary={"steps": 3})
    assert json.loads(path.read_text())["summary"] == {"steps": 3}
    assert update_run_info(tmp_path / "nowhere", summary={}) is None


def test_flat_config_keeps_scalars():
    @dataclass
    class Inner:
        lr: float = 1e-3
        betas: list = field(default_factory=lambda: [0.9, 0.99])
        name: str = "x"
        maybe: object = None

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        flag: bool = True

    assert flat_config(Outer()) == {"inner.lr": 1e-3, "inner.name": "x", "flag": True}
    assert flat_config(Config())["job.seed"] == Config().job.seed


def test_run_summary_and_lines():
    summary = run_summary(
        start_step=10, end_step=30, wall_seconds=4.0, samples_per_step=8,
        last_record={"step": 30, "loss": 2.5, "loss_lm": 1.0, "lr": 1e-3},
        eval_records=[{"step": 20, "r_mean": 5.0, "time": 1.0}, {"step": 30, "r_mean": 7.5}],
        outputs={"output_dir": "/out", "tensorboard": None}, stopped_by="signal 15",
    )  # fmt: skip
    assert summary["steps"] == 20 and summary["samples"] == 160
    assert summary["samples_per_sec"] == 40.0
    assert summary["last"] == {"loss": 2.5, "loss_lm": 1.0}
    assert summary["best_eval"] == {"step": 30, "r_mean": 7.5}
    assert summary["outputs"] == {"output_dir": "/out"}
    lines = summary_lines(summary)
    assert lines[0] == (
        "run summary: 20 steps (10 -> 30) in 0:04, 40.0 samples/s, stopped by signal 15"
    )
    assert "loss 2.5000" in lines[1] and "best eval (step 30): r_mean 7.50" in lines[2]
    assert lines[-1] == "  output_dir: /out"
    empty = run_summary(start_step=0, end_step=0, wall_seconds=0.0, samples_per_step=8)
    assert empty["samples_per_sec"] is None and empty["best_eval"] is None
    assert summary_lines(empty) == ["run summary: 0 steps (0 -> 0) in 0:00"]


def test_summary_says_which_losses_fell_and_whether_itm_left_its_prior():
    first = {"step": 10, "loss": 10.4, "loss_ita": 4.9, "loss_itm": 0.64, "loss_lm": 4.8,
             "itm_acc": 0.55}  # fmt: skip
    stuck = {"step": 500, "loss": 5.6, "loss_ita": 3.9, "loss_itm": 0.66, "loss_lm": 1.1,
             "itm_acc": 0.66}  # fmt: skip
    summary = run_summary(start_step=0, end_step=500, wall_seconds=60.0, samples_per_step=16,
                          first_record=first, last_record=stuck)  # fmt: skip
    (line,) = [x for x in summary_lines(summary) if x.startswith("  learning:")]
    assert line == (
        "  learning: fell: loss 10.40 -> 5.60, loss_ita 4.90 -> 3.90, loss_lm 4.80 -> 1.10; "
        "did not fall: loss_itm 0.64 -> 0.66; ITM accuracy 55% -> 66%, not yet above its 67% "
        '"no match" prior (ITM has not learnt)'
    )
    learnt = dict(stuck, loss_itm=0.3, itm_acc=0.9)
    lines = summary_lines(run_summary(start_step=0, end_step=500, wall_seconds=60.0,
                                      samples_per_step=16, first_record=first,
                                      last_record=learnt))  # fmt: skip
    assert any("loss_itm 0.64 -> 0.30" in x and 'above its 67% "no match" prior' in x
               and "not yet" not in x for x in lines)  # fmt: skip


def test_first_call_timer_logs_the_first_call_only(caplog):
    class Step:
        calls = 0

        def __call__(self, x):
            self.calls += 1
            return x + 1

    step = Step()
    timed = FirstCallTimer(step, "first step")
    with caplog.at_level(logging.INFO, logger="blip_recipes.parallel.compile"):
        assert timed(1) == 2 and timed(2) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("first step: started")
    assert re.match(r"first step: done in \d+\.\d s", messages[1]) and len(messages) == 2
    assert timed.calls == 2 and timed.seconds is not None  # attributes of the wrapped step


def test_apply_compile_says_what_compiles(caplog):
    from blip_recipes.parallel import apply_compile

    blocks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.ReLU()]
    with caplog.at_level(logging.INFO, logger="blip_recipes.parallel.compile"):
        apply_compile(blocks, backend="eager")
    assert "3 blocks (2 x Linear, 1 x ReLU)" in caplog.text


def test_git_rev_parse_timeout_is_tolerated(monkeypatch, tmp_path):
    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout", 0))

    monkeypatch.setattr(subprocess, "run", slow)
    assert git_commit(tmp_path) is None
