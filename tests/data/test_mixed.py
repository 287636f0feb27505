"""Shards mixed with map-style sources by weight in every batch: share, slots, bitwise resume."""

import json

import numpy as np
import pytest
import torch

from blip_recipes.config import DataConfig, DataSourceConfig
from blip_recipes.data import build_train_loader, synthetic_sample
from blip_recipes.data.mixed import MixedLoader, shard_slots
from blip_recipes.data.tar_format import write_shard

SYNTHETIC = 30  # synthetic image ids are 0..29; shard ids are 63-bit hashes


@pytest.fixture
def shard_dir(tmp_path):
    """3 shards of 10 samples with a sizes.json (the mix needs the shard count)."""
    import io

    sizes = {}
    for s in range(3):
        samples = []
        for i in range(10):
            img, caption = synthetic_sample(1, 100 + s * 10 + i, 32)
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            samples.append((f"k{s}_{i}", buf.getvalue(), "jpg", caption))
        name = f"mix-{s:03d}.tar"
        write_shard(str(tmp_path / name), samples)
        sizes[name] = 10
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    return tmp_path


def _cfg(shard_dir, workers=0, shard_weight=2.0, batch_size=4):
    return DataConfig(
        sources=[
            DataSourceConfig(kind="synthetic", num_samples=SYNTHETIC, image_size=32),
            DataSourceConfig(
                kind="shards", paths=[str(shard_dir / "mix-{000..002}.tar")], weight=shard_weight
            ),
        ],
        batch_size=batch_size,
        num_workers=workers,
        shuffle_buffer=4,
        pin_memory=False,
    )


def _is_shard(batch):
    return batch["image_ids"] >= SYNTHETIC


def test_share_and_slots_follow_the_weights(shard_dir, synthetic_tokenizer):
    loader = build_train_loader(_cfg(shard_dir), synthetic_tokenizer, 16, 3, 0, 1)
    assert isinstance(loader, MixedLoader)
    # 30 synthetic + 2 x 30 shard samples an epoch: p = 2/3, 90 // 4 steps
    assert loader.shard_share == pytest.approx(2 / 3) and loader.steps_per_epoch == 22
    draws = np.stack([shard_slots(3, s, 4, loader.shard_share) for s in range(2000)])
    assert abs(draws.mean() - 2 / 3) < 0.02
    shard_count = 0
    for step in range(40):
        batch = next(loader)
        assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.uint8
        assert batch["input_ids"].shape == (4, 30) and batch["image_ids"].shape == (4,)
        # every slot holds the kind its draw says
        assert _is_shard(batch).tolist() == shard_slots(3, step, 4, loader.shard_share).tolist()
        shard_count += int(_is_shard(batch).sum())
    assert 0.55 < shard_count / 160 < 0.78  # both kinds, in proportion
    assert loader.stats()["samples"] == 160 and loader.stats()["epoch"] == 1


def test_map_slots_split_over_ranks_like_one_rank(shard_dir, synthetic_tokenizer):
    one = build_train_loader(_cfg(shard_dir, batch_size=8), synthetic_tokenizer, 16, 5, 0, 1)
    ranks = [
        build_train_loader(_cfg(shard_dir), synthetic_tokenizer, 16, 5, r, 2) for r in range(2)
    ]
    for _ in range(6):
        full = next(one)
        parts = [next(r) for r in ranks]
        ids = torch.cat([p["image_ids"] for p in parts])
        is_map = ids < SYNTHETIC
        # the same draws and the same map-style samples, whatever the split
        assert torch.equal(is_map, full["image_ids"] < SYNTHETIC)
        assert torch.equal(ids[is_map], full["image_ids"][full["image_ids"] < SYNTHETIC])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_run_bitwise(shard_dir, synthetic_tokenizer, workers):
    def build():
        return build_train_loader(_cfg(shard_dir, workers), synthetic_tokenizer, 16, 7, 0, 1)

    ref = build()
    expected = [next(ref) for _ in range(14)]
    ref.close()
    run = build()
    for want in expected[:5]:
        got = next(run)
        assert all(torch.equal(want[k], got[k]) for k in want)
    state = run.state_dict()
    shard_taken = sum(int(shard_slots(7, s, 4, run.shard_share).sum()) for s in range(5))
    assert state["shard_batch_used"] == shard_taken % 4 != 0  # resumes inside a shard batch
    run.close()
    resumed = build()
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.stats()["samples"] == 14 * 4
    resumed.close()


def test_mixed_state_does_not_resume_a_map_run(shard_dir, synthetic_tokenizer):
    loader = build_train_loader(_cfg(shard_dir), synthetic_tokenizer, 16, 7, 0, 1)
    with pytest.raises(ValueError, match="cannot resume a run mixing shards"):
        loader.load_state_dict({"epoch": 0, "position": 8, "global_batch": 4})


def test_unknown_shard_sizes_are_named(shard_dir, synthetic_tokenizer):
    (shard_dir / "sizes.json").unlink()
    with pytest.raises(ValueError, match="needs every shard's size.*sizes.json"):
        build_train_loader(_cfg(shard_dir), synthetic_tokenizer, 16, 7, 0, 1)


def test_bad_samples_of_both_kinds_are_replaced_and_logged(tmp_path, synthetic_tokenizer):
    import io

    img, caption = synthetic_sample(1, 0, 32)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    good = buf.getvalue()
    samples = [(f"k{i}", good, "jpg", caption) for i in range(8)]
    samples[3] = ("k3", good[:60], "jpg", caption)  # truncated
    write_shard(str(tmp_path / "bad.tar"), samples)
    (tmp_path / "sizes.json").write_text('{"bad.tar": 8}')
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "missing.jpg", "caption": "gone"}]))
    cfg = DataConfig(
        sources=[
            DataSourceConfig(kind="synthetic", num_samples=7, image_size=32),
            DataSourceConfig(kind="json", paths=[str(ann)], image_root=str(tmp_path)),
            DataSourceConfig(kind="shards", paths=[str(tmp_path / "bad.tar")]),
        ],
        batch_size=4,
        num_workers=0,
        shuffle_buffer=1,
        pin_memory=False,
        max_bad_fraction=1.0,
    )
    loader = build_train_loader(cfg, synthetic_tokenizer, 16, 0, 0, 1)
    loader.open_bad_sample_log(tmp_path / "run")
    for _ in range(8):  # two epochs of 16 samples
        assert next(loader)["images"].shape == (4, 3, 16, 16)
    log = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.rank0.jsonl").open()]
    assert {r["sample"].rsplit("/", 1)[-1] for r in log} == {"missing.jpg", "k3.jpg"}
    assert loader.stats()["bad_samples"] == len(log) and loader.stats()["samples"] == 32
