"""Toy model, training step and state set for the checkpoint tests (importable by spawned ranks)."""

from __future__ import annotations

import torch
from torch import nn

from blip_recipes.checkpoint import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    MOMENTUM,
    OPTIMIZER,
    TRAIN_STATE,
    ModelWrapper,
    OptimizerWrapper,
    PerRankState,
    TrainState,
)
from blip_recipes.config.sections import LRSchedulerConfig
from blip_recipes.training.optim import build_lr_scheduler


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.2)  # consumes RNG: bitwise resume needs the RNG states back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(torch.relu(self.fc1(x))))


class Toy(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.head = nn.Linear(dim, 50)
        self.temp = nn.Parameter(torch.tensor([0.07]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x) / self.temp


class Counter:
    """Stands in for the data loader: a per-rank position."""

    def __init__(self, position: int = 0) -> None:
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.position = sd["position"]


class Setup:
    """Model, optimizer, scheduler, loader, momentum dict and train state, as a recipe has them."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1, fsdp: bool = False) -> None:
        torch.manual_seed(seed)
        self.rank, self.world = rank, world
        self.model = Toy()
        if fsdp:
            from blip_recipes.parallel import apply_fsdp, init_distributed

            apply_fsdp(self.model, list(self.model.blocks), init_distributed("cpu").mesh)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.05)
        cfg = LRSchedulerConfig(warmup_steps=3, warmup_lr=1e-3)
        self.sched = build_lr_scheduler(self.opt, cfg, 1e-2, steps_per_epoch=4, total_steps=20)
        self.loader = Counter()
        self.momentum = {"queue": torch.zeros(4, 8), "ptr": 0}
        self.train_state = TrainState()

    def states(self) -> dict:
        return {
            MODEL: ModelWrapper(self.model),
            OPTIMIZER: OptimizerWrapper(self.model, self.opt),
            LR_SCHEDULER: self.sched,
            LOADER: PerRankState(self.loader),
            MOMENTUM: self.momentum,
            TRAIN_STATE: self.train_state,
        }

    def step(self) -> float:
        """One training step on this rank's half of a fixed-per-step global batch."""
        s = self.train_state.step
        g = torch.Generator().manual_seed(100 + s)
        tokens = torch.randint(0, 50, (8, 5), generator=g)
        per = 8 // self.world
        tokens = tokens[self.rank * per : (self.rank + 1) * per]
        logits = self.model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.momentum["queue"][self.momentum["ptr"]] = torch.randn(8)  # RNG-dependent state
        self.momentum["ptr"] = (self.momentum["ptr"] + 1) % 4
        self.loader.position += per
        self.train_state.step += 1
        self.train_state.samples_seen += 8
        return loss.item()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of all parameters (collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[n] = t.detach().clone()
    return out


def full_exp_avg(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Unsharded AdamW first moments by parameter name (collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        t = opt.state[p]["exp_avg"]
        out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    return out
