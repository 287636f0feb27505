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
    ]
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
