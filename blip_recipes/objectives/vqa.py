"""The VQA objective and the scores candidate ranking uses, as pure functions of logits.

Training (the reference's `BLIP_VQA.forward(train=True)`): each question has n >= 1 distinct
answers with weights (VQAv2: the share of the 10 annotators who gave that answer; a single-answer
source such as Visual Genome QA: 0.2). Every answer is decoded teacher-forced after its own copy
of the question's states; its loss is the label-smoothed (0.1) cross-entropy SUMMED over its
tokens (`[SEP]` included, padding excluded); the batch loss is `sum_a weight_a * loss_a / B`
with B the number of questions (not answers, not tokens).

Ranking (the reference's `rank_answer`): a candidate answer list is scored in two stages, (1)
the probability of each candidate's first token after `[DEC]` (one decoder step per question),
top k kept; (2) each of the k candidates decoded whole and scored by minus its label-smoothed
summed cross-entropy, as the reference does (its `-loss` with smoothing 0.1, so not exactly the
log-likelihood); the best of the k wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip_recipes.models.inputs import LM_IGNORE_INDEX, lm_labels


def answer_token_losses(
    logits: torch.Tensor, answer_ids: torch.Tensor, pad_token_id: int, label_smoothing: float
) -> torch.Tensor:
    """Per-answer summed label-smoothed cross-entropy.

    Args:
        logits: (R, La - 1, V), [r, t] predicts token t + 1 of answer r, or flat
            (R * (La - 1), V) as `answer_logits` returns them.
        answer_ids: (R, La) `[DEC]/[CLS] answer [SEP] [PAD]...` (column 0 is never a target).
        pad_token_id: ignored targets.
        label_smoothing: 0.1 in the reference.

    Returns:
        (R,) fp32, each row's sum over its target tokens.
    """
    targets = lm_labels(answer_ids, pad_token_id)[:, 1:]
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.flatten(),
        ignore_index=LM_IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return per_token.view(targets.shape).sum(dim=1)


def weighted_answer_loss(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    weights: torch.Tensor,
    num_questions: int,
    pad_token_id: int,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """The VQA training loss: `sum_a weights[a] * loss_a / num_questions` (module docstring).

    Args:
        logits: (R, La - 1, V) or flat (R * (La - 1), V) teacher-forced logits of the R answers.
        answer_ids: (R, La) answer token ids.
        weights: (R,) answer weights.
        num_questions: B, the questions (images) of this rank's batch.
        pad_token_id: padding id.
        label_smoothing: 0.1 in the reference.

    Returns:
        0-d fp32.
    """
    losses = answer_token_losses(logits, answer_ids, pad_token_id, label_smoothing)
    return (weights.float() * losses).sum() / num_questions


def first_token_topk(
    first_logits: torch.Tensor, candidate_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of ranking: the k candidates whose first token is most probable after `[DEC]`.

    Args:
        first_logits: (M, V) decoder logits after `[DEC]`, one row per question.
        candidate_ids: (C, La) candidate answers, `[DEC] first-token ...`.
        k: candidates kept per question (at most C).

    Returns:
        `(probs (M, k), indices (M, k))`: first-token probabilities and candidate indices,
        most probable first.
    """
    probs = first_logits.float().softmax(dim=-1).index_select(1, candidate_ids[:, 1])
    return probs.topk(min(k, candidate_ids.shape[0]), dim=1)


def rescore_topk(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    topk_indices: torch.Tensor,
    pad_token_id: int,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 of ranking: score the k candidates of each question whole, keep the best.

    Args:
        logits: (M * k, La - 1, V) or flat teacher-forced logits of the candidates,
            question-major.
        answer_ids: (M * k, La) those candidates' ids.
        topk_indices: (M, k) their indices in the candidate list.
        pad_token_id: padding id.
        label_smoothing: the reference re-scores with its training smoothing (0.1).

    Returns:
        `(best (M,) candidate indices, scores (M, k))`, scores = minus the summed smoothed
        cross-entropy of each candidate.
    """
    scores = -answer_token_losses(logits, answer_ids, pad_token_id, label_smoothing)
    scores = scores.view(topk_indices.shape)
    best = topk_indices.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    return best, scores


__all__ = ["answer_token_losses", "first_token_topk", "rescore_topk", "weighted_answer_loss"]
