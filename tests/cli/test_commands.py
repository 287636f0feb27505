"""The installed ``blip`` command tree: --version, every subcommand's --help, ``blip cp`` into a
folder, the data / benchmark groups, and the tools/ wrappers running the same code."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import blip_recipes
from blip_recipes.cli import dispatch as cli

ROOT = Path(__file__).resolve().parents[2]

SUBCOMMANDS = [
    ("caption",),
    ("convert",),
    ("data", "synthetic"),
    ("data", "build-shards"),
    ("benchmark",),
    ("benchmark", "data"),
    ("benchmark", "float8-layers"),
    ("benchmark", "flops"),
    ("benchmark", "vs-reference"),
]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"blip-recipes {metadata.version('blip-recipes')}"
    assert blip_recipes.__version__ == metadata.version("blip-recipes")


def test_main_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"blip {command}" in out
    for words in SUBCOMMANDS:
        assert "blip " + " ".join(words) in out or words[-1] in out
    assert "--version" in out


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_each_subcommand_has_its_own_help(words, capsys):
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: blip {' '.join(words)}" in out


def test_benchmark_help_names_its_subcommands(capsys):
    assert cli.main(["benchmark", "--help"]) == 0
    out = capsys.readouterr().out
    for sub in cli.BENCHMARK_COMMANDS:
        assert f"blip benchmark {sub} --help" in out


def test_unknown_group_command_is_a_usage_error(capsys):
    assert cli.main(["data", "nope"]) == 2
    assert "synthetic" in capsys.readouterr().err


def test_subcommand_usage_error_exits_2(capsys):
    assert cli.main(["data", "synthetic"]) == 2  # --out and --num are required
    assert "usage: blip data synthetic" in capsys.readouterr().err


def test_data_synthetic_runs(tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        cli.main(["data", "synthetic", "--out", str(out), "--num", "3", "--image-size", "16"]) == 0
    )
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(annotations) == 3


@pytest.mark.parametrize("name,suffix", [("debug", ".toml"), ("blip_pretrain", ".py")])
def test_cp_into_existing_folder(tmp_path, name, suffix, capsys):
    assert cli.main(["cp", name, str(tmp_path)]) == 0
    target = tmp_path / f"{name}{suffix}"
    assert target.is_file() and target.stat().st_size > 0
    assert cli.main(["cp", name, str(tmp_path)]) == 2  # no overwrite
    assert "--force" in capsys.readouterr().err
    target.write_text("edited")
    assert cli.main(["cp", name, str(tmp_path), "--force"]) == 0
    assert target.read_text() != "edited"


def test_cp_to_new_folder_with_trailing_slash(tmp_path):
    dest = tmp_path / "mine" / "configs"
    assert cli.main(["cp", "debug", f"{dest}/"]) == 0
    assert (dest / "debug.toml").is_file()
    assert cli.main(["cp", "debug.toml", f"{dest}/"]) == 2  # exists now


def test_cp_to_file_name(tmp_path):
    assert cli.main(["cp", "debug", str(tmp_path / "my_run.toml")]) == 0
    assert (tmp_path / "my_run.toml").is_file()


def test_tools_wrapper_and_module_run_the_same_command():
    for cmd in (
        [sys.executable, str(ROOT / "tools" / "make_synthetic_dataset.py"), "--help"],
        [sys.executable, "-m", "blip_recipes.cli", "data", "synthetic", "--help"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert "--num NUM" in proc.stdout
