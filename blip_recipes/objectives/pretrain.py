"""The BLIP pretraining objective (ITC + ITM + LM) as pure functions.

Each function is deterministic given its inputs (and, for negative sampling, a generator): no
hidden state, no host synchronisation, no Python loop over the batch. Similarity logits, the
softmax over B + Q columns and the LM cross-entropy run in fp32 with autocast disabled, whatever
the dtype of the inputs. The reference behaviour they match is written down in docs/algorithm.md.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from blip_recipes.models.inputs import (  # noqa: F401  (part of this module's interface)
    LM_IGNORE_INDEX,
    TEMP_MAX,
    TEMP_MIN,
    lm_labels,
    replace_first_token,
)

LM_LABEL_SMOOTHING = 0.1
"""Label smoothing of the LM (captioning) loss, the reference's."""


def _fp32_region(tensor: torch.Tensor) -> AbstractContextManager:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class ItcResult(NamedTuple):
    """loss: 0-d; sim_i2t / sim_t2i: (B, B + Q) fp32 logits (already divided by temp)."""

    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float | torch.Tensor,
    ground_truth: torch.Tensor | None = None,
) -> ItcResult:
    """Image-text contrastive loss with momentum distillation over [local momentum | queue].

    Args:
        image_feat, text_feat: (B, E) unit-norm online features (with grad).
        image_feat_m, text_feat_m: (B, E) unit-norm momentum features of the local batch.
        image_queue, text_queue: (E, Q) unit-norm queued momentum features.
        temp: temperature, a 1-element tensor (gradient flows through it).
        alpha: distillation weight in [0, 1]; soft targets are
            `alpha * softmax(sim_m) + (1 - alpha) * ground_truth`.
        ground_truth: (B, B + Q) target distributions, the same for both directions; None is
            `[I_B | 0]` (pretraining: each pair is its own only positive).

    Returns:
        `ItcResult(loss = (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i)`.
    """
    with _fp32_region(image_feat):
        temp = temp.float().reshape(())
        image_feat, text_feat = image_feat.float(), text_feat.float()
        with torch.no_grad():
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
            image_queue, text_queue = image_queue.float(), text_queue.float()
            text_all_m = torch.cat([text_feat_m, text_queue.t()], dim=0)  # (B + Q, E)
            image_all_m = torch.cat([image_feat_m, image_queue.t()], dim=0)
            detached_temp = temp.detach()
            sim_i2t_m = image_feat_m @ text_all_m.t() / detached_temp
            sim_t2i_m = text_feat_m @ image_all_m.t() / detached_temp
            if ground_truth is None:
                ground_truth = torch.zeros_like(sim_i2t_m)
                ground_truth.fill_diagonal_(1.0)
            targets_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1 - alpha) * ground_truth
            targets_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1 - alpha) * ground_truth
        sim_i2t = image_feat @ text_all_m.t() / temp
        sim_t2i = text_feat @ image_all_m.t() / temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(dim=1).mean()
        return ItcResult((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i)


def hard_negative_weights(sim: torch.Tensor) -> torch.Tensor:
    """Sampling weights for hard negatives: softmax over the local batch + 1e-4, diagonal 0.

    Args:
        sim: (B, B) local-batch similarity logits (row = query, column = candidate).

    Returns:
        (B, B) fp32 non-negative weights (not normalised), zero on the diagonal. Rows with
        non-finite similarities (a diverged step, which the training step then skips) get
        uniform weights instead of NaN, so sampling never fails on the device.
    """
    with torch.no_grad(), _fp32_region(sim):
        weights = sim.float().softmax(dim=1) + 1e-4
        weights = torch.where(torch.isfinite(weights), weights, torch.ones_like(weights))
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        return weights.masked_fill(eye, 0.0)


def negative_noise(
    batch: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of one hard-negative draw: two (B, B) fp32 Exp(1) tensors, drawn in
    the order (and with the calls) `torch.multinomial(weights, 1)` makes for the image and then
    the text negatives, so `choose_negatives` picks what multinomial would."""

    def draw() -> torch.Tensor:
        return torch.empty((batch, batch), device=device).exponential_(1, generator=generator)

    return draw(), draw()


def choose_negatives(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One draw per row from the categorical distribution `weights / weights.sum(1)`.

    The exponential race `argmax(weights / noise)`, noise ~ Exp(1), is the algorithm of
    `torch.multinomial(weights, 1)` (with the same noise, the same index), written as tensor
    code: no validity checks on the host, and it compiles.

    Args:
        weights: (R, C) non-negative, every row with a positive entry.
        noise: (R, C) Exp(1) draws (`negative_noise`).

    Returns:
        (R,) int64 column indices.
    """
    return (weights / noise).argmax(dim=1)


def hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_hard_negatives` given its random numbers (`negative_noise`): no generator, so
    it compiles into one graph with the loss."""
    batch = sim_i2t.shape[0]
    neg_image = choose_negatives(hard_negative_weights(sim_t2i[:, :batch]), noise[0])
    neg_text = choose_negatives(hard_negative_weights(sim_i2t[:, :batch]), noise[1])
    return neg_image, neg_text


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative image per text and one hard negative text per image.

    Vectorised (no loop, no host sync): the draws of `torch.multinomial(weights, 1)`, one per
    direction, from `negative_noise` and `choose_negatives`. Needs B >= 2.

    Args:
        sim_i2t: (B, >= B) image-to-text logits; only the first B columns (local batch) are used.
        sim_t2i: (B, >= B) text-to-image logits; likewise.
        generator: RNG on the logits' device (reproducible steps); None = global RNG.

    Returns:
        (neg_image_for_text (B,), neg_text_for_image (B,)), int64 indices into the local batch,
        never equal to the row's own index.
    """
    noise = negative_noise(sim_i2t.shape[0], sim_i2t.device, generator)
    return hard_negatives(sim_i2t, sim_t2i, noise)


class ItmResult(NamedTuple):
    """loss: 0-d cross-entropy; accuracy: fraction of correct argmax over 3B pairs;
    pos_prob / neg_prob: mean P(match) over positive / negative pairs. All 0-d tensors."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    pos_prob: torch.Tensor
    neg_prob: torch.Tensor


def itm_loss(logits: torch.Tensor) -> ItmResult:
    """Image-text matching loss over B positives followed by 2B negatives.

    Args:
        logits: (3B, 2) ITM head outputs; rows [0, B) are matched pairs, the rest negatives.

    Returns:
        `ItmResult`; the loss is the mean cross-entropy over 3B rows (labels [1]*B + [0]*2B).
    """
    rows = logits.shape[0]
    if rows % 3 != 0:
        raise ValueError(f"ITM logits must have 3B rows, got {rows}")
    batch = rows // 3
    with _fp32_region(logits):
        logits = logits.float()
        labels = torch.zeros(rows, dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            match_prob = logits.softmax(dim=1)[:, 1]
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            return ItmResult(loss, accuracy, match_prob[:batch].mean(), match_prob[batch:].mean())


def itc_loss_and_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float | torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`itc_loss`, then the hard negatives from its similarities (`hard_negatives`): the part
    of the objective between the unimodal encoders and the multimodal pass, as one function
    of tensors (`ItcItmLosses` compiles it as one graph).

    Args: as `itc_loss`, plus `noise` from `negative_noise`.

    Returns:
        (loss 0-d, neg_image_for_text (B,), neg_text_for_image (B,)).
    """
    itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                   temp, alpha)  # fmt: skip
    neg_image, neg_text = hard_negatives(itc.sim_i2t.detach(), itc.sim_t2i.detach(), noise)
    return itc.loss, neg_image, neg_text


class ItcItmLosses:
    """The ITC and ITM parts of the pretraining objective, eager or compiled.

    `itc_and_negatives` runs `itc_loss_and_negatives` (ITC with momentum distillation over
    the queues and the hard-negative choice) and `itm` runs `itm_loss`; with a
    `compile_backend` each is one `torch.compile(fullgraph=True)` graph (eager, the two are
    about 95 small kernels forward + backward). Nothing in them is a Python value that changes between steps: the
    random numbers of the draw come in as tensors (`negative_noise`, drawn eagerly from the
    step's generator, so both paths pick the same negatives) and the compiled path passes
    alpha as a 0-d tensor, so the alpha ramp compiles once. Neither path reads the device.

    Args:
        compile_backend: `torch.compile` backend; None = eager.
    """

    def __init__(self, compile_backend: str | Callable | None = None) -> None:
        self.compiled = compile_backend is not None
        self._itc: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
            itc_loss_and_negatives
        )
        self.itm: Callable[[torch.Tensor], ItmResult] = itm_loss
        if compile_backend is not None:
            self._itc = torch.compile(itc_loss_and_negatives, fullgraph=True,
                                      backend=compile_backend)  # fmt: skip
            self.itm = torch.compile(itm_loss, fullgraph=True, backend=compile_backend)

    def itc_and_negatives(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        image_queue: torch.Tensor,
        text_queue: torch.Tensor,
        temp: torch.Tensor,
        alpha: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`itc_loss_and_negatives` with its noise drawn from `generator` (None = global RNG).

        Returns:
            (ITC loss 0-d, neg_image_for_text (B,), neg_text_for_image (B,)).
        """
        noise = negative_noise(image_feat.shape[0], image_feat.device, generator)
        if self.compiled and not isinstance(alpha, torch.Tensor):
            alpha = torch.full((), alpha, dtype=torch.float32, device=image_feat.device)
        return self._itc(image_feat, text_feat, image_feat_m, text_feat_m, image_queue,
                         text_queue, temp, alpha, noise)  # fmt: skip


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LM_LABEL_SMOOTHING
) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t predict labels at t + 1.

    Args:
        logits: (B, L, V), or already shifted (position t predicts t + 1) as (B, L - 1, V) or
            flat (B * (L - 1), V).
        labels: (B, L) with -100 where ignored (padding); column 0 ([DEC]) is never a target.
        label_smoothing: 0.1 in the reference.

    Returns:
        0-d fp32 mean over non-ignored target tokens.
    """
    if logits.dim() == 3 and logits.shape[1] == labels.shape[1]:
        logits = logits[:, :-1]
    targets = labels[:, 1:]
    with _fp32_region(logits):
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=LM_IGNORE_INDEX,
            label_smoothing=label_smoothing,
        )


def chunk_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Summed label-smoothed cross-entropy of one chunk of rows, accumulated in fp32.

    Args:
        logits: (N, V) in the compute dtype.
        targets: (N,) int64, -100 where ignored.
        label_smoothing: as in `F.cross_entropy`.

    Returns:
        0-d fp32 sum over the chunk's non-ignored rows.
    """
    return F.cross_entropy(logits.float(), targets, ignore_index=LM_IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="sum")  # fmt: skip


class ChunkedLMLoss:
    """The LM head's vocab projection and the cross-entropy, the cross-entropy chunked over rows.

    The (N, V) logits never exist in fp32: the rows are projected once in the compute dtype of
    the inputs (bf16 parameters under FSDP2; no fp32 copy of the tied embedding), and each chunk
    of rows has its label-smoothed cross-entropy summed in fp32 by `chunk_cross_entropy_sum`,
    which `compile_backend` compiles (`fullgraph=True`) so the upcast, log-softmax and smoothing
    fuse per chunk. One projection has one weight gradient: projecting per chunk gave every
    chunk its own (V, D) gradient to add up (8 x 94 MB at BERT-base, which on a CPU doubled the
    LM region's time). The mean is over the non-ignored targets, as
    `F.cross_entropy(reduction="mean")`: in fp32 it equals `lm_loss` on full logits.

    Args:
        chunks: row chunks (8, as TorchTune's `LinearCrossEntropyLoss`).
        compile_backend: `torch.compile` backend of the per-chunk loss; None = eager.
    """

    def __init__(self, chunks: int = 8, compile_backend: str | Callable | None = None) -> None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks
        self.chunk_loss = chunk_cross_entropy_sum
        if compile_backend is not None:
            self.chunk_loss = torch.compile(chunk_cross_entropy_sum, fullgraph=True,
                                            backend=compile_backend)  # fmt: skip

    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = LM_LABEL_SMOOTHING,
    ) -> torch.Tensor:
        """Mean next-token loss.

        Args:
            hidden: (N, D) transformed decoder states (`LMHead.transform`), row i predicts
                `targets[i]`.
            weight: (V, D) vocab projection (the tied word embeddings).
            bias: (V,).
            targets: (N,) int64, -100 where ignored.
            label_smoothing: 0.1 in the reference.

        Returns:
            0-d fp32 mean over the non-ignored targets.
        """
        dtype = hidden.dtype
        logits = F.linear(hidden, weight.to(dtype), bias.to(dtype))  # (N, V), compute dtype
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows, chunk_targets in zip(logits.tensor_split(self.chunks),
                                       targets.tensor_split(self.chunks)):  # fmt: skip
            total = total + self.chunk_loss(rows, chunk_targets, label_smoothing)
        count = (targets != LM_IGNORE_INDEX).sum().clamp(min=1)
        return total / count
