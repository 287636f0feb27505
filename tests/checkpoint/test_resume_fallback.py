"""Through the real `blip run` CLI: a damaged newest checkpoint makes `checkpoint.resume=auto`
fall back to the older intact one (with a warning naming the damage) and the run finishes."""

from __future__ import annotations

import shutil

import pytest

from blip_recipes.checkpoint.integrity import step_dirs
from blip_recipes.cli.dispatch import main as cli_main
from tests.checkpoint.damage import DAMAGE
from tests.recipes.launch import run_recipe


def step_names(out) -> list[str]:
    return [p.name for _, p in step_dirs(out / "checkpoints")]


def assert_ok(run):
    assert run.proc.returncode == 0, run.proc.stderr[-4000:]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied, never changed, by each test)."""
    out = tmp_path_factory.mktemp("source") / "run"
    run = run_recipe(out, "training.steps=4", "checkpoint.interval=2")
    assert_ok(run)
    assert step_names(out) == ["step-2", "step-4"]
    return out


def verify(path, capsys) -> tuple[int, str]:
    """`blip checkpoint verify PATH` in this process: exit status and output."""
    capsys.readouterr()
    code = cli_main(["checkpoint", "verify", str(path)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_older_one(
    tmp_path, two_checkpoints, damage, capsys
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    damage_fn, fragments = DAMAGE[damage]
    damage_fn(out / "checkpoints" / "step-4")

    run = run_recipe(out, "training.steps=6", "checkpoint.interval=2")
    assert_ok(run)
    err = run.proc.stderr
    assert "step-4 is damaged, not resuming from it" in err
    assert all(fragment in err for fragment in fragments), err[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in err
    assert [m["step"] for m in run.metrics][-4:] == [3, 4, 5, 6]  # steps 3-4 done again
    assert step_names(out) == ["step-4", "step-6"]  # keep_latest_k=2
    assert (out / "checkpoints" / "corrupt-step-4").is_dir()  # kept aside for inspection
    code, printed = verify(out, capsys)
    assert code == 0, printed
    assert printed.count(": OK (") == 2


def test_no_intact_checkpoint_stops_with_a_clear_error(tmp_path, two_checkpoints, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    DAMAGE["flipped_bytes"][0](out / "checkpoints" / "step-4")
    DAMAGE["deleted_shard"][0](out / "checkpoints" / "step-2")

    explicit = run_recipe(out, "training.steps=6", f"checkpoint.resume={out}/checkpoints/step-4")
    assert explicit.proc.returncode != 0
    assert "step-4 is damaged: CORRUPT: __0_0.distcp: hash mismatch" in explicit.proc.stderr

    run = run_recipe(out, "training.steps=6")
    assert run.proc.returncode != 0
    assert f"no intact checkpoint to resume from in {out / 'checkpoints'}" in run.proc.stderr
    assert "step-2: __0_0.distcp: missing" in run.proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    code, printed = verify(out / "checkpoints", capsys)
    assert code == 1
    assert "0 of 2 checkpoints verified intact" in printed


@pytest.mark.slow
def test_two_ranks_agree_on_the_fallback(tmp_path):
    out = tmp_path / "run"
    assert_ok(run_recipe(out, "training.steps=4", "checkpoint.interval=2", nproc=2))
    DAMAGE["flipped_bytes"][0](out / "checkpoints" / "step-4")  # one rank's shard
    run = run_recipe(out, "training.steps=6", "checkpoint.interval=2", nproc=2)
    assert_ok(run)
    assert run.proc.stderr.count("resumed from") == 2  # each rank, the same folder
    assert run.proc.stderr.count(f"resumed from {out / 'checkpoints' / 'step-2'}") == 2
    assert run.metrics[-1]["step"] == 6
