"""`blip benchmark vs-reference` without the original code: it skips in one line, and a folder
that is not a checkout of it is refused in one line. (The comparison itself needs the original
code and takes minutes at ViT-B: docs/performance.md has its numbers.)"""

from __future__ import annotations

from blip_recipes.cli import dispatch as cli
from blip_recipes.commands.benchmark_vs_reference import main


def test_without_a_reference_dir_nothing_is_measured(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no --reference-dir" in out[0] and "nothing measured" in out[0]


def test_a_folder_without_the_original_code_is_one_line(tmp_path, capsys):
    assert cli.main(["benchmark", "vs-reference", "--reference-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "models/blip_pretrain.py" in err[0]
