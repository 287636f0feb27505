"""The `blip` command as a user runs it: a real subprocess, exit codes, outputs."""

import json
import os
import subprocess
import sys
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


def test_run_and_validate_refuse_zero_ranks():
    out = blip("run", "--nproc-per-node", "0", "blip_pretrain", "--config", "debug")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--nproc-per-node x --nnodes must be >= 1, got 0" in out.stderr
    out = blip("validate", "--config", "debug", "--world-size", "0")
    assert out.returncode == 2 and "--world-size must be >= 1, got 0" in out.stderr


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
