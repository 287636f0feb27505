"""A tiny transformer-ish model for the parallel and checkpoint tests (importable by spawned ranks)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


class ToyBlock(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class ToyModel(nn.Module):
    def __init__(self, n_blocks: int = 2, dim: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, 2 * dim, dropout) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)  # 64 outputs: float8-eligible by size, skipped by name
        self.proj = nn.Linear(dim, 10)  # 10 outputs: never float8-eligible
        self.temp = nn.Parameter(torch.tensor([0.07]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x) + self.proj(x).sum(-1, keepdim=True) * self.temp


def toy_batch(step: int, batch: int = 8, seq: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
    targets = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return tokens, targets


def toy_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
