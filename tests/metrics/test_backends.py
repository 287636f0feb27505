"""Metrics back ends: the interface seen through MetricsLogger, TensorBoard images and hparams
read back, caption grids, and W&B in offline mode (or its missing-extra error)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image

from blip_recipes.metrics import (
    WANDB_MISSING,
    JsonlBackend,
    MetricsBackend,
    MetricsLogger,
    MetricsWriteError,
    TensorBoardBackend,
    caption_grid,
    require_wandb,
    to_pil,
)

HAS_WANDB = importlib.util.find_spec("wandb") is not None


class Recorder(MetricsBackend):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def log_scalars(self, step, values, group="train"):
        self.calls.append(("scalars", step, group, dict(values)))

    def log_text(self, step, tag, text):
        self.calls.append(("text", step, tag, text))

    def log_images(self, step, tag, images, captions):
        self.calls.append(("images", step, tag, len(images), list(captions)))

    def log_hparams(self, hparams, metrics):
        self.calls.append(("hparams", dict(hparams), dict(metrics)))

    def close(self):
        self.calls.append(("close",))


def test_every_backend_gets_every_call(tmp_path):
    rec = Recorder()
    logger = MetricsLogger(tmp_path, tensorboard=False, print_fn=lambda s: None, backends=[rec])
    logger.log(1, {"loss": torch.tensor(2.0)})
    logger.log_eval(1, {"r_mean": 10.0})
    logger.log_text("eval/captions", "0: a cat", 1)
    logger.log_images(1, "eval/img", [torch.zeros(3, 8, 8, dtype=torch.uint8)], ["a cat"])
    logger.log_hparams({"job.seed": 0}, {"final_loss": torch.tensor(1.5)})
    logger.close()
    logger.close()
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["scalars", "scalars", "text", "images", "hparams", "close"]
    assert rec.calls[0][2] == "train" and rec.calls[0][3]["loss"] == 2.0
    assert "time" in rec.calls[0][3] and rec.calls[1][2] == "eval"
    assert rec.calls[4][2] == {"final_loss": 1.5}  # tensors made plain
    assert logger.last_record["loss"] == 2.0 and logger.eval_records[0]["r_mean"] == 10.0
    # JSONL still written alongside
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_other_ranks_call_no_backend(tmp_path):
    rec = Recorder()
    logger = MetricsLogger(tmp_path, rank=1, print_fn=lambda s: None, backends=[rec])
    logger.log(1, {"loss": 1.0})
    logger.log_images(1, "x", [torch.zeros(3, 4, 4)], ["c"])
    logger.log_hparams({"a": 1}, {"b": 2.0})
    logger.close()
    assert rec.calls == []


def test_to_pil_accepts_paths_bytes_pil_and_tensors(tmp_path):
    image = Image.new("RGB", (10, 6), (255, 0, 0))
    image.save(tmp_path / "a.png")
    for source in (
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        (tmp_path / "a.png").read_bytes(),
        image,
        torch.full((3, 6, 10), 255, dtype=torch.uint8),
        torch.ones(3, 6, 10),
    ):
        out = to_pil(source)
        assert out.size == (10, 6) and out.mode == "RGB"
    assert to_pil(image).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(TypeError):
        to_pil(42)


def test_caption_grid_draws_the_caption_under_each_image():
    images = [torch.zeros(3, 20, 20, dtype=torch.uint8) for _ in range(5)]
    grid = caption_grid(images, [f"caption {i}" for i in range(5)], tile=64, columns=4)
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    assert grid.shape[2] == 4 * 64 and grid.shape[1] > 2 * 64  # 2 rows, text bands
    band = grid[:, 64:70, :64]  # below the first (black) image: white band with dark text
    assert band.float().mean() > 128 and band.min() < 128
    with pytest.raises(ValueError):
        caption_grid(images, ["one"])


def test_tensorboard_images_and_hparams_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True, print_fn=lambda s: None)
    logger.log(2, {"loss": 3.0})
    images = [torch.zeros(3, 16, 16, dtype=torch.uint8), torch.ones(3, 16, 16)]
    logger.log_images(2, "eval/captioned_images", images, ["a dark square", "a light square"])
    logger.log_hparams(
        {"optimizer.lr": 1e-3, "model.name": "tiny", "training.deterministic": False},
        {"final_loss": 3.0, "best_r_mean": float("nan")},
    )
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["images"] == ["eval/captioned_images"]
    (event,) = acc.Images("eval/captioned_images")
    assert event.step == 2 and event.width == 2 * 160 and event.height > 160
    assert "train/time" not in acc.Tags()["scalars"]  # timestamps are not plotted
    assert "hparam/final_loss" in acc.Tags()["scalars"]
    assert "hparam/best_r_mean" not in acc.Tags()["scalars"]  # non-finite: left out
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins


def test_tensorboard_backend_close_twice(tmp_path):
    backend = TensorBoardBackend(tmp_path)
    backend.log_scalars(1, {"loss": 1.0, "skip": None, "time": 5.0})
    backend.close()
    backend.close()
    backend.log_scalars(2, {"loss": 1.0})  # after close: ignored


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed: the offline test runs instead")
def test_wandb_missing_says_install_the_extra(tmp_path):
    from blip_recipes.metrics import WandbBackend

    with pytest.raises(ImportError, match="install the wandb extra"):
        require_wandb()
    with pytest.raises(ImportError, match="install the wandb extra"):
        WandbBackend("p", dir=tmp_path)
    assert "blip-recipes[wandb]" in WANDB_MISSING


@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (optional extra [wandb])")
def test_wandb_offline_run_records_scalars_images_and_summary(tmp_path, monkeypatch):
    from blip_recipes.metrics import WandbBackend

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    require_wandb()
    backend = WandbBackend("blip-test", "tiny", dir=tmp_path, config={"job.seed": 0})
    logged = []
    original_log = backend._run.log
    monkeypatch.setattr(
        backend._run,
        "log",
        lambda data, step=None: (logged.append((step, data)), original_log(data, step=step)),
    )
    logger = MetricsLogger(tmp_path, tensorboard=False, print_fn=lambda s: None, backends=[backend])
    logger.log(1, {"loss": 2.0, "lr": 1e-3})
    logger.log_eval(1, {"r_mean": 12.0})
    logger.log_text("eval/captions", "0: a cat", 1)
    logger.log_images(1, "eval/captioned_images", [torch.zeros(3, 8, 8)], ["a cat"])
    logger.log_hparams({"optimizer.lr": 1e-3}, {"final_loss": 2.0})
    run = backend._run
    assert run.config["job.seed"] == 0 and run.config["optimizer.lr"] == 1e-3
    assert run.summary["final/final_loss"] == 2.0
    assert logged[0][0] == 1 and logged[0][1]["train/loss"] == 2.0
    assert "train/time" not in logged[0][1]  # W&B keeps its own timestamps
    assert logged[1] == (1, {"eval/r_mean": 12.0})
    (images,) = logged[3][1]["eval/captioned_images"]
    assert images._caption == "a cat"
    logger.close()
    assert backend._run is None
    assert list(tmp_path.rglob("*.wandb"))  # the offline run file, for `wandb sync`


def _whole_lines(path):
    text = path.read_text()
    assert text == "" or text.endswith("\n"), text[-80:]
    return [json.loads(line) for line in text.splitlines()]


def test_jsonl_on_a_full_disk_is_one_line_and_never_cuts_a_line(tmp_path):
    from tests.small_fs import fill, small_fs

    with small_fs(tmp_path / "fs", 256) as fs:
        backend = JsonlBackend(fs)
        backend.log_scalars(1, {"loss": 1.0})
        fill(fs, leave=0)
        big = {f"metric_{i}": float(i) for i in range(400)}  # about 8 KiB: more than is left
        with pytest.raises(MetricsWriteError) as err:
            backend.log_scalars(2, big)
        msg = str(err.value)
        assert msg.startswith(f"could not write {fs / 'metrics.jsonl'} (no space left on device")
        assert "it still ends with its last whole line" in msg and "\n" not in msg
        assert [r["step"] for r in _whole_lines(fs / "metrics.jsonl")] == [1]
        with pytest.raises(MetricsWriteError, match="eval.jsonl"):
            backend.log_scalars(2, big, group="eval")
        assert _whole_lines(fs / "eval.jsonl") == []
        (fs / "filler").unlink()  # space again: writing goes on after the last whole line
        backend.log_scalars(2, {"loss": 0.5})
        backend.close()
        assert [r["step"] for r in _whole_lines(fs / "metrics.jsonl")] == [1, 2]


def test_jsonl_short_write_is_truncated_back(tmp_path, monkeypatch):
    """A write that stops half way (what a full disk does) is cut back to the last line."""
    import errno
    import os

    backend = JsonlBackend(tmp_path)
    backend.log_scalars(1, {"loss": 1.0})
    real_write, calls = os.write, []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(MetricsWriteError, match="no space left on device"):
        backend.log_scalars(2, {"loss": 0.5})
    monkeypatch.undo()
    assert len(calls) == 2
    assert [r["step"] for r in _whole_lines(tmp_path / "metrics.jsonl")] == [1]
    backend.close()
