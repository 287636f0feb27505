"""What users of TorchTune, TorchTitan and the Hugging Face hub type first: accepted or hinted."""

from __future__ import annotations

import pytest

from blip_recipes.cli import main
from blip_recipes.commands.caption import run_checkpoint


def test_validate_takes_the_config_positionally_and_as_job_config_file(capsys):
    assert main(["validate", "debug", "training.steps=30"]) == 0
    positional = capsys.readouterr().out
    assert "steps = 30" in positional
    assert main(["validate", "--job.config_file", "debug", "training.steps=30"]) == 0
    assert capsys.readouterr().out == positional


def test_download_of_a_hub_id_names_the_short_name(capsys):
    assert main(["download", "google-bert/bert-base-uncased"]) == 2
    err = capsys.readouterr().err
    assert "`blip download bert-base-uncased`" in err and len(err.splitlines()) == 1


def test_ls_help_is_help(capsys):
    assert main(["ls", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: blip ls") and "RECIPE" not in out


@pytest.mark.parametrize("option", ["--num-beams", "--method", "--max-length", "--min-length"])
def test_caption_help_shows_defaults(option, capsys):
    assert main(["caption", "--help"]) == 0
    out = capsys.readouterr().out
    options = out.split("options:", 1)[1]
    line = options[options.index(f"  {option}") :].split("\n  -", 1)[0]
    assert "(default: " in line, line
    assert 'default: "a picture of "' in out


def test_caption_of_a_run_prefers_best(tmp_path):
    for step in ("checkpoints/step-4", "checkpoints/step-8", "best/step-6"):
        (tmp_path / step).mkdir(parents=True)
        (tmp_path / step / ".metadata").write_bytes(b"")
    assert run_checkpoint(str(tmp_path)) == str(tmp_path / "best" / "step-6")
    (tmp_path / "best" / "step-6" / ".metadata").unlink()  # an unfinished save of best/
    assert run_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step-8")
    step = str(tmp_path / "checkpoints" / "step-4")
    assert run_checkpoint(step) == step
