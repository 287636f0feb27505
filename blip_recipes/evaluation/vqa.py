"""VQA inference (candidate ranking and free generation), split evaluation and the results file.

Both inference modes run through `BlipVQA`'s entry points, so an FSDP2-sharded model works:

- **rank** (the reference's default, `k_test = 128`): one decoder step after `[DEC]` gives each
  candidate's first-token probability; the k most probable candidates are decoded whole and
  re-scored (:mod:`blip_recipes.objectives.vqa`); the best one is the answer. All k candidates of
  a question attend its states as one packed query.
- **generate**: beam search (3 beams, at most 10 tokens, at least 1, stop at `[SEP]`) after
  `[DEC]`, attending every question position, padding included, as the reference (and
  `transformers`) generate.

`answer_questions` answers a split across ranks (contiguous shares, results gathered in order,
identical on every rank); `VqaResult.write` writes the official results format
`[{"question_id": ..., "answer": ...}]`, which the VQA evaluation server takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from blip_recipes.data import build_eval_transform, normalize_images
from blip_recipes.data.vqa import QUESTION_LENGTH, VqaRecord, pre_question, tokenize_trimmed
from blip_recipes.evaluation._dist import is_sharded, rank_and_world, run_balanced, shard_range
from blip_recipes.evaluation.generation import decode
from blip_recipes.evaluation.vqa_metrics import mean_vqa_accuracy
from blip_recipes.models.inputs import model_image_size
from blip_recipes.objectives.vqa import first_token_topk, rescore_topk

Inference = Literal["rank", "generate"]
CANDIDATE_LENGTH = 16
"""Tokens kept of a candidate answer ([DEC] and [SEP] included)."""


class RankResult(NamedTuple):
    """best: (M,) chosen candidate per question; topk: (M, k) the first stage's candidates,
    most probable first token first; first_probs: (M, k) their first-token probabilities;
    scores: (M, k) their re-scores (minus the smoothed summed cross-entropy)."""

    best: torch.Tensor
    topk: torch.Tensor
    first_probs: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def rank_candidates(
    model: nn.Module,
    question_states: torch.Tensor,
    question_mask: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_mask: torch.Tensor,
    k: int = 128,
) -> RankResult:
    """Pick each question's answer from a candidate list (module docstring).

    Args:
        model: a `BlipVQA`.
        question_states: (M, Lq, D) from `encode_question`.
        question_mask: (M, Lq).
        candidate_ids: (C, La) `[CLS]/[DEC] answer [SEP] [PAD]...`.
        candidate_mask: (C, La).
        k: candidates re-scored per question (at most C).
    """
    questions = question_states.shape[0]
    start = torch.full((questions, 1), model.dec_token_id, dtype=torch.long,
                       device=question_states.device)  # fmt: skip
    first_logits, _ = model.next_token_logits(start, question_states, question_mask)
    first_probs, topk = first_token_topk(first_logits, candidate_ids, k)
    rows = topk.flatten()
    ids, mask = candidate_ids.index_select(0, rows), candidate_mask.index_select(0, rows)
    logits = model.answer_logits(question_states, question_mask, ids, mask)
    best, scores = rescore_topk(logits, ids, topk, model.pad_token_id, model.label_smoothing)
    return RankResult(best, topk, first_probs, scores)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    question_states: torch.Tensor,
    eos_token_id: int,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
    stop_early: bool = True,
) -> list[torch.Tensor]:
    """Beam-search answers (token ids without `[DEC]` and `[SEP]`), one per question.

    Every question position is attended (padding included), as the reference generates; with
    `num_beams == 1` decoding is greedy.
    """
    questions = question_states.shape[0]
    mask = torch.ones(question_states.shape[:2], dtype=torch.long, device=question_states.device)
    beams = num_beams if num_beams > 1 else 1
    state: dict[str, Any] = {"states": question_states, "kv": None}

    def next_logits(seq: torch.Tensor) -> torch.Tensor:
        logits, state["kv"] = model.next_token_logits(seq, state["states"], mask, state["kv"],
                                                      beams)  # fmt: skip
        state["states"] = None
        return logits

    prompt = torch.full((1, 1), model.dec_token_id, dtype=torch.long, device=mask.device)
    method = "beam" if beams > 1 else "greedy"
    return decode(next_logits, prompt, questions, eos_token_id, model.pad_token_id, method,
                  max_length, min_length, beams, stop_early=stop_early)  # fmt: skip


def encode_candidates(tokenizer: Any, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate answer list tokenized (C, La), padded to its longest answer."""
    return tokenize_trimmed(tokenizer, list(answers), CANDIDATE_LENGTH)


class _Questions(Dataset):
    def __init__(self, records: Sequence[VqaRecord], indices: range, image_size: int) -> None:
        self.records, self.indices = records, indices
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        record = self.records[self.indices[i]]
        return self.transform(record.image), pre_question(record.question)


def _collate(batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in batch]), [question for _, question in batch]


@dataclass
class VqaResult:
    """Answers of a split, in record order, and the VQA accuracy when the records have answers.

    Attributes:
        question_ids: one per record.
        answers: the predicted answers.
        accuracy: mean VQA accuracy in [0, 1], or None for a split without answers.
    """

    question_ids: list[Any]
    answers: list[str]
    accuracy: float | None

    def records(self) -> list[dict[str, Any]]:
        """`[{"question_id", "answer"}]`, the official results format."""
        return [{"question_id": q, "answer": a} for q, a in zip(self.question_ids, self.answers)]

    def write(self, path: str | os.PathLike) -> Path:
        """Write :meth:`records` as JSON to `path` (parents created; written whole, then renamed,
        so an interrupted write leaves no half file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.records()) + "\n")
        partial.replace(path)
        return path


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[VqaRecord],
    inference: Inference = "rank",
    candidates: Sequence[str] | None = None,
    k: int = 128,
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
) -> list[str]:
    """Answer every record's question, split across ranks; identical on every rank.

    Collective when a process group is initialised: call it on every rank with the same records.

    Args:
        model: a `BlipVQA` (plain or FSDP2); evaluated in eval mode, its mode restored.
        tokenizer: the run's tokenizer.
        records: the questions (images opened here).
        inference: "rank" (needs `candidates`) or "generate".
        candidates: the candidate answer list ("rank").
        k: candidates re-scored per question ("rank").
        image_size: input side; default the model's.
        batch_size: questions per forward.
        num_workers: image-decoding worker processes.
        device: default the model's device.
        num_beams, max_length, min_length: beam search of "generate".

    Returns:
        One answer per record, in order.
    """
    if inference not in ("rank", "generate"):
        raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")
    if inference == "rank" and not candidates:
        raise ValueError("inference 'rank' needs a candidate answer list")
    rank, world = rank_and_world()
    weight = model.visual_encoder.patch_embed.proj.weight
    device = torch.device(device) if device is not None else weight.device
    image_size = image_size or model_image_size(model)
    local = shard_range(len(records), rank, world)
    loader = DataLoader(_Questions(records, local, image_size), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False, collate_fn=_collate)  # fmt: skip
    sharded = is_sharded(model)
    if inference == "rank":
        assert candidates is not None
        cand_ids, cand_mask = (t.to(device) for t in encode_candidates(tokenizer, candidates))
    dummy = (torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), ["?"])

    def answer(batch: tuple[torch.Tensor, list[str]]) -> list[str]:
        images, questions = batch
        ids, mask = tokenize_trimmed(tokenizer, questions, QUESTION_LENGTH)
        ids, mask = ids.to(device), mask.to(device)
        embeds = model.encode_image(normalize_images(images.to(device, non_blocking=True)))
        states = model.encode_question(embeds, ids, mask)
        if inference == "rank":
            best = rank_candidates(model, states, mask, cand_ids, cand_mask, k).best
            return [candidates[i] for i in best.tolist()]  # type: ignore[index]
        outs = generate_answers(model, states, tokenizer.sep_token_id, num_beams, max_length,
                                min_length, stop_early=not sharded)  # fmt: skip
        return [tokenizer.decode(out.tolist()).strip() for out in outs]

    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            answers: list[str] = []
            for _, out in run_balanced(loader, len(loader), answer, dummy, sharded):
                answers += out
    finally:
        model.train(was_training)
    if world == 1:
        return answers
    gathered: list[list[str] | None] = [None] * world
    dist.all_gather_object(gathered, answers)
    return [a for part in gathered for a in (part or [])]


def evaluate_vqa(
    model: nn.Module, tokenizer: Any, records: Sequence[VqaRecord], **kwargs: Any
) -> VqaResult:
    """Answer a split (:func:`answer_questions`, same keyword arguments) and score it when every
    record has answers; identical on every rank."""
    answers = answer_questions(model, tokenizer, records, **kwargs)
    scored = all(r.answers for r in records)
    accuracy = mean_vqa_accuracy(answers, [r.answers for r in records]) if scored else None
    return VqaResult([r.question_id for r in records], answers, accuracy)


__all__ = [
    "CANDIDATE_LENGTH",
    "RankResult",
    "VqaResult",
    "answer_questions",
    "encode_candidates",
    "evaluate_vqa",
    "generate_answers",
    "rank_candidates",
]
