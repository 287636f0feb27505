import json
import subprocess
import sys
from pathlib import Path

import torch

from blip_recipes.config import DataConfig, DataSourceConfig, TokenizerConfig
from blip_recipes.data import build_tokenizer, build_train_loader, synthetic_sample

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_dataset.py"


def test_writes_json_jsonl_and_shards_that_load(tmp_path):
    out = tmp_path / "synth"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--num", "24", "--shards", "10"]
    subprocess.run([*cmd, "--jsonl", "--seed", "3", "--image-size", "48"], check=True)
    records = json.loads((out / "annotations.json").read_text())
    assert len(records) == 24 and (out / "images" / records[5]["image"]).exists()
    assert records[5]["caption"] == synthetic_sample(3, 5, 48)[1]
    assert len((out / "annotations.jsonl").read_text().splitlines()) == 24
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "shards-00000.tar",
        "shards-00001.tar",
        "shards-00002.tar",
        "sizes.json",
    ]
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sizes == {"shards-00000.tar": 10, "shards-00001.tar": 10, "shards-00002.tar": 4}
    tok = build_tokenizer(TokenizerConfig(kind="synthetic"))
    for source in (
        DataSourceConfig(
            kind="json", paths=[str(out / "annotations.json")], image_root=str(out / "images")
        ),
        DataSourceConfig(
            kind="jsonl", paths=[str(out / "annotations.jsonl")], image_root=str(out / "images")
        ),
        DataSourceConfig(kind="shards", paths=[str(out / "shards" / "shards-{00000..00002}.tar")]),
    ):
        cfg = DataConfig(sources=[source], batch_size=4, num_workers=0, pin_memory=False)
        loader = build_train_loader(cfg, tok, 32, 3, 0, 1)
        batch = next(loader)
        assert batch["images"].shape == (4, 3, 32, 32)
        assert loader.stats()["bad_samples"] == 0
        assert (batch["input_ids"] != tok.unk_token_id).all()
        assert batch["images"].dtype == torch.uint8


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    cmd = [sys.executable, str(TOOL), "--out", str(tmp_path), "--num", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    subprocess.run([*cmd, "--force"], check=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "annotations.json").is_file()


def test_photo_like_images_are_photo_sized_and_heavy(tmp_path):
    """--photo-like writes 4:3 JPEGs of the asked short side that cost what photos cost (tens of
    KB at 384 px, against ~2 KB for the flat synthetic images), and the shards size themselves."""
    out = tmp_path / "photo"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--num", "5", "--shards", "5"]
    subprocess.run([*cmd, "--photo-like", "--short-side", "96", "--quality", "90"], check=True)
    from PIL import Image

    sizes = [Image.open(out / "images" / f"{i:06d}.jpg").size for i in range(5)]
    assert sizes == [(96, 128), (128, 96), (128, 96), (128, 96), (96, 128)]
    flat = tmp_path / "flat"
    subprocess.run([*cmd[:3], str(flat), *cmd[4:], "--image-size", "96"], check=True)
    photo_bytes = (out / "images" / "000001.jpg").stat().st_size
    assert photo_bytes > 2 * (flat / "images" / "000001.jpg").stat().st_size  # 5.6 KB vs 2.2 KB
    cfg = DataConfig(
        sources=[DataSourceConfig(kind="shards", paths=[str(out / "shards" / "shards-00000.tar")])],
        batch_size=5,
        num_workers=0,
        pin_memory=False,
    )
    loader = build_train_loader(cfg, build_tokenizer(TokenizerConfig(kind="synthetic")), 32, 0)
    assert loader.steps_per_epoch == 1  # from sizes.json
