"""`validate` checks every file a run reads at start-up, and lists every missing one at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_recipes.config import ConfigError, LaunchContext, load_config, load_toml, validate

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "recipes" / "configs" / "debug.toml"


def _cfg(tmp_path, *overrides):
    return load_config(DEBUG, [f"job.output_dir={tmp_path / 'run'}", *overrides])


def _errors(cfg, **ctx) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg, LaunchContext(**ctx))
    return str(info.value).splitlines()


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    return folder


def test_demo_config_needs_no_file(tmp_path):
    validate(_cfg(tmp_path), LaunchContext())


def test_missing_annotations_image_root_and_tokenizer_are_all_listed(tmp_path):
    present = tmp_path / "a.json"
    present.write_text("[]")
    cfg = _cfg(
        tmp_path,
        "data.sources.0.kind=json",
        f'data.sources.0.paths=["{present}", "{tmp_path / "gone.json"}"]',
        f"data.sources.0.image_root={tmp_path / 'images'}",
        "tokenizer.kind=wordpiece",
        f"tokenizer.path={tmp_path / 'pretrained' / 'bert-base-uncased'}",
    )
    errors = _errors(cfg)
    assert (
        f"'data.sources.0.paths': 1 of 2 annotation file(s) not found: {tmp_path / 'gone.json'}"
        in errors
    )
    assert (
        f"'data.sources.0.image_root' {tmp_path / 'images'} is not a folder (it does not exist)"
        in errors
    )
    assert any(
        e.startswith("'tokenizer.path'")
        and e.endswith(
            f"fetch it with: blip download bert-base-uncased --dir {tmp_path / 'pretrained'}"
        )
        for e in errors
    )


def test_tokenizer_folder_without_vocab(tmp_path):
    (tmp_path / "tok").mkdir()
    cfg = _cfg(tmp_path, "tokenizer.kind=wordpiece", f"tokenizer.path={tmp_path / 'tok'}")
    assert (
        f"'tokenizer.path' {tmp_path / 'tok'} is a folder without vocab.txt or tokenizer.json"
        in _errors(cfg)
    )


def test_shards_patterns_and_size(tmp_path):
    (tmp_path / "s-0.tar").write_bytes(b"")
    cfg = _cfg(
        tmp_path,
        "data.sources.0.kind=shards",
        f'data.sources.0.paths=["{tmp_path}/s-{{0..2}}.tar", "{tmp_path}/t-{{0..1}}.tar"]',
    )
    errors = "\n".join(_errors(cfg))
    assert f"2 of 3 shard(s) of {tmp_path}/s-{{0..2}}.tar not found" in errors
    assert f"no file matches {tmp_path}/t-{{0..1}}.tar" in errors
    assert "set 'training.steps_per_epoch'" in errors
    (tmp_path / "s-1.tar").write_bytes(b"")
    (tmp_path / "s-2.tar").write_bytes(b"")
    cfg = _cfg(tmp_path, "data.sources.0.kind=shards", f"data.sources.0.paths={tmp_path}/s-{{0..2}}.tar",
               "training.steps_per_epoch=10")  # fmt: skip
    validate(cfg, LaunchContext())


def test_shards_mixed_with_json(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"")
    (tmp_path / "a.json").write_text('[{"image": "a.jpg", "caption": "a dog"}]')
    cfg = _cfg(tmp_path, "data.sources.0.kind=shards", f"data.sources.0.paths={tmp_path}/s.tar",
               "training.steps_per_epoch=10", "data.sources.1.kind=json",
               f"data.sources.1.paths={tmp_path}/a.json")  # fmt: skip
    assert any("mixing shards with json/jsonl/synthetic sources needs them" in e
               for e in _errors(cfg))  # fmt: skip
    (tmp_path / "sizes.json").write_text('{"s.tar": 100}')
    validate(cfg, LaunchContext())  # mixing is fine once the shard sizes are known


def test_init_weights(tmp_path):
    cfg = _cfg(tmp_path, f"model.text_init={tmp_path / 'pretrained' / 'bert-base-uncased'}",
               f"model.vision_init={tmp_path / 'mine.pth'}")  # fmt: skip
    errors = _errors(cfg)
    assert any(
        e.startswith("'model.text_init'") and "blip download bert-base-uncased" in e for e in errors
    )
    assert (
        f"'model.vision_init' {tmp_path / 'mine.pth'} does not exist; point it at local weights, "
        'or set it to "none" to start from random weights' in errors
    )
    (tmp_path / "empty").mkdir()
    cfg = _cfg(tmp_path, f"model.vision_init={tmp_path / 'empty'}")
    assert "is a folder without a weights file" in _errors(cfg)[0]


def test_none_starts_from_random_weights(tmp_path):
    from blip_recipes.interop.init_checkpoints import init_source
    from blip_recipes.training.build import _load_pretrained_parts

    toml = tmp_path / "c.toml"
    toml.write_text(DEBUG.read_text() + '\n[model]\ntext_init = "none"\nvision_init = "None"\n'
                    if "[model]" not in DEBUG.read_text() else
                    DEBUG.read_text().replace("[model]", '[model]\ntext_init = "none"\nvision_init = "None"'))  # fmt: skip
    cfg = load_toml(toml)
    cfg.job.output_dir = str(tmp_path / "run")
    assert cfg.model.text_init == "none"
    validate(cfg, LaunchContext())
    _load_pretrained_parts(cfg, None, None)  # nothing to load, no error
    assert [init_source(v) for v in (None, "", " none ", "NONE", "w.pth")] == [None] * 4 + ["w.pth"]


def test_resume_none_on_a_used_folder(tmp_path):
    _checkpoint(tmp_path / "run" / "checkpoints" / "step-20")
    errors = _errors(_cfg(tmp_path, "checkpoint.resume=none"))
    assert errors == [
        f"'checkpoint.resume' is none but {tmp_path / 'run' / 'checkpoints'} already holds "
        "checkpoint step-20: set checkpoint.resume=auto to continue that run, or choose another "
        "job.output_dir to start a new one (checkpoints are never overwritten)"
    ]
    validate(_cfg(tmp_path, "checkpoint.resume=auto"), LaunchContext())
    validate(_cfg(tmp_path, "checkpoint.resume=none"), LaunchContext(checkpoints=False))


def test_resume_and_init_from_paths(tmp_path):
    run = tmp_path / "old"
    step = _checkpoint(run / "checkpoints" / "step-5")
    errors = _errors(
        _cfg(tmp_path, f"checkpoint.resume={run}", f"checkpoint.init_from={tmp_path / 'x'}")
    )
    assert f"'checkpoint.init_from' {tmp_path / 'x'} does not exist" in errors[0]
    assert errors[1].startswith(f"'checkpoint.resume' {run} is not a complete checkpoint folder "
                                f"(its newest checkpoint is {step})")  # fmt: skip
    validate(
        _cfg(tmp_path, f"checkpoint.resume={step}", f"checkpoint.init_from={step}"), LaunchContext()
    )


def test_eval_files(tmp_path):
    cfg = _cfg(tmp_path, "eval.every_steps=5", f"eval.annotation={tmp_path / 'test.json'}",
               f"eval.image_root={tmp_path / 'coco'}")  # fmt: skip
    assert _errors(cfg) == [
        f"'eval.annotation' {tmp_path / 'test.json'} does not exist (or is not a file)",
        f"'eval.image_root' {tmp_path / 'coco'} is not a folder (it does not exist)",
    ]
    cfg = _cfg(tmp_path, f"eval.checkpoint={tmp_path / 'pretrained' / 'blip-itm-base-coco'}")
    assert "blip download blip-itm-base-coco" in _errors(cfg)[0]


def test_blip_run_resume_none_exits_2_without_traceback(tmp_path):
    _checkpoint(tmp_path / "run" / "checkpoints" / "step-3")
    out = subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", "run", "blip_pretrain", "--config", "debug",
         f"job.output_dir={tmp_path / 'run'}", "checkpoint.resume=none"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 2
    assert "already holds checkpoint step-3" in out.stderr and "Traceback" not in out.stderr


def test_pretraining_over_an_empty_annotation_file_is_refused(tmp_path):
    empty, lines = tmp_path / "kept.json", tmp_path / "kept.jsonl"
    empty.write_text("[ ]\n")
    lines.write_text("\n")
    (tmp_path / "img").mkdir()
    for path, kind in ((empty, "json"), (lines, "jsonl")):
        cfg = _cfg(tmp_path, f"data.sources.0.kind={kind}", f'data.sources.0.paths=["{path}"]',
                   f"data.sources.0.image_root={tmp_path / 'img'}")  # fmt: skip
        assert _errors(cfg) == [
            f"'data.sources.0.paths': {path} hold(s) no records (an empty annotation file): "
            "there is nothing to train on"
        ]
    lines.write_text('{"image": "a.jpg", "caption": "a dog"}\n' * 16)  # one global batch
    validate(_cfg(tmp_path, "data.sources.0.kind=jsonl", f'data.sources.0.paths=["{lines}"]',
                  f"data.sources.0.image_root={tmp_path / 'img'}"), LaunchContext())  # fmt: skip


def test_capfilt_takes_the_tokenizer_its_checkpoints_carry(tmp_path):
    from blip_recipes.config import to_toml

    run = tmp_path / "ft"
    _checkpoint(run / "checkpoints" / "step-4")
    (run / "config.toml").write_text(to_toml(_cfg(tmp_path)))  # records tokenizer.kind=synthetic
    capfilt = REPO / "recipes" / "configs" / "capfilt.toml"
    base = [f"job.output_dir={tmp_path / 'out'}", f"capfilt.filter={run}",
            f"capfilt.inputs=[\"{tmp_path / 'web.json'}\"]"]  # fmt: skip
    for path in ("none", str(tmp_path / "missing_vocab.txt")):
        cfg = load_config(capfilt, [*base, f"capfilt.captioner={run}", f"tokenizer.path={path}"])
        errors = [e for e in _capfilt_errors(cfg) if "tokenizer" in e]
        assert errors == []
    cfg = load_config(capfilt, [*base, "capfilt.captioner=model.pth", "tokenizer.path=none"])
    assert any(e.startswith("'tokenizer.path' is required") for e in _capfilt_errors(cfg))


def _capfilt_errors(cfg) -> list[str]:
    try:
        validate(cfg, LaunchContext(checkpoints=False))
    except ConfigError as e:
        return str(e).splitlines()
    return []


def test_training_over_fewer_samples_than_one_global_batch_is_refused(tmp_path):
    ann = tmp_path / "one.jsonl"
    ann.write_text('{"image": "a.jpg", "caption": "a dog"}\n' * 3)
    (tmp_path / "img").mkdir()
    cfg = _cfg(tmp_path, "data.sources.0.kind=jsonl", f'data.sources.0.paths=["{ann}"]',
               f"data.sources.0.image_root={tmp_path / 'img'}")  # fmt: skip
    assert _errors(cfg, world_size=2) == [
        "'data.sources' hold 3 samples, fewer than one global batch (data.batch_size x world "
        "size = 16 x 2 = 32): set data.batch_size=1 or less, or add data"
    ]
    validate(cfg, LaunchContext(checkpoints=False))  # evaluation reads no training batch
