"""The ``Stateful`` objects a training checkpoint is made of, and their key names.

DCP saves a non-tensor value once (from one rank) when every rank has it under the same key, and
loads it on every rank. Per-rank values (RNG states, loader positions) therefore live under keys
unique to the rank (``rank3``), stored as bytes (``torch.save`` of tensors and plain values,
read back with ``weights_only=True``: a checkpoint never runs code), and are *optional* on load: a checkpoint
written by 2 ranks loaded by 1 (or 4) simply lacks (or ignores) some of them, and the object
falls back to its fresh state. :class:`CheckpointManager` learns which keys may be absent from
an object's ``optional_keys()``.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from blip_recipes.checkpoint.safe_read import safe_torch_load

logger = logging.getLogger(__name__)

# Top-level keys of a training checkpoint (named constants, TorchTitan style).
MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
LOADER = "loader"
MOMENTUM = "momentum"
TRAIN_STATE = "train_state"


def rank_key(rank: int) -> str:
    """Key of one rank's entry in a per-rank mapping (``rank0``, ``rank1``...)."""
    return f"rank{rank}"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_bytes(obj: Any) -> bytes:
    """Serialise tensors and plain values (dicts, lists, numbers, strings) to bytes: one DCP
    value. Other objects would be refused by :func:`from_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, what: str = "a per-rank checkpoint entry") -> Any:
    """Inverse of :func:`to_bytes`, through ``weights_only=True``: tensors and plain values.

    Raises:
        UnsafeCheckpointError: the bytes name any other object (nothing of it runs).
    """
    return safe_torch_load(data, what)


class ModelWrapper(Stateful):
    """A model (or several, merged into one key space) as a DCP Stateful.

    Uses ``get_model_state_dict``/``set_model_state_dict``, which give FSDP2 models sharded
    DTensors (each rank saves its shard, DCP reshards on load to any world size) and plain models
    ordinary tensors, under the same FQNs. Several models (e.g. online + momentum encoders as
    separate modules) must have disjoint FQNs.
    """

    def __init__(self, model: Union[nn.Module, Sequence[nn.Module]]) -> None:
        self.models = [model] if isinstance(model, nn.Module) else list(model)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for model in self.models:
            out.update(get_model_state_dict(model))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        options = StateDictOptions(strict=len(self.models) == 1)
        for model in self.models:
            set_model_state_dict(model, state_dict, options=options)


class OptimizerWrapper(Stateful):
    """An optimizer as a DCP Stateful, keyed by parameter FQN (not by position).

    ``flatten_optimizer_state_dict`` gives keys like ``state.blocks.0.fc1.weight.exp_avg``, so the
    checkpoint survives resharding and is checked key by key like the model. Before the first
    step ``get_optimizer_state_dict`` initialises the state (a zero-LR step), so a fresh
    optimizer asks for the same keys a trained one saved.
    """

    _options = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.model, self.optimizer, options=self._options)
        if fresh:  # the zero-LR step counted as a step: undo it, or a step-0 checkpoint resumes
            self._reset_step_counts(state)  # with AdamW's bias correction one step ahead
        return state

    def _reset_step_counts(self, state: dict[str, Any]) -> None:
        """Set the ``step`` counts that the initialising zero-LR step set to 1 back to 0 (in the
        optimizer and in ``state``); its moments are zero, so the optimizer then equals a fresh
        one."""
        steps = [(state, k) for k in state if k.startswith("state.") and k.endswith(".step")]
        steps += [(s, "step") for s in self.optimizer.state.values() if "step" in s]
        for entries, key in steps:
            value = entries[key]
            if isinstance(value, torch.Tensor):
                value.zero_()
            else:
                entries[key] = type(value)(0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=state_dict, options=self._options
        )


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy (if installed), torch CPU and current CUDA device RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (entries this process cannot use are skipped)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np

            name, key, *rest = state["numpy"]  # the key: a tensor (older checkpoints: an array)
            key = key.numpy() if isinstance(key, torch.Tensor) else key
            np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainState(Stateful):
    """Progress counters plus every rank's RNG states, captured at save time.

    ``step`` counts completed optimizer steps, ``epoch`` the current epoch, ``samples_seen`` the
    global number of samples consumed (what lets a run resumed on another world size continue
    the data at the same global sample). ``rng.rank<r>`` holds rank r's RNG states, restored on
    load by the rank with the same index if the checkpoint has it; ``rng_restored`` tells the
    recipe whether it was (otherwise the freshly seeded RNG goes on, e.g. after a world-size
    change).
    """

    def __init__(self, step: int = 0, epoch: int = 0, samples_seen: int = 0) -> None:
        self.step = step
        self.epoch = epoch
        self.samples_seen = samples_seen
        self.rng_restored = False

    def state_dict(self) -> dict[str, Any]:
        rank, _ = _rank_and_world()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "rng": {rank_key(rank): to_bytes(capture_rng_state())},
        }

    def optional_keys(self) -> list[str]:
        """Keys that a checkpoint from another world size may lack."""
        return [f"rng.{rank_key(_rank_and_world()[0])}"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.epoch = int(state_dict["epoch"])
        self.samples_seen = int(state_dict["samples_seen"])
        rng = state_dict.get("rng", {}).get(rank_key(_rank_and_world()[0]))
        self.rng_restored = rng is not None
        if rng is not None:
            restore_rng_state(from_bytes(rng, f"the RNG state of rank {_rank_and_world()[0]}"))


class PerRankState(Stateful):
    """Checkpoint a per-rank Stateful (the data loader) under a key unique to this rank.

    The wrapped object's state is stored as one opaque bytes value with the world size it was
    written under, so its inner structure can change freely (number of workers, buffers...). It
    is restored only when the world size matches; otherwise (or when this rank has no entry)
    ``restored`` is False and the caller repositions from ``TrainState.samples_seen``.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_and_world()
        return {rank_key(rank): to_bytes({"world_size": world, "state": self.inner.state_dict()})}

    def optional_keys(self) -> list[str]:
        return [rank_key(_rank_and_world()[0])]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = _rank_and_world()
        data = state_dict.get(rank_key(rank))
        self.restored = False
        if data is None:
            logger.warning("checkpoint has no per-rank state for rank %d; starting it fresh", rank)
            return
        payload = from_bytes(data, f"the per-rank state of rank {rank}")
        if payload["world_size"] != world:
            logger.warning(
                "per-rank state written by %d ranks, running %d: not restored",
                payload["world_size"],
                world,
            )
            return
        self.inner.load_state_dict(payload["state"])
        self.restored = True
