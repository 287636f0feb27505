"""Python logging for a multi-rank run: rank 0 speaks on the console, every rank keeps a file.

- :func:`configure_logging` (first thing in a recipe's ``main``): rank 0 logs INFO to the
  console (stderr, best-effort: a dead pipe or terminal stops console output, not the run); the other ranks print only ERROR there (a failing rank still says why), so
  an N-rank run no longer repeats every line N times. Python warnings go through logging
  (``py.warnings``), so they follow the same rule.
- :func:`attach_rank_log_file` (once the output folder is the run's): every record of the rank,
  INFO and up, also goes to ``<output_dir>/logs/rank<r>.log`` (appended across restarts).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

from blip_recipes.metrics.console import guard_console

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
RANK_FORMAT = "%(asctime)s [rank{rank}] %(name)s %(levelname)s %(message)s"
_HANDLER_FLAG = "_blip_rank_handler"

# Known harmless warnings, filtered once here rather than printed by every rank on every run
# (fix a warning at its source when possible, list it here with why otherwise).
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch's DataLoader says this once per loader (train and eval: twice); `blip validate` and
    # `blip run` already say it once, before launch (config/advice.py, more workers than cores).
    (UserWarning, r"This DataLoader will create \d+ worker processes in total"),
)

# Known harmless log records of libraries imported by every load (``transformers`` imports
# torchao): (logger name, text in the message), dropped by a filter on exactly that logger.
HARMLESS_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # torchao's optional CUDA kernels (MX-FP8, CUTLASS sm90a) are built for another Python/CUDA;
    # float8 training here uses torchao's torch-level float8 path, which does not need them.
    ("torchao", "Failed to load "),
    # torchao's int matmul kernels need Triton (CUDA only); nothing here calls them.
    ("torchao.kernel.intmm", "Warning: Detected no triton"),
    # torchao registers its Enum types (KernelPreference, ScaleCalculationMode) as pytree
    # constants, which newer torch supports natively and deprecates; a torchao matter.
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
)


class _DropRecords(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_harmless_records() -> None:
    """Install the :data:`HARMLESS_LOG_RECORDS` filters (idempotent); call before the imports."""
    for name, text in HARMLESS_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.text == text for f in logger.filters):
            logger.addFilter(_DropRecords(text))


def env_rank() -> int:
    """Global rank from the launcher's environment (``RANK``; 0 without one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def configure_logging(rank: Optional[int] = None, level: int = logging.INFO) -> None:
    """Console logging for this rank (see the module docstring); replaces earlier handlers.
    The console is best-effort (:func:`~blip_recipes.metrics.console.guard_console`): a closed
    stdout/stderr stops console output, never the run."""
    rank = env_rank() if rank is None else rank
    guard_console()  # before basicConfig: its handler keeps the stream it is given
    fmt = FORMAT if rank == 0 else RANK_FORMAT.format(rank=rank)
    logging.basicConfig(level=level, format=fmt, force=True)
    console = logging.getLogger().handlers[0]
    console.setLevel(level if rank == 0 else logging.ERROR)
    logging.captureWarnings(True)
    quiet_harmless_records()
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def attach_rank_log_file(
    output_dir: Union[str, Path], rank: Optional[int] = None, level: int = logging.INFO
) -> Path:
    """Also write this rank's log records to ``<output_dir>/logs/rank<r>.log``; returns it.

    Calling it again (a resumed run in the same process) replaces the earlier file handler.
    """
    rank = env_rank() if rank is None else rank
    path = Path(output_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(RANK_FORMAT.format(rank=rank)))
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return path


def detach_rank_log_file() -> None:
    """Close and remove the handler :func:`attach_rank_log_file` added (end of a run)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            root.removeHandler(handler)
            handler.close()
