"""Executed model FLOPs of one pretraining step, counted by PyTorch.

`step_flops` builds a preset on the meta device, materialises it as fake tensors (no memory, no
compute) and runs one full step (momentum targets, losses, backward) under
`torch.utils.flop_counter.FlopCounterMode`. The count is what the step's matmuls, convolutions
and attention kernels execute (1 multiply-add = 2 FLOP), unlike the fixed reference count that
effective MFU divides by (docs/performance.md): the two differ exactly by what the step's
structure saves or spends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from blip_recipes.models import build_model, build_momentum_encoders, preset_queue_size
from blip_recipes.parallel import materialize
from blip_recipes.training.momentum import MomentumState
from blip_recipes.training.pretrain import pretrain_losses

TEXT_LENGTH = 30


@dataclass
class StepFlops:
    """FLOPs per sample of one training step (GFLOP): `total`, and `momentum` (the no-grad
    momentum forwards, included in `total`)."""

    model: str
    batch: int
    total: float
    momentum: float


def step_flops(
    name: str, batch: int = 8, image_size: int = 224, negative_kv: str = "select"
) -> StepFlops:
    """Count one step of preset `name` (queue 57600, captions of 30 tokens, no padding).

    Args:
        name: model preset (`blip_pretrain_base`, `blip_pretrain_large`, ...).
        batch: per-rank batch B (the ITC/ITM terms that grow with B are a small share).
        negative_kv: the hard negatives' keys/values, `select` (default) or `recompute`.
        image_size: square input side.

    Returns:
        `StepFlops` in GFLOP per sample.
    """
    with torch.device("meta"):
        model = build_model(name, image_size=image_size).train()
        encoders = build_momentum_encoders(name, image_size=image_size)
    queue_size = preset_queue_size(name)
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialize(model, torch.device("cpu"))
        materialize(encoders, torch.device("cpu"))
        momentum = MomentumState(encoders, queue_size, model.embed_dim)
        vocab = model.text.embeddings.word_embeddings.num_embeddings
        images = torch.randn(batch, 3, image_size, image_size)
        ids = torch.randint(3, vocab - 2, (batch, TEXT_LENGTH))
        mask = torch.ones(batch, TEXT_LENGTH, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                targets = momentum.targets(images, ids, mask)
            pretrain_losses(
                model, images, ids, mask, targets, 0.4, None, negative_kv
            ).loss.backward()
    momentum_flops = sum(counter.get_flop_counts().get("MomentumEncoders", {}).values())
    return StepFlops(name, batch, counter.get_total_flops() / batch / 1e9,
                     momentum_flops / batch / 1e9)  # fmt: skip
