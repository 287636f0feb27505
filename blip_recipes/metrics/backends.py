"""Where metrics go: one small interface, three back ends (JSONL, TensorBoard, Weights & Biases).

:class:`~blip_recipes.metrics.MetricsLogger` builds the record of a step (means, MFU, memory,
timestamp) and hands it to every back end it was given; a back end only stores it. A new back
end (MLflow, a database...) implements :class:`MetricsBackend` and nothing else.

Groups: ``log_scalars(step, values, group)`` takes ``group="train"`` for the per-step training
records and ``group="eval"`` for evaluation results. JSONL writes them to ``metrics.jsonl`` /
``eval.jsonl``; TensorBoard and W&B tag each value ``<group>/<name>``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

Scalar = Union[int, float, str, bool, None]


def _numeric(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


class MetricsBackend:
    """The interface every metrics back end implements; all methods but ``close`` may no-op.

    Calls come from rank 0 only (the :class:`~blip_recipes.metrics.MetricsLogger` is a no-op
    elsewhere), so a back end never coordinates across ranks.
    """

    name = "backend"

    def log_scalars(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        """One record: name -> plain Python number / None (already JSON-safe)."""

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A free-text entry (e.g. generated captions)."""

    def log_images(
        self, step: int, tag: str, images: Sequence[Any], captions: Sequence[str]
    ) -> None:
        """Images with one caption each; ``images`` as accepted by :func:`to_pil`."""

    def log_hparams(self, hparams: Mapping[str, Scalar], metrics: Mapping[str, float]) -> None:
        """The run's settings (flat ``section.key`` -> scalar) and its final metrics."""

    def close(self) -> None:
        """Flush and release; safe to call twice."""


# ---------------------------------------------------------------------------- JSONL
class MetricsWriteError(RuntimeError):
    """A metrics line could not be written (a full disk...); the file still ends with the last
    whole line. ``errno`` is kept."""

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


def append_line(fd: int, path: Path, line: str) -> None:
    """Append ``line`` to the open file ``fd`` whole or not at all: a failed write (ENOSPC,
    EIO...) truncates the file back to where it ended and raises :class:`MetricsWriteError`."""
    data = line.encode()
    end = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        try:
            os.ftruncate(fd, end)
            kept = "it still ends with its last whole line"
        except OSError:
            kept = f"the line may be cut: truncate it to {end} bytes"
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        what = "no space left on device" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise MetricsWriteError(
            f"could not write {path} ({what}, {free}); {kept}", e.errno
        ) from None


class JsonlBackend(MetricsBackend):
    """``metrics.jsonl`` (group ``train``) and ``eval.jsonl`` (group ``eval``): one strict JSON
    object per call, in the order given (``step`` and ``time`` first). Text, images and hparams
    are not written (TensorBoard / W&B keep them). Each line is written whole or not at all
    (:func:`append_line`), so a full disk never leaves a cut line."""

    name = "jsonl"

    def __init__(self, output_dir: Union[str, Path]) -> None:
        self.output_dir = Path(output_dir)
        self.paths = {
            "train": self.output_dir / "metrics.jsonl",
            "eval": self.output_dir / "eval.jsonl",
        }
        self._fd: Optional[int] = os.open(
            self.paths["train"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )

    def log_scalars(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        record = {"step": step, **{k: v for k, v in values.items() if k != "step"}}
        line = json.dumps(record, allow_nan=False) + "\n"
        if group == "train":
            if self._fd is None:
                raise ValueError("JsonlBackend is closed")
            append_line(self._fd, self.paths["train"], line)
            return
        path = self.paths.get(group, self.output_dir / f"{group}.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            append_line(fd, path, line)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------- images
def to_pil(image: Any):
    """A PIL RGB image from a path, raw bytes, a PIL image, or a (3, H, W) tensor (uint8, or
    float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy(), "RGB")
    raise TypeError(f"cannot turn a {type(image).__name__} into an image")


def caption_grid(
    images: Sequence[Any], captions: Sequence[str], tile: int = 160, columns: int = 4
) -> torch.Tensor:
    """One uint8 (3, H, W) picture: each image resized to ``tile`` x ``tile`` with its caption
    written underneath (wrapped), ``columns`` per row. Used for TensorBoard, which shows an
    image's caption only when it is drawn into the image."""
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    chars = max(tile // 7, 8)  # the default bitmap font is about 6-7 px wide per character
    wrapped = [
        textwrap.wrap(f"{i}: {c}", width=chars)[:6] or [f"{i}:"] for i, c in enumerate(captions)
    ]
    line_h = 12
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 4
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        grid.paste(to_pil(image).resize((tile, tile)), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + tile + 2 + j * line_h), line, fill="black", font=font)
    return (
        torch.frombuffer(bytearray(grid.tobytes()), dtype=torch.uint8)
        .view(grid.height, grid.width, 3)
        .permute(2, 0, 1)
    )


# ---------------------------------------------------------------------------- TensorBoard
class TensorBoardBackend(MetricsBackend):
    """TensorBoard events under ``log_dir``: numeric values as scalars ``<group>/<name>`` (None,
    non-finite values and ``time`` skipped), text, an image grid with the captions drawn in, and
    the hparams table (HPARAMS tab) in the same run folder."""

    name = "tensorboard"
    SKIP = frozenset({"step", "time"})

    def __init__(self, log_dir: Union[str, Path], purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        if self._writer is None:
            return
        for k, v in values.items():
            if k not in self.SKIP and _numeric(v):
                self._writer.add_scalar(f"{group}/{k}", v, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def log_images(
        self, step: int, tag: str, images: Sequence[Any], captions: Sequence[str]
    ) -> None:
        if self._writer is None or not images:
            return
        self._writer.add_image(tag, caption_grid(images, captions), step, dataformats="CHW")

    def log_hparams(self, hparams: Mapping[str, Scalar], metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if _numeric(v)}
        # written into this run's own event file (SummaryWriter.add_hparams would start a
        # second run folder), with the final metrics as scalars the HPARAMS tab looks up
        writer = self._writer._get_file_writer()
        for summary in hparams_summary(hp, final):
            writer.add_summary(summary)
        for k, v in final.items():
            self._writer.add_scalar(k, v)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------- Weights & Biases
WANDB_MISSING = (
    "metrics.wandb=true needs the wandb package: install the wandb extra "
    "(pip install 'blip-recipes[wandb]' or pip install wandb), or set metrics.wandb=false"
)


class WandbBackend(MetricsBackend):
    """A Weights & Biases run (optional extra ``blip-recipes[wandb]``): scalars as
    ``<group>/<name>`` at ``step``, text as a one-column table, images as ``wandb.Image`` with
    their captions, the config as the run config and the final metrics in its summary.
    ``WANDB_MODE=offline`` keeps everything in ``<dir>/wandb`` (sync later with ``wandb sync``).

    Args:
        project: W&B project.
        name: run name shown in W&B.
        dir: folder for W&B's local files (the run's output folder).
        config: the run's flat settings.
        entity: W&B team or user (None: the default of the logged-in account).

    Raises:
        ImportError: wandb is not installed (the message says how to install it).
    """

    name = "wandb"

    def __init__(
        self,
        project: str,
        name: Optional[str] = None,
        dir: Union[str, Path, None] = None,
        config: Optional[Mapping[str, Scalar]] = None,
        entity: Optional[str] = None,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(WANDB_MISSING) from e
        self._wandb = wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self._run: Any = wandb.init(
            project=project,
            name=name,
            entity=entity,
            dir=str(dir) if dir is not None else None,
            config=dict(config or {}),
        )

    def log_scalars(self, step: int, values: Mapping[str, Any], group: str = "train") -> None:
        if self._run is None:
            return
        data = {
            f"{group}/{k}": v
            for k, v in values.items()
            if k not in TensorBoardBackend.SKIP and _numeric(v)
        }
        if data:
            self._run.log(data, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self._run is not None:
            table = self._wandb.Table(columns=["text"], data=[[text]])
            self._run.log({tag: table}, step=step)

    def log_images(
        self, step: int, tag: str, images: Sequence[Any], captions: Sequence[str]
    ) -> None:
        if self._run is None or not images:
            return
        shown = [self._wandb.Image(to_pil(im), caption=c) for im, c in zip(images, captions)]
        self._run.log({tag: shown}, step=step)

    def log_hparams(self, hparams: Mapping[str, Scalar], metrics: Mapping[str, float]) -> None:
        if self._run is None:
            return
        self._run.config.update(dict(hparams), allow_val_change=True)
        for k, v in metrics.items():
            if _numeric(v):
                self._run.summary[f"final/{k}"] = v

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def require_wandb() -> None:
    """Raise ImportError with :data:`WANDB_MISSING` when wandb cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ImportError(WANDB_MISSING)
