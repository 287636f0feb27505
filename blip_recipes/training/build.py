"""Build the pretraining model and its momentum state from a config, parallelized and loaded.

The recipe and the benchmarks call `build_pretraining`; it runs TorchTitan's set-up order:
model on the meta device -> `parallelize_blip` (float8, AC, compile, FSDP2) -> materialize on
the device -> load the full initial weights (seeded init, then BERT / ViT initialisation files
or `checkpoint.init_from`) -> momentum encoders built, parallelized and copied from the online
weights. Everything but the FSDP2 layout is identical for any world size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from blip_recipes.checkpoint import load_model_weights
from blip_recipes.config import Config
from blip_recipes.interop.init_checkpoints import (
    bert_init_state_dict,
    init_source,
    vit_init_state_dict,
)
from blip_recipes.models import build_model, build_momentum_encoders
from blip_recipes.models.blip import BlipPretrain
from blip_recipes.parallel import DistInfo, ParallelPlan, materialize, parallelize_blip
from blip_recipes.training.momentum import MomentumState

logger = logging.getLogger(__name__)


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`training.mixed_precision` -> the compute dtype (auto: bf16 on CUDA, fp32 on CPU).

    On CUDA also allows TF32 for the remaining fp32 matmuls (the reference trains in TF32).
    """
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.bfloat16 if choice == "bf16" else torch.float32


def set_determinism(enabled: bool) -> None:
    """`training.deterministic`: deterministic kernels everywhere, or the fast defaults.

    On CUDA the non-deterministic kernels a BLIP step would otherwise use are the atomics of
    embedding and index backward (the word embeddings, the hard-negative image gather) and of
    some attention backward kernels; cuBLAS needs a fixed workspace to be deterministic.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def model_kwargs(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    """Builder overrides from the `[model]` section and the tokenizer's special ids."""
    kwargs: dict[str, Any] = dict(
        vocab_size=tokenizer.vocab_size,
        image_size=cfg.model.image_size,
        embed_dim=cfg.model.embed_dim,
        pad_token_id=tokenizer.pad_token_id,
        enc_token_id=tokenizer.enc_token_id,
        dec_token_id=tokenizer.dec_token_id,
    )
    if cfg.model.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    return kwargs


def initial_weights(cfg: Config, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Full (unsharded) initial weights, identical on every rank and for any sharding.

    Built on the CPU from the run seed, then overwritten by `model.text_init` /
    `model.vision_init` and by `checkpoint.init_from` when given.
    """
    torch.manual_seed(cfg.job.seed)
    reference = build_model(cfg.model.name, **model_kwargs(cfg, tokenizer))
    reference.init_weights()
    _load_pretrained_parts(cfg, tokenizer, reference)
    if cfg.checkpoint.init_from:
        load_model_weights(cfg.checkpoint.init_from, reference)
    return reference.state_dict()


def _load_pretrained_parts(cfg: Config, tokenizer: Any, model: torch.nn.Module) -> None:
    """`model.text_init` (BERT) and `model.vision_init` (DeiT/timm ViT), from local files."""
    parts = []
    if init_source(cfg.model.text_init):
        parts.append(("model.text_init", init_source(cfg.model.text_init),
                      lambda src: bert_init_state_dict(src, tokenizer.vocab_size,
                                                       seed=cfg.job.seed)))  # fmt: skip
    if init_source(cfg.model.vision_init):
        parts.append(("model.vision_init", init_source(cfg.model.vision_init),
                      lambda src: vit_init_state_dict(src, cfg.model.image_size)))  # fmt: skip
    for key, source, convert in parts:
        if not Path(source).exists():
            raise FileNotFoundError(
                f"{key}={source!r} does not exist; point it at a local file or remove it "
                "(nothing is downloaded)"
            )
        state = convert(source)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or not state:
            raise ValueError(
                f"{key}={source!r}: weights do not fit the model (unexpected keys: "
                f"{result.unexpected_keys[:5]})"
            )
        logger.info("%s: loaded %d tensors from %s", key, len(state), source)


def fsdp_mesh(
    cfg: Config, dist_info: DistInfo, param_dtype: torch.dtype | None
) -> DeviceMesh | None:
    """The mesh to shard the model over, or None for a plain module.

    Several ranks always shard. One rank shards (FSDP2 at degree 1, as TorchTitan does) when
    the compute dtype is not fp32 and `parallel.single_rank_fsdp`: FSDP2's mixed-precision
    policy then runs every block on bf16 parameters, so the activations between the matmuls are
    bf16 too, where autocast would keep them fp32 (twice the saved bytes and memory traffic).
    """
    if dist_info.sharded:
        return dist_info.mesh
    if cfg.parallel.single_rank_fsdp and param_dtype not in (None, torch.float32):
        return dist_info.mesh
    return None


def build_pretraining(
    cfg: Config, tokenizer: Any, dist_info: DistInfo, param_dtype: torch.dtype | None
) -> tuple[BlipPretrain, MomentumState, ParallelPlan]:
    """The online model and the momentum state, parallelized, on this rank's device, loaded.

    The full initial weights are built once, on rank 0, and broadcast into every rank's shards
    (`set_model_state_dict(..., broadcast_from_rank0=True)`): host memory per node holds one
    model copy whatever the number of ranks, and every world size starts from the same numbers.

    Args:
        cfg: the whole run config (`model`, `parallel`, `job.seed`, `checkpoint.init_from`).
        tokenizer: gives the vocabulary size and the special ids.
        dist_info: rank, device and data-parallel mesh (`fsdp_mesh` decides whether to shard).
        param_dtype: FSDP2 compute dtype (bf16); None = fp32.

    Returns:
        `(model, momentum, plan)`; the momentum encoders start as copies of the model.
    """
    kwargs = model_kwargs(cfg, tokenizer)
    with torch.device("meta"):
        model = build_model(cfg.model.name, **kwargs)
        encoders = build_momentum_encoders(cfg.model.name, **kwargs)
    plan = parallelize_blip(model, encoders, cfg.parallel, fsdp_mesh(cfg, dist_info, param_dtype),
                            param_dtype)  # fmt: skip
    materialize(model, dist_info.device)
    weights = initial_weights(cfg, tokenizer) if dist_info.is_main else {}
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=dist_info.world_size > 1)  # fmt: skip
    set_model_state_dict(model, weights, options=options)
    del weights
    materialize(encoders, dist_info.device)
    encoders.requires_grad_(False)
    momentum = MomentumState(
        encoders,
        queue_size=cfg.momentum.queue_size,
        embed_dim=cfg.model.embed_dim,
        decay=cfg.momentum.decay,
        train_mode=cfg.momentum.train_mode,
        seed=cfg.job.seed,
        device=dist_info.device,
        group=dist_info.dp_group if dist_info.world_size > 1 else None,
    )
    momentum.copy_from(model)
    return model, momentum, plan
