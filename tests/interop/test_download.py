"""`blip download`: known assets fetched through huggingface_hub.snapshot_download (mocked here:
no network) into pretrained/NAME, where the shipped configs read them."""

from __future__ import annotations

import builtins
import sys

import pytest

from blip_recipes.cli import dispatch as cli
from blip_recipes.interop import download


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download stand-in: records its arguments, writes the allowed files."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        from pathlib import Path

        calls.append(dict(repo_id=repo_id, revision=revision, local_dir=local_dir,
                          allow_patterns=allow_patterns))  # fmt: skip
        for name in allow_patterns:
            (Path(local_dir) / name).write_text("x")
        return local_dir

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls


def test_download_fetches_into_dir_slash_name(fake_hub, tmp_path, capsys):
    rc = cli.main(
        ["download", "bert-base-uncased", "deit-base-patch16-224", "--dir", str(tmp_path)]
    )
    assert rc == 0
    assert [c["repo_id"] for c in fake_hub] == [
        "google-bert/bert-base-uncased",
        "timm/deit_base_patch16_224.fb_in1k",
    ]
    bert = tmp_path / "bert-base-uncased"
    assert fake_hub[0]["local_dir"] == str(bert)
    assert (bert / "vocab.txt").is_file() and (bert / "model.safetensors").is_file()
    assert "*.bin" not in fake_hub[0]["allow_patterns"]  # one copy of the weights only
    assert (tmp_path / "deit-base-patch16-224" / "model.safetensors").is_file()
    assert f"ok: {bert}" in capsys.readouterr().out


def test_every_asset_fetches_safetensors_and_config(fake_hub, tmp_path):
    for name, asset in download.ASSETS.items():
        assert download.download(name, tmp_path) == tmp_path / name
        assert "model.safetensors" in asset.files and "config.json" in asset.files
    assert len(fake_hub) == len(download.ASSETS)


def test_list_and_usage_errors(capsys):
    assert cli.main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("bert-base-uncased", "deit-base-patch16-224", "vit-large-patch16-224",
                 "blip-itm-base-coco", "blip-image-captioning-base"):  # fmt: skip
        assert name in out
    assert cli.main(["download", "nope"]) == 2
    assert "unknown asset(s) nope" in capsys.readouterr().err
    assert cli.main(["download", "--dir"]) == 2
    assert cli.main(["--help"]) == 0 and "blip download" in capsys.readouterr().out


def test_missing_huggingface_hub_says_how_to_install(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    assert cli.main(["download", "bert-base-uncased", "--dir", str(tmp_path)]) == 1
    assert "pip install 'blip-recipes[hub]'" in capsys.readouterr().err


def test_failed_download_is_one_line(monkeypatch, tmp_path, capsys):
    hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    assert cli.main(["download", "blip-itm-base-coco", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Salesforce/blip-itm-base-coco" in err and "network unreachable" in err
    assert "Traceback" not in err


def test_download_command_for_config_paths():
    assert download.download_command("bert-base-uncased") == "blip download bert-base-uncased"
    assert (
        download.download_command("bert-base-uncased", "/data/w/bert-base-uncased")
        == "blip download bert-base-uncased --dir /data/w"
    )
    assert download.asset_for_path("pretrained/deit-base-patch16-224").repo_id.startswith("timm/")
    assert download.asset_for_path("my/own.pth") is None
