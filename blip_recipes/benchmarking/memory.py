"""What a training step keeps for backward: saved-activation bytes per sample, on any device.

`saved_bytes(fn)` runs `fn` under `torch.autograd.graph.saved_tensors_hooks` and adds up the
distinct storages autograd saves (a tensor saved by several ops counts once). Parameters and
their casts are saved too; `bytes_per_sample` removes them by measuring two batch sizes and
taking the slope, which is what grows with the batch.

    python -m blip_recipes.benchmarking.memory --model blip_pretrain_base --batches 2 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Run `fn` (returns the loss; no backward) and return the bytes of the distinct storages
    saved for backward, in total and per dtype."""
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = (storage.nbytes(), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    per_dtype: dict[str, int] = {}
    for nbytes, dtype in seen.values():
        per_dtype[str(dtype)] = per_dtype.get(str(dtype), 0) + nbytes
    return sum(per_dtype.values()), per_dtype


def step_saved_bytes(model_name: str, batch: int, single_rank_fsdp: bool, **overrides) -> int:
    """Saved bytes of one bf16 pretraining forward (one rank, CPU) built like the recipe."""
    from blip_recipes.config import Config
    from blip_recipes.config.sections import ParallelConfig
    from blip_recipes.models import build_model, build_momentum_encoders
    from blip_recipes.parallel import init_distributed, parallelize_blip
    from blip_recipes.training.build import fsdp_mesh
    from blip_recipes.training.momentum import MomentumState
    from blip_recipes.training.pretrain import pretrain_losses

    info = init_distributed("cpu")
    cfg = Config()
    cfg.parallel = ParallelConfig(single_rank_fsdp=single_rank_fsdp)
    torch.manual_seed(0)
    model = build_model(model_name, **overrides).train()
    encoders = build_momentum_encoders(model_name, **overrides)
    mesh = fsdp_mesh(cfg, info, torch.bfloat16)
    queue = overrides.get("queue_size", 4 * batch)
    embed = model.embed_dim
    momentum = MomentumState(encoders, queue_size=queue, embed_dim=embed)
    momentum.copy_from(model)
    parallelize_blip(model, None, cfg.parallel, mesh, torch.bfloat16)
    size = overrides.get("image_size", 224)
    images = torch.randn(batch, 3, size, size)
    ids = torch.randint(3, 90, (batch, 30))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        targets = momentum.targets(images, ids, mask)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=mesh is None)

    def forward() -> torch.Tensor:
        with autocast:
            return pretrain_losses(model, images, ids, mask, targets, 0.4).loss

    return saved_bytes(forward)[0]


def lm_region_peak_mb(
    chunked: bool,
    batch: int = 75,
    length: int = 30,
    width: int = 768,
    vocab: int = 30524,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Peak host memory (MB over the process's level before it) of the LM region's forward and
    backward: LM head + loss at ViT-B sizes, on CPU. Run in a fresh process (peak RSS only
    rises)."""
    import resource

    from blip_recipes.models.bert_blocks import LMHead
    from blip_recipes.objectives import pretrain as objective

    torch.manual_seed(0)
    head = LMHead(width, vocab).to(dtype)
    embeddings = torch.nn.Parameter(torch.randn(vocab, width, dtype=dtype) * 0.02)
    hidden = torch.randn(batch * (length - 1), width, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, vocab, (batch * (length - 1),))
    loss_fn = objective.ChunkedLMLoss()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if chunked:
        loss = loss_fn(head.transform(hidden), embeddings, head.bias, targets, 0.1)
    else:  # the previous path: fp32 logits from an fp32 copy of the embedding, then the loss
        logits = head(hidden, embeddings)
        labels = torch.cat([targets.new_zeros(batch, 1), targets.view(batch, -1)], 1)
        loss = objective.lm_loss(logits, labels, 0.1)
    loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="blip_pretrain_base")
    p.add_argument("--batches", type=int, nargs=2, default=(2, 4))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--lm-region",
        choices=["chunked", "full"],
        help="only the LM head + loss peak at ViT-B sizes, batch 75 (fresh process)",
    )
    args = p.parse_args(argv)
    if args.lm_region:
        peak = lm_region_peak_mb(args.lm_region == "chunked")
        print(f"LM region ({args.lm_region}): peak {peak:.0f} MB above the inputs")
        return 0
    small, large = args.batches
    out = {}
    for fsdp in (False, True):
        totals = [step_saved_bytes(args.model, b, fsdp, image_size=args.image_size, queue_size=64)
                  for b in (small, large)]  # fmt: skip
        name = "fsdp2-degree-1" if fsdp else "autocast"
        out[name] = {"per_sample_mb": (totals[1] - totals[0]) / (large - small) / 1e6,
                     "totals_mb": [t / 1e6 for t in totals]}  # fmt: skip
        print(f"{name}: {out[name]['per_sample_mb']:.1f} MB saved for backward per sample")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
