"""Ranks and recall@K of image-text retrieval (the reference's `itm_eval`, vectorised).

Conventions (BLIP's): *text retrieval* (`txt_*`) = image queries ranking texts, a query is
correct at K when any of the image's captions is among the first K; *image retrieval* (`img_*`)
= text queries ranking images, correct when the caption's image is among the first K. Recalls are
percentages. Ties are broken by candidate index (a stable descending sort), so ranks are
deterministic.
"""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)


def positive_ranks(
    scores: torch.Tensor, positives: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of the best-ranked positive candidate of each query.

    Args:
        scores: (Q, C) scores, higher is better.
        positives: (Q, C) bool, True where the candidate is a correct answer for the query.
        chunk: queries sorted at once (bounds memory to chunk x C indices).

    Returns:
        (Q,) int64 ranks; C for a query without any positive candidate.

    Example:
        >>> positive_ranks(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[True, False, False]]))
        tensor([2])
    """
    if scores.shape != positives.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ"
        )
    num_candidates = scores.shape[1]
    out = []
    for start in range(0, scores.shape[0], chunk):
        block = scores[start : start + chunk]
        order = torch.argsort(block, dim=1, descending=True, stable=True)
        hits = positives[start : start + chunk].gather(1, order)
        found = hits.any(dim=1)
        first = hits.to(torch.uint8).argmax(dim=1)  # first True along the sorted order
        out.append(torch.where(found, first, torch.full_like(first, num_candidates)))
    if not out:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.cat(out).long()


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """Percentage of queries whose rank is below `k`."""
    if ranks.numel() == 0:
        return 0.0
    return 100.0 * (ranks < k).double().mean().item()


def median_rank(ranks: torch.Tensor) -> float:
    """Median 1-based rank (the reference's `mdR`: numpy's median, the mean of the two middle
    values for an even count).

    Example:
        >>> median_rank(torch.tensor([0, 3, 1, 9]))
        3.0
    """
    if ranks.numel() == 0:
        return 0.0
    ordered = torch.sort(ranks.double().flatten() + 1).values
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def retrieval_metrics(
    txt_ranks: torch.Tensor, img_ranks: torch.Tensor, prefix: str = ""
) -> dict[str, float]:
    """Recall@1/5/10 both ways and their means, with the reference's key names.

    Args:
        txt_ranks: (N_img,) rank of the first correct caption per image query.
        img_ranks: (N_txt,) rank of the correct image per text query.
        prefix: prepended to every key (`"itc_"` for the ITC-only numbers).

    Returns:
        `{txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean}`
        (prefixed), percentages.
    """
    out: dict[str, float] = {}
    for side, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        values = [recall_at(ranks, k) for k in RECALL_KS]
        for k, value in zip(RECALL_KS, values):
            out[f"{prefix}{side}_r{k}"] = value
        out[f"{prefix}{side}_r_mean"] = sum(values) / len(values)
    out[f"{prefix}r_mean"] = (out[f"{prefix}txt_r_mean"] + out[f"{prefix}img_r_mean"]) / 2
    return out


__all__ = ["RECALL_KS", "median_rank", "positive_ranks", "recall_at", "retrieval_metrics"]
