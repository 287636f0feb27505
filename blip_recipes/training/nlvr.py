"""NLVR2 fine-tuning: building the two-image model, its optimizer step and its evaluation.

`build_nlvr` follows the pretraining set-up order (meta -> `parallelize_blip` -> the NLVR entry
points registered with FSDP2 -> materialize -> full initial weights built on rank 0 and
broadcast). The initial weights are the seeded init overwritten by `checkpoint.init_from`: a
pretraining checkpoint (each layer's cross-attention copied to both image attentions), one of
our NLVR checkpoints, or a reference `model_base_nlvr.pth` (`blip_recipes.interop.nlvr`).

`NlvrStep` is the shared optimizer step (`blip_recipes.training.step`) with the pair
classifier's cross-entropy (`blip_recipes.objectives.nlvr`) as its micro-batch objective.

`evaluate_nlvr` scores a split: each rank classifies its contiguous share of the pairs, the
predictions are gathered in order, so every rank holds the same accuracy and predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.data import DataLoader

from blip_recipes.config import Config, LaunchContext, register_validator
from blip_recipes.data.nlvr import NlvrEvalPairs, NlvrExample
from blip_recipes.data.transforms import normalize_images
from blip_recipes.evaluation._dist import (
    all_gather_rows,
    is_sharded,
    rank_and_world,
    run_balanced,
    shard_range,
)
from blip_recipes.models.nlvr import NLVR_ENTRY_POINTS, BlipNLVR, build_nlvr_model
from blip_recipes.objectives import nlvr as objective
from blip_recipes.parallel import DistInfo, ParallelPlan, materialize, parallelize_blip
from blip_recipes.parallel.fsdp import reshard_all
from blip_recipes.training.build import fsdp_mesh, model_kwargs
from blip_recipes.training.step import OptimizerStep

logger = logging.getLogger(__name__)

SELECTION_KEY = "acc"
"""The validation number the kept weights are chosen by (accuracy, as the reference)."""


@register_validator
def _nlvr_section(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """`[nlvr]` checks (registered when `blip validate` / the NLVR recipe imports this)."""
    nl = cfg.nlvr
    if nl.eval_every_epochs < 0:
        yield f"'nlvr.eval_every_epochs' must be >= 0, got {nl.eval_every_epochs}"
    if nl.min_lr < 0 or nl.min_lr > cfg.optimizer.lr:
        yield f"'nlvr.min_lr' ({nl.min_lr}) must be between 0 and 'optimizer.lr' ({cfg.optimizer.lr})"
    for key in ("train_annotation", "dev_annotation", "test_annotation"):
        path = getattr(nl, key)
        if path and not Path(path).is_file():
            yield f"'nlvr.{key}' {path} does not exist (or is not a file)"
    if nl.image_root and not Path(nl.image_root).is_dir():
        yield f"'nlvr.image_root' {nl.image_root} is not a folder (it does not exist)"


def check_nlvr_config(cfg: Config) -> None:
    """What only the NLVR recipe needs (not checked for other recipes sharing the config).

    Raises:
        ConfigError: `nlvr.train_annotation` is not set.
    """
    from blip_recipes.config import ConfigError

    if not cfg.nlvr.train_annotation:
        raise ConfigError(
            "'nlvr.train_annotation' is not set: NLVR fine-tuning needs training pairs"
        )


class NlvrBatch(NamedTuple):
    """One (micro-)batch on the device: images (2B, 3, H, W) normalised (left images, then
    right), input_ids / attention_mask (B, L), labels (B,) int64."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def nlvr_logits(
    model: BlipNLVR, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, 2) fp32 logits: both images of every pair in one `encode_image` call, then
    `classify` (the reference's forward without its loss)."""
    return model.classify(model.encode_image(images), input_ids, attention_mask)


@dataclass
class NlvrOutput:
    """What one NLVR step reports (0-d each): `loss` and training accuracy `acc`, means over
    its micro-batches."""

    loss: torch.Tensor
    acc: torch.Tensor


class NlvrStep(OptimizerStep):
    """The optimizer step of NLVR fine-tuning: `OptimizerStep` (no momentum state) with the
    pair classifier's cross-entropy as its micro-batch."""

    def micro_batch(  # type: ignore[override]
        self, batch: NlvrBatch, targets: None
    ) -> NlvrOutput:
        """Loss and training accuracy of one micro-batch."""
        logits = nlvr_logits(self.model, batch.images, batch.input_ids, batch.attention_mask)
        return NlvrOutput(
            objective.nlvr_loss(logits, batch.labels),
            objective.accuracy(logits.detach(), batch.labels),
        )


# ---------------------------------------------------------------------- building the model
def _nlvr_model(cfg: Config, tokenizer: Any) -> BlipNLVR:
    return build_nlvr_model(cfg.model.name, merge_from=cfg.nlvr.merge_from,
                            **model_kwargs(cfg, tokenizer))  # fmt: skip


def nlvr_initial_weights(cfg: Config, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Full initial weights: the seeded init, overwritten by `checkpoint.init_from` (module
    docstring), the ViT position embedding interpolated to `model.image_size`.

    Raises:
        ValueError: the checkpoint has weights of another shape, weights the model lacks, or
            none of the ViT (not a BLIP checkpoint for this model).
    """
    from blip_recipes.interop.nlvr import read_nlvr_weights
    from blip_recipes.training.retrieval_setup import fit_state_dict

    torch.manual_seed(cfg.job.seed)
    state = _nlvr_model(cfg, tokenizer).state_dict()
    init_from = cfg.checkpoint.init_from
    if not init_from:
        return state
    source, kind = read_nlvr_weights(init_from)
    if not any(k.startswith("visual_encoder.") for k in source):
        raise ValueError(f"checkpoint.init_from={init_from!r} holds no image encoder weights")
    logger.info("NLVR model initialised from %s (%s, %d tensors)", init_from, kind, len(source))
    return fit_state_dict(source, state, "checkpoint.init_from")


def build_nlvr(
    cfg: Config, tokenizer: Any, dist_info: DistInfo, param_dtype: torch.dtype | None
) -> tuple[BlipNLVR, ParallelPlan]:
    """The NLVR model, parallelized, on this rank's device, loaded (module docstring)."""
    with torch.device("meta"):
        model = _nlvr_model(cfg, tokenizer)
    mesh = fsdp_mesh(cfg, dist_info, param_dtype)
    plan = parallelize_blip(model, None, cfg.parallel, mesh, param_dtype,  # type: ignore[arg-type]
                            entry_points=NLVR_ENTRY_POINTS)  # fmt: skip
    materialize(model, dist_info.device)
    weights = nlvr_initial_weights(cfg, tokenizer) if dist_info.is_main else {}
    options = StateDictOptions(full_state_dict=True, strict=True,
                               broadcast_from_rank0=dist_info.world_size > 1)  # fmt: skip
    set_model_state_dict(model, weights, options=options)
    return model, plan


def register_nlvr_entry_points(model: BlipNLVR) -> None:
    """FSDP2 forwards for the NLVR entry points (done by `build_nlvr`; for models sharded
    elsewhere)."""
    for name in NLVR_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)


# ---------------------------------------------------------------------- evaluation
@dataclass
class NlvrEvalResult:
    """Accuracy of one split and the prediction of every pair (in annotation order)."""

    metrics: dict[str, float]
    predictions: list[int]
    logits: torch.Tensor
    """(N, 2) fp32 logits of every pair."""

    def records(self, examples: list[NlvrExample]) -> list[dict[str, Any]]:
        """One `{"images", "sentence", "label", "prediction", "prob_true"}` per pair."""
        probs = self.logits.softmax(dim=1)[:, 1].tolist()
        return [
            {"images": list(e.images), "sentence": e.sentence, "label": bool(e.label),
             "prediction": bool(p), "prob_true": round(q, 6)}
            for e, p, q in zip(examples, self.predictions, probs)
        ]  # fmt: skip


def _collate(items: list[tuple[torch.Tensor, str, int]]):
    pairs, sentences, labels = zip(*items)
    return torch.stack(pairs), list(sentences), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def evaluate_nlvr(
    model: BlipNLVR,
    tokenizer: Any,
    examples: list[NlvrExample],
    image_size: int,
    max_words: int,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    autocast: AbstractContextManager | None = None,
) -> NlvrEvalResult:
    """Accuracy on `examples` (collective when a process group is up: every rank calls it).

    Returns the same `NlvrEvalResult` on every rank: `metrics` = {"acc" (fraction),
    "correct", "total"}.
    """
    rank, world = rank_and_world()
    share = shard_range(len(examples), rank, world)
    data = NlvrEvalPairs(examples, share, image_size, max_words)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    was_training = model.training
    model.eval()
    dummy = (torch.zeros(1, 2, 3, image_size, image_size, dtype=torch.uint8), ["a"],
             torch.zeros(1, dtype=torch.int64))  # fmt: skip

    def classify(batch) -> torch.Tensor:
        pairs, sentences, _ = batch
        images = torch.cat([pairs[:, 0], pairs[:, 1]]).to(device)
        ids, mask = tokenizer(sentences)
        with autocast or nullcontext():
            return nlvr_logits(model, normalize_images(images), ids.to(device), mask.to(device))

    steps = -(-len(data) // batch_size) if len(data) else 0
    logits = [out.float() for _, out in run_balanced(loader, steps, classify, dummy,
                                                      is_sharded(model))]  # fmt: skip
    local = torch.cat(logits) if logits else torch.zeros(0, 2, device=device)
    every = all_gather_rows(local, len(examples)).cpu()
    model.train(was_training)
    reshard_all(model)
    labels = torch.tensor([e.label for e in examples], dtype=torch.int64)
    right = int(objective.correct(every, labels))
    metrics = {"acc": right / len(examples), "correct": float(right), "total": float(len(examples))}
    return NlvrEvalResult(metrics, objective.predictions(every).tolist(), every)


__all__ = [
    "SELECTION_KEY",
    "NlvrBatch",
    "NlvrEvalResult",
    "NlvrOutput",
    "NlvrStep",
    "build_nlvr",
    "check_nlvr_config",
    "evaluate_nlvr",
    "nlvr_initial_weights",
    "nlvr_logits",
]
