"""The CapFilt recipe through the real `blip run` CLI on a tiny checkpoint (captioner = filter):
its output equals the units computed in this process; 2 ranks equal 1 rank byte for byte; a
partial or killed (slow) run resumes to byte-identical output; another run's folder is refused;
shard inputs give shards the pretraining loader reads; `blip ls` lists the recipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.capfilt import (
    AnnotationInputs,
    FilterSettings,
    ModelCaptioner,
    ModelScorer,
    load_checkpoint,
    merge_stats,
    process_unit,
    shard_pairs,
    shard_units,
)
from blip_recipes.capfilt.outputs import jsonl_bytes, shard_bytes
from blip_recipes.config import DataConfig, DataSourceConfig, TokenizerConfig
from blip_recipes.data import build_tokenizer, build_train_loader
from blip_recipes.data.tar_format import iter_tar_samples, write_shard
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from tests.evaluation.eval_helpers import tiny_model
from tests.recipes.launch import REPO, Started, env

N_IMAGES, UNIT_SIZE, BATCH, CAPTIONS, SEED = 10, 3, 2, 2, 5
BAD = "007.jpg"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny DCP checkpoint (synthetic tokenizer), N_IMAGES noise JPEGs (one corrupt) with BLIP
    JSON annotations, and the same pairs as two tar shards."""
    tmp = tmp_path_factory.mktemp("capfilt")
    model = tiny_model(seed=3)
    model.model_args = {"name": "blip_pretrain_tiny", "vision_width": 48, "vision_heads": 2,
                        "text_width": 32, "text_heads": 2, "text_ffn_dim": 64, "embed_dim": 16,
                        "max_positions": 40, "image_size": 32,
                        "vocab_size": model.text.embeddings.word_embeddings.num_embeddings}  # fmt: skip
    save_training_checkpoint(model, None, tmp / "model" / "checkpoints" / "step-1",
                             {"kind": "synthetic"})  # fmt: skip
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    records, samples = [], []
    for i in range(N_IMAGES):
        name = f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            tmp / "images" / name
        )
        caption = ["a red circle", "two blue squares on the left"][i % 2]
        records.append({"image": name, "caption": caption if i % 3 else [caption, "a dog"]})
        samples.append((f"{i:05d}", (tmp / "images" / name).read_bytes(), "jpg", caption))
    (tmp / "images" / BAD).write_bytes(b"\xff\xd8 truncated")
    (tmp / "web.json").write_text(json.dumps(records))
    (tmp / "shards").mkdir()
    write_shard(str(tmp / "shards" / "web-0.tar"), samples[:6])
    write_shard(str(tmp / "shards" / "web-1.tar"), samples[6:])
    return tmp


def _args(corpus: Path, out: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "blip_recipes.cli", "run", *launcher, "blip_capfilt",
            "--config", "capfilt", f"job.output_dir={out}", f"job.seed={SEED}",
            "tokenizer.kind=synthetic", "parallel.device=cpu",
            f"capfilt.captioner={corpus / 'model'}", f"capfilt.filter={corpus / 'model'}",
            f"capfilt.inputs=[\"{corpus / 'web.json'}\"]", f"capfilt.image_root={corpus / 'images'}",
            f"capfilt.unit_size={UNIT_SIZE}", f"capfilt.batch_size={BATCH}",
            f"capfilt.num_captions={CAPTIONS}", *overrides]  # fmt: skip


def _run(corpus, out, *overrides, nproc=1, expect=0):
    proc = subprocess.run(_args(corpus, out, *overrides, nproc=nproc), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _in_process(corpus: Path, threshold: float, kind: str = "json", seed: int = SEED):
    """Every unit computed here: (output bytes per unit, unit stats), with one torch thread like
    the recipe processes (OMP_NUM_THREADS=1): other thread counts change float sums' last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute_units(corpus, threshold, kind, seed)
    finally:
        torch.set_num_threads(threads)


def _compute_units(corpus: Path, threshold: float, kind: str, seed: int):
    model, tok, _ = load_checkpoint(str(corpus / "model"))
    captioner = ModelCaptioner(model, tok, CAPTIONS)
    scorer = ModelScorer(model, tok)
    if kind == "json":
        inputs = AnnotationInputs([str(corpus / "web.json")], str(corpus / "images"), UNIT_SIZE)
        units, pairs, to_bytes = inputs.units(), inputs.pairs, jsonl_bytes
    else:
        units = shard_units([str(corpus / "shards" / "web-{0..1}.tar")])
        pairs, to_bytes = shard_pairs, shard_bytes
    out = []
    for unit in units:
        kept, stats = process_unit(unit, pairs(unit), captioner, scorer,
                                   FilterSettings(threshold), seed, BATCH)  # fmt: skip
        out.append((to_bytes(kept, str(corpus / "model"), str(corpus / "model")), stats))
    return out


@pytest.fixture(scope="module")
def threshold(corpus):
    """The median ITM of every caption: about half the captions pass."""
    rows = _in_process(corpus, 0.0)
    itm = [v for data, _ in rows for line in data.splitlines()
           for v in json.loads(line)["capfilt"]["itm"]]  # fmt: skip
    return float(np.median(itm))


@pytest.fixture(scope="module")
def reference(corpus, threshold, tmp_path_factory):
    """One uninterrupted 1-rank run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _run(corpus, out, f"capfilt.threshold={threshold}")
    return out, proc


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but the run's timings (stats.json, unit statistics' seconds)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in ("stats.json", "config.toml"):
            data = path.read_bytes()
            if path.name.endswith(".stats.json"):
                data = json.dumps({**json.loads(data), "seconds": None}).encode()
            files[str(path.relative_to(out))] = data
    return files


def _stats_without_run(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("this_run")
    stats.pop("pretrain_source")  # names the folder
    return stats


def test_output_is_the_units_computed_in_process(corpus, threshold, reference):
    out, proc = reference
    expected = _in_process(corpus, threshold)
    assert (out / "capfilt.jsonl").read_bytes() == b"".join(data for data, _ in expected)
    stats = json.loads((out / "stats.json").read_text())
    merged = merge_stats([s for _, s in expected])
    assert {k: stats[k] for k in merged} == merged
    assert stats["images"] == N_IMAGES and stats["bad_images"] == 1
    assert BAD in stats["bad_image_examples"][0]["image"]
    assert stats["synthetic"]["captions"] == (N_IMAGES - 1) * CAPTIONS
    assert 0 < stats["synthetic"]["kept"] < stats["synthetic"]["captions"]
    assert (
        0 < stats["web"]["kept"] < stats["web"]["captions"] == N_IMAGES - 1 + 4
    )  # 4 records list two
    assert stats["captions_generated"] == (N_IMAGES - 1) * CAPTIONS
    assert stats["this_run"]["images_per_s"] > 0 and stats["this_run"]["units_processed"] == 4
    for line in (out / "capfilt.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert len(record["caption"]) == len(record["capfilt"]["sources"]) > 0
        assert all(v >= threshold - 1e-6 for v in record["capfilt"]["itm"])
    assert "images/s" in proc.stdout and "captions/s" in proc.stderr
    assert f"skipped bad image web.json:{int(BAD[:3])} ({BAD})" in proc.stderr
    source = stats["pretrain_source"]
    cfg = DataConfig(sources=[DataSourceConfig(**source)], batch_size=4, num_workers=0,
                     pin_memory=False, randaugment=False)  # fmt: skip
    batch = next(iter(build_train_loader(cfg, build_tokenizer(TokenizerConfig(kind="synthetic")),
                                         16, seed=0)))  # fmt: skip
    assert batch["images"].shape == (4, 3, 16, 16)


def test_run_that_keeps_nothing_says_why_and_offers_no_source(corpus, tmp_path):
    proc = _run(corpus, tmp_path / "none", "capfilt.threshold=1.0")
    stats = json.loads((tmp_path / "none" / "stats.json").read_text())
    assert stats["images_kept"] == 0
    quantiles = stats["web"]["itm_quantiles"]
    assert 0 < quantiles["p0"] <= quantiles["p50"] <= quantiles["p100"] <= 1
    assert "kept nothing" in proc.stdout and "capfilt.threshold=1.0" in proc.stdout
    assert "ITM min/p10/median/p90/max" in proc.stdout
    assert "pretrain on it" not in proc.stdout and "[[data.sources]]" not in proc.stdout


def test_two_ranks_equal_one_rank(corpus, threshold, reference, tmp_path):
    out = tmp_path / "two"
    proc = _run(corpus, out, f"capfilt.threshold={threshold}", nproc=2)
    assert _files(out) == _files(reference[0])
    assert _stats_without_run(out) == _stats_without_run(reference[0])
    assert json.loads((out / "stats.json").read_text())["this_run"]["world_size"] == 2
    assert "2 on this rank (0 of 2)" in proc.stderr and "2 on this rank (1 of 2)" in proc.stderr


def test_partial_run_resumes_to_identical_output(corpus, threshold, reference, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(reference[0], out)
    for name in ("unit-00001.stats.json", "unit-00002.stats.json", "unit-00002.jsonl"):
        (out / "units" / name).unlink()
    (out / "units" / "unit-00001.jsonl").write_bytes(b'{"image": "half')  # killed mid-write
    (out / "units" / "unit-00003.jsonl.tmp-999").write_bytes(b"leftover")
    (out / "capfilt.jsonl").unlink()
    proc = _run(corpus, out, f"capfilt.threshold={threshold}")
    assert "continuing an earlier run" in proc.stderr
    assert "skipped 2 unit(s) finished by an earlier run" in proc.stderr
    assert json.loads((out / "stats.json").read_text())["this_run"]["units_processed"] == 2
    assert _files(out) == _files(reference[0])


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(corpus, threshold, reference, tmp_path):
    out = tmp_path / "killed"
    args = _args(corpus, out, f"capfilt.threshold={threshold}", "capfilt.unit_size=1")
    with Started(args, out) as started:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "units").glob("*.stats.json")):
            assert started.proc.poll() is None, "the run ended before a unit was done"
            time.sleep(0.005)
        os.killpg(started.proc.pid, signal.SIGKILL)
        started.proc.wait(timeout=30)
    done = len(list((out / "units").glob("*.stats.json")))
    assert 1 <= done < N_IMAGES and not (out / "stats.json").exists()
    _run(corpus, out, f"capfilt.threshold={threshold}", "capfilt.unit_size=1")
    fresh = tmp_path / "fresh"
    _run(corpus, fresh, f"capfilt.threshold={threshold}", "capfilt.unit_size=1")
    assert _files(out) == _files(fresh)
    assert len(_files(out)) == 2 * N_IMAGES + 1 + 1  # unit files, capfilt.jsonl, identity


def test_refuses_another_runs_folder(corpus, threshold, reference, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    before = _files(out)
    proc = _run(corpus, out, "capfilt.threshold=0.9", expect=2)
    assert "holds another CapFilt run (settings.threshold:" in proc.stderr
    assert _files(out) == before  # (a folder of other files: tests/capfilt/test_outputs.py)


def test_shard_inputs_give_shards_the_loader_reads(corpus, threshold, tmp_path):
    out = tmp_path / "shards"
    pattern = str(corpus / "shards" / "web-{0..1}.tar")
    _run(corpus, out, f'capfilt.inputs=["{pattern}"]', f"capfilt.threshold={threshold}")
    expected = _in_process(corpus, threshold, kind="shards")
    for i, (data, _) in enumerate(expected):
        assert (out / "shards" / f"capfilt-{i:05d}.tar").read_bytes() == data
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sizes == {f"capfilt-{i:05d}.tar": s.images_kept for i, (_, s) in enumerate(expected)}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["bad_images"] == 0 and stats["images"] == N_IMAGES  # shard bytes are intact
    assert sum(sizes.values()) == stats["images_kept"] > 0
    kept = [key for i in range(2)
            for key, *_ in iter_tar_samples(str(out / "shards" / f"capfilt-{i:05d}.tar"))]  # fmt: skip
    assert len(kept) == stats["images_kept"]
    cfg = DataConfig(sources=[DataSourceConfig(**stats["pretrain_source"])], batch_size=2,
                     num_workers=0, pin_memory=False, randaugment=False,
                     shuffle_buffer=4)  # fmt: skip
    batch = next(iter(build_train_loader(cfg, build_tokenizer(TokenizerConfig(kind="synthetic")),
                                         16, seed=0)))  # fmt: skip
    assert batch["images"].shape == (2, 3, 16, 16)


def test_blip_ls_lists_the_recipe_and_config():
    proc = subprocess.run([sys.executable, "-m", "blip_recipes.cli", "ls"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    assert any(line.split() == ["blip_capfilt", "capfilt"] for line in proc.stdout.splitlines())


def test_seed_changes_synthetic_captions_only(corpus):
    def kept(seed):
        data = b"".join(d for d, _ in _in_process(corpus, 0.0, seed=seed)).decode()
        return [json.loads(line) for line in data.splitlines()]

    def of(records, source):
        return [[c for c, s in zip(r["caption"], r["capfilt"]["sources"]) if s == source]
                for r in records]  # fmt: skip

    five, six = kept(5), kept(6)
    assert kept(6) == six  # sampling is a function of the seed, the unit and the image
    assert of(five, "web") == of(six, "web")
    assert all(a != b for a, b in zip(of(five, "synthetic"), of(six, "synthetic")))


def _synthetic_corpus(root: Path, n: int = 40) -> dict[str, bool]:
    """``n`` synthetic images (seed 123, not the training seed) with their own caption (even) or
    the caption of another image sharing none of its colours (odd). Returns image -> matching."""
    from blip_recipes.data import synthetic_sample
    from blip_recipes.data.synthetic import COLOURS

    def colours(text):
        return {w for w in text.split() if w in COLOURS}

    samples = [synthetic_sample(123, i, 128) for i in range(n)]
    (root / "images").mkdir(parents=True)
    records, matching = [], {}
    for i, (image, caption) in enumerate(samples):
        image.save(root / "images" / f"{i:03d}.png")
        if i % 2:
            caption = next(samples[j % n][1] for j in range(i + 1, i + n)
                           if not colours(samples[j % n][1]) & colours(caption))  # fmt: skip
        records.append({"image": f"{i:03d}.png", "caption": caption})
        matching[f"{i:03d}.png"] = i % 2 == 0
    (root / "web.json").write_text(json.dumps(records))
    return matching


@pytest.mark.slow
def test_trained_filter_keeps_matching_pairs_and_drops_swapped_ones(tmp_path):
    """A tiny model trained 2000 steps on the synthetic set (about 3 minutes on 2 CPU cores)
    as captioner and filter, default threshold 0.5, on synthetic images half of which carry
    another image's caption."""
    model = tmp_path / "model"
    train = [sys.executable, "-m", "blip_recipes.cli", "run", "blip_pretrain", "--config", "debug",
             f"job.output_dir={model}", "training.steps=2000", "checkpoint.interval=2000",
             "data.num_workers=0", "metrics.tensorboard=false", "metrics.log_every=500"]  # fmt: skip
    proc = subprocess.run(train, cwd=REPO, env=env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    matching = _synthetic_corpus(tmp_path / "web")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "blip_recipes.cli", "run", "blip_capfilt", "--config", "capfilt",
            f"job.output_dir={out}", "tokenizer.kind=synthetic", "parallel.device=cpu",
            f"capfilt.captioner={model}", f"capfilt.filter={model}",
            f"capfilt.inputs=[\"{tmp_path / 'web' / 'web.json'}\"]",
            f"capfilt.image_root={tmp_path / 'web' / 'images'}"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "capfilt.jsonl").read_text().splitlines()]
    web_kept = {r["image"] for r in records if "web" in r["capfilt"]["sources"]}
    good = [name for name, ok in matching.items() if ok]
    swapped = [name for name, ok in matching.items() if not ok]
    assert len(web_kept & set(good)) >= 0.75 * len(good)
    assert len(web_kept & set(swapped)) <= 0.1 * len(swapped)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["synthetic"]["kept_fraction"] >= 0.4  # the trained captioner describes images
    assert stats["images_kept"] >= len(good)
