"""The `blip` command as a user runs it: a real subprocess, exit codes, outputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip_recipes.config import load_toml

REPO = Path(__file__).resolve().parents[2]
ECHO = REPO / "tests" / "assets" / "echo_recipe.py"


def blip(*args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_is_useful():
    out = blip("--help")
    assert out.returncode == 0 and "blip run" in out.stdout and "blip validate" in out.stdout
    out = blip("run", "--help")
    assert out.returncode == 0
    assert "--nproc-per-node" in out.stdout and "training.steps" in out.stdout
    assert "Samples per rank per step" in out.stdout  # field documentation is the help text


def test_validate_prints_loadable_toml(tmp_path):
    out = blip("validate", "--config", "debug", "training.steps=33", "--optimizer.lr", "0.01")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "resolved.toml"
    path.write_text(out.stdout)
    cfg = load_toml(path)
    assert cfg.training.steps == 33 and cfg.optimizer.lr == 0.01
    assert cfg.model.name == "blip_pretrain_tiny"


RECORD = '{"image": "a.jpg", "caption": "a dog"}'


def _files_of_reference_configs(root: Path) -> None:
    """What base.toml / large.toml read at start-up, as empty stand-ins under ``root``."""
    for name in ("bert-base-uncased", "deit-base-patch16-224", "vit-large-patch16-224"):
        (root / "pretrained" / name).mkdir(parents=True)
        (root / "pretrained" / name / "model.safetensors").write_bytes(b"")
    (root / "pretrained" / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n" * 30522)
    (root / "data" / "images").mkdir(parents=True)
    for name in ("coco_karpathy_train", "vg", "cc3m", "cc12m", "sbu"):
        (root / "data" / "annotations" / f"{name}.jsonl").parent.mkdir(exist_ok=True)
        (root / "data" / "annotations" / f"{name}.jsonl").write_text(
            (RECORD + "\n") * 75
        )  # one global batch of base.toml


@pytest.mark.parametrize("name", ["debug", "base", "large", "configs/base.toml"])
def test_builtin_configs_validate(name, tmp_path):
    _files_of_reference_configs(tmp_path)
    config = str(REPO / name) if name.endswith(".toml") else name
    out = blip("validate", "--config", config, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name, vision", [("base", "deit-base-patch16-224"),
                                          ("large", "vit-large-patch16-224")])  # fmt: skip
def test_reference_configs_name_the_download_command(name, vision, tmp_path):
    out = blip("validate", "--config", name, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "'model.text_init' pretrained/bert-base-uncased does not exist; fetch it with: "
        "blip download bert-base-uncased" in out.stderr
    )
    assert f"blip download {vision}" in out.stderr
    assert "coco_karpathy_train.json" in out.stderr  # every problem at once


def test_validate_errors_exit_2_without_traceback():
    out = blip("validate", "--config", "debug", "trainig.steps=3")
    assert out.returncode == 2
    assert "did you mean 'training.steps'?" in out.stderr
    assert "Traceback" not in out.stderr
    out = blip("validate", "--config", "nope")
    assert out.returncode == 2 and "built-in: " in out.stderr
    out = blip("validate", "--config", "debug", "--world-size", "3")
    assert out.returncode == 2 and "16 x 3 = 48" in out.stderr


def test_run_in_process(tmp_path):
    out = blip(
        "run",
        str(ECHO),
        "--config",
        "debug",
        f"job.output_dir={tmp_path}",
        "training.steps=4",
        "--data.batch_size",
        "8",
    )
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "echo-rank0.json").read_text())
    assert record == {"rank": 0, "world": 1, "sum": 1, "steps": 4, "batch_size": 8, "lr": 1e-3}


def test_run_through_torchrun(tmp_path):
    out = blip(
        "run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ECHO),
        "--config",
        "debug",
        f"job.output_dir={tmp_path}",
        "data.batch_size=8",
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads((tmp_path / f"echo-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    assert [r["sum"] for r in records] == [3, 3]  # the all-reduce crossed both processes


def test_run_rejects_bad_input_before_launching(tmp_path):
    out = blip(
        "run",
        "--nproc-per-node",
        "2",
        str(ECHO),
        "--config",
        "debug",
        f"job.output_dir={tmp_path}",
        "data.batch_size=10",
    )  # 256 % 20 != 0
    assert out.returncode == 2 and "10 x 2 = 20" in out.stderr
    assert not list(tmp_path.iterdir())
    out = blip("run", "--nproc-per-nod", "2", str(ECHO), "--config", "debug")
    assert out.returncode == 2 and "unknown flag '--nproc-per-nod'" in out.stderr
    out = blip("run", str(ECHO))
    assert out.returncode == 2 and "missing --config" in out.stderr
    out = blip("run", "no_such_recipe", "--config", "debug")
    from blip_recipes.config.registry import RECIPES

    assert out.returncode == 2 and f"registered: {', '.join(sorted(RECIPES))}" in out.stderr
    assert "blip_pretrain" in RECIPES and "no_such_recipe" not in out.stderr.split("registered:")[1]
    out = blip("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_paths_mean_what_they_say(tmp_path):
    """A recipe or config given as a path must exist: a typo in the folder of an edited copy is
    an error naming it and the nearest registered name, never a run of the packaged file."""
    assert blip("cp", "blip_pretrain", f"{tmp_path}/my_recipes/").returncode == 0
    out = blip("run", f"{tmp_path}/my_recipez/blip_pretrain.py", "--config", "debug")
    assert out.returncode == 2, out.stderr
    assert f"recipe file '{tmp_path}/my_recipez/blip_pretrain.py' does not exist" in out.stderr
    assert "did you mean 'blip_pretrain'?" in out.stderr
    out = blip("run", "blip_pretrian", "--config", "debug")
    assert out.returncode == 2 and "did you mean 'blip_pretrain'?" in out.stderr
    out = blip("run", f"{tmp_path}/my_recipes/blip_pretrain.py", "--config", "configs/debg.toml")
    assert out.returncode == 2 and "config file 'configs/debg.toml' does not exist" in out.stderr
    assert "did you mean 'debug'?" in out.stderr
    out = blip("validate", "--config", "debug.toml", cwd=tmp_path)  # a path: not in tmp_path
    assert out.returncode == 2 and "config file 'debug.toml' does not exist" in out.stderr
    assert blip("validate", "--config", "configs/debug.toml").returncode == 0  # from a checkout


def test_run_info_records_which_recipe_file_ran(tmp_path):
    import hashlib

    from blip_recipes.config.registry import RECIPES, recipe_record

    builtin = RECIPES["blip_pretrain"].path
    copy = tmp_path / "blip_pretrain.py"
    copy.write_text(builtin.read_text() + "# edited\n")
    record = recipe_record(builtin)
    assert record == {"path": str(builtin.resolve()), "builtin": True,
                      "sha256": hashlib.sha256(builtin.read_bytes()).hexdigest()}  # fmt: skip
    record = recipe_record(copy)
    assert record["path"] == str(copy) and record["builtin"] is False
    assert record["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_ls_and_cp(tmp_path):
    out = blip("ls")
    assert out.returncode == 0
    assert "blip_pretrain" in out.stdout and "debug, base, large" in out.stdout
    out = blip("cp", "debug", str(tmp_path))
    assert out.returncode == 0, out.stderr
    copied = tmp_path / "debug.toml"
    assert load_toml(copied).model.name == "blip_pretrain_tiny"
    copied.write_text("# mine\n")
    out = blip("cp", "debug", str(tmp_path))
    assert out.returncode == 2 and "--force" in out.stderr
    assert copied.read_text() == "# mine\n"  # never overwritten without --force
    out = blip("cp", "debug", str(tmp_path), "--force")
    assert out.returncode == 0 and copied.read_text() != "# mine\n"
    out = blip("cp", "nothing", str(tmp_path))
    assert out.returncode == 2


WAITER = '''"""Test recipe: waits for a stop signal and writes its name; STUBBORN=1 keeps waiting."""
import os
import signal
import sys
import time
from pathlib import Path


def main(argv):
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("job.output_dir=")))
    rank = os.environ.get("RANK", "0")
    got = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, _frame: got.append(signal.Signals(s).name))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not got or os.environ.get("STUBBORN")):
        time.sleep(0.02)
    (out / f"got{rank}").write_text(",".join(got))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def start_waiter(tmp_path: Path, *launcher: str, stubborn: bool = False,
                 overrides: tuple[str, ...] = ()):  # fmt: skip
    """`blip run [launcher] waiter.py` in a session of its own, once every rank is waiting."""
    recipe, out = tmp_path / "waiter.py", tmp_path / "out"
    recipe.write_text(WAITER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"STUBBORN": "1"} if stubborn else {})}
    args = [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, str(recipe),
            "--config", "debug", f"job.output_dir={out}", *overrides]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 90
    while not all((out / f"ready{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.2)  # the handlers are installed before the ready file is written
    return proc, out


def _kill_all(proc, out: Path) -> None:
    """SIGKILL what is left: the launcher's process group and each rank's."""
    groups = [proc.pid]
    for r in (0, 1):
        ready = out / f"ready{r}"
        text = ready.read_text() if ready.exists() else ""
        if text.isdigit() and int(text) > 1:
            groups.append(int(text))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_run_forwards_a_stop_signal_to_every_rank_and_exits_0(tmp_path, sig):
    """The launcher alone gets the signal (torchrun's ranks run in sessions of their own, so a
    process-group signal or Slurm's --signal=B:... reaches only `blip run`): every rank gets it,
    and their exit 0 is `blip run`'s exit 0 (torchrun alone exits 1, or dies of SIGUSR1)."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2")
    try:
        proc.send_signal(sig)
        if sig != signal.SIGINT:  # a repeat is ignored, not a hard stop
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == [sig.name, sig.name]
    assert f"stopped on {sig.name}" in err


def test_run_second_ctrl_c_stops_the_ranks_now(tmp_path):
    """Ranks still busy: a repeated SIGTERM changes nothing (Slurm and srun can deliver one stop
    twice), a later SIGINT hands over to torchrun's shutdown (SIGINT to the ranks, SIGKILL
    after --shutdown-timeout) and `blip run` exits 128 + SIGINT."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2",
                             "--shutdown-timeout", "2", stubborn=True)  # fmt: skip
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting for the ranks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "torchrun stopped the ranks" in err
    assert not any((out / f"got{r}").exists() for r in (0, 1))  # SIGKILLed while waiting


def test_run_kills_ranks_still_running_after_the_stop_timeout(tmp_path):
    """Ranks that do not exit after a stop signal (a hung rank) are killed once
    job.stop_timeout_s has passed, with one line, and `blip run` exits 1: a stop always ends."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2", stubborn=True,
                             overrides=("job.stop_timeout_s=2",))  # fmt: skip
    try:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 1, err[-3000:]
    assert "still running 2 s after SIGTERM (job.stop_timeout_s)" in err
    assert 2 <= took < 30
    assert not any((out / f"got{r}").exists() for r in (0, 1))  # killed while waiting


def test_run_continues_a_stopped_rank_so_that_it_hears_the_stop(tmp_path):
    """A rank stopped with SIGSTOP (never continued) would never see a SIGTERM: the launcher
    sends SIGCONT first, and the job stops normally (exit 0)."""
    proc, out = start_waiter(tmp_path, "--standalone", "--nproc-per-node", "2")
    try:
        os.kill(int((out / "ready1").read_text()), signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"]


SLOW_START = '''"""Test recipe: slow to import (like torch); reports a stop that came meanwhile."""
import os
import sys
import time
from pathlib import Path

OUT = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("job.output_dir=")))
OUT.mkdir(parents=True, exist_ok=True)
(OUT / f"importing{os.environ['RANK']}").write_text("")
time.sleep(3)


def main(argv):
    (OUT / f"got{os.environ['RANK']}").write_text(os.environ.get("BLIP_STOP_REQUESTED", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def test_a_stop_while_the_ranks_import_is_kept_for_the_recipe(tmp_path):
    """SIGTERM to the whole job while the ranks still import: no rank dies of it (the rank
    entry point records it before any import) and the recipe finds it as the stop request."""
    recipe, out = tmp_path / "slow.py", tmp_path / "out"
    recipe.write_text(SLOW_START)
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "--standalone", "--nproc-per-node",
            "2", str(recipe), "--config", "debug", f"job.output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not all((out / f"importing{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's group: it forwards to the ranks
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_all(proc, out)
    assert proc.returncode == 0, err[-3000:]
    assert [(out / f"got{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2


def test_run_and_validate_refuse_zero_ranks():
    out = blip("run", "--nproc-per-node", "0", "blip_pretrain", "--config", "debug")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--nproc-per-node x --nnodes must be >= 1, got 0" in out.stderr
    out = blip("validate", "--config", "debug", "--world-size", "0")
    assert out.returncode == 2 and "--world-size must be >= 1, got 0" in out.stderr


def test_run_takes_the_stop_signals_from_torchrun(monkeypatch):
    """torchrun keeps SIGHUP/SIGQUIT; a --signals-to-handle the user gives is left as it is."""
    from blip_recipes.cli.dispatch import STOP_SIGNALS, _stop_signals_for

    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE", raising=False)
    launcher, ours = _stop_signals_for(["--nproc-per-node", "2"])
    assert launcher == ["--nproc-per-node", "2", "--signals-to-handle", "SIGHUP,SIGQUIT"]
    assert ours == STOP_SIGNALS
    launcher, ours = _stop_signals_for(["--signals-to-handle=SIGTERM,SIGUSR2"])
    assert launcher == ["--signals-to-handle=SIGTERM,SIGUSR2"]
    assert ours == (signal.SIGINT, signal.SIGUSR1)


def test_inference_recipes_skip_the_training_only_checks():
    """The queue must hold whole global batches of a training run; CapFilt and evaluation do
    not train, so their configs validate at any world size."""
    out = blip("validate", "--config", "debug", "--world-size", "7")
    assert out.returncode == 2 and "'momentum.queue_size'" in out.stderr
    out = blip("validate", "--config", "capfilt", "--world-size", "7")
    assert "queue_size" not in out.stderr


def test_validate_runs_the_fine_tuning_section_checks():
    out = blip(
        "validate", "--config", "debug", "retrieval.eval_every_epochs=0", "caption.num_beams=0"
    )
    assert out.returncode == 2
    assert "'retrieval.eval_every_epochs' must be >= 1" in out.stderr
    assert "'caption.num_beams' must be >= 1" in out.stderr
