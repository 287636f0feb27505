"""The best validation result of a fine-tuning run and the weights that reached it.

Fine-tuning recipes validate at epoch ends and keep the weights of the best validation score in
``<output_dir>/best/step-N`` (a model-only DCP checkpoint; the previous best is pruned), then
score the test split with them. :class:`BestWeights` is that bookkeeping: it is a checkpoint
``Stateful`` (a resumed run keeps comparing against the best so far, and a best saved just before
an interruption is found again), owns the ``best/`` checkpoint manager, and clears what an
earlier run left in ``best/`` on a fresh start (a stale ``best/step-N`` of the same number would
otherwise be taken for this run's).

    best = BestWeights(output_dir, key="r_mean", config_toml=to_toml(cfg))
    if best.offer(step, epoch, val_metrics, model):   # collective: every rank calls it
        ...
    best.load_into(model)                             # before scoring the test split
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.checkpoint import MODEL, CheckpointManager, ModelWrapper, is_complete, load_states

logger = logging.getLogger(__name__)

BEST_DIR = "best"


class BestWeights(Stateful):
    """Best validation result so far (by ``metrics[key]``, higher is better) and its weights.

    Attributes:
        step: optimizer step of the best evaluation (-1: none yet).
        epoch: its epoch (0-based; -1: none yet).
        metrics: its validation metrics.

    Args:
        output_dir: the run folder; weights go to ``output_dir/best/step-N``.
        key: the metric that decides (e.g. ``"r_mean"``).
        config_toml: written beside the weights (``config.toml``), so the folder is a checkpoint
            every tool reads with its model settings.
    """

    def __init__(self, output_dir: Path, key: str, config_toml: str) -> None:
        self.key = key
        self.config_toml = config_toml
        self.step, self.epoch, self.metrics = -1, -1, {}
        self.folder = Path(output_dir) / BEST_DIR
        self.checkpointer = CheckpointManager(self.folder, keep_latest_k=1, finite_keys=(MODEL,))

    @property
    def score(self) -> float:
        return self.metrics.get(self.key, -math.inf)

    def clear_stale(self, is_main: bool) -> None:
        """Fresh start: remove what an earlier run of this folder kept in ``best/`` (rank 0)."""
        if is_main and self.folder.exists() and any(self.folder.iterdir()):
            logger.warning("fresh start: removing %s of an earlier run", self.folder)
            shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)

    def offer(self, step: int, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Keep ``metrics`` and save ``model``'s weights if they beat the best so far (strictly).

        Collective (the save is): every rank calls it with the same metrics. A best of this
        step already on disk (saved before an interruption, recomputed after the resume) is the
        same weights and is kept as it is. Returns whether ``metrics`` became the best.
        """
        if metrics[self.key] <= self.score:
            return False
        self.step, self.epoch, self.metrics = step, epoch, dict(metrics)
        if not is_complete(self.checkpointer.step_dir(step)):
            self.checkpointer.save(
                step, {MODEL: ModelWrapper(model)}, extra_files={"config.toml": self.config_toml}
            )
        logger.info("new best %s %.4f at step %d: weights kept in %s", self.key, self.score,
                    step, self.path)  # fmt: skip
        return True

    @property
    def path(self) -> Path | None:
        """``best/step-N`` of the kept weights, if any are complete on disk."""
        if self.step < 0:
            return None
        path = self.checkpointer.step_dir(self.step)
        return path if is_complete(path) else None

    def load_into(self, model: nn.Module) -> Path | None:
        """Replace ``model``'s weights by the kept ones (collective); returns their folder, or
        None (and leaves the model alone) when nothing was kept."""
        path = self.path
        if path is not None:
            load_states(path, {MODEL: ModelWrapper(model)})
        return path

    def close(self) -> None:
        self.checkpointer.close()

    def state_dict(self) -> dict[str, Any]:
        # metrics as one JSON string: DCP loads the keys the fresh object asks for, and a fresh
        # object has no metric keys yet
        return {"step": self.step, "epoch": self.epoch, "metrics": json.dumps(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step, self.epoch = int(state_dict["step"]), int(state_dict["epoch"])
        self.metrics = {k: float(v) for k, v in json.loads(state_dict["metrics"]).items()}
