"""Ranks and recall@K on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_recipes.evaluation import positive_ranks, recall_at, retrieval_metrics


def test_positive_ranks_known_cases():
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.3],  # positive at col 2 -> rank 1
        [0.2, 0.8, 0.7, 0.1],  # positives cols 2, 3 -> best rank 1 (col 2)
        [0.4, 0.4, 0.4, 0.4],  # all tied, positive col 3 -> rank 3 (ties by index)
        [0.1, 0.2, 0.3, 0.4],  # no positive -> 4 (number of candidates)
    ])  # fmt: skip
    positives = torch.tensor([
        [False, False, True, False],
        [False, False, True, True],
        [False, False, False, True],
        [False, False, False, False],
    ])  # fmt: skip
    assert positive_ranks(scores, positives).tolist() == [1, 1, 3, 4]
    assert positive_ranks(scores, positives, chunk=1).tolist() == [1, 1, 3, 4]


def _reference_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's `itm_eval` (train_retrieval.py), with a stable sort for deterministic ties."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(-score, kind="stable")
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(-score, kind="stable")
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr, ir


def test_recalls_match_reference_itm_eval_on_random_scores():
    rng = np.random.default_rng(0)
    n_img, per = 30, 5
    txt2img = [i // per for i in range(n_img * per)]
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    sims = rng.normal(size=(n_img, n_img * per)) + 3.0 * (
        np.arange(n_img)[:, None] == np.array(txt2img)[None, :]
    )
    sims += rng.normal(size=sims.shape) * 2
    i2t = torch.tensor(sims)
    t2i = torch.tensor(sims.T.copy())
    pos_i2t = torch.tensor(np.array(txt2img))[None, :] == torch.arange(n_img)[:, None]
    pos_t2i = torch.arange(n_img)[None, :] == torch.tensor(txt2img)[:, None]
    metrics = retrieval_metrics(positive_ranks(i2t, pos_i2t), positive_ranks(t2i, pos_t2i))
    tr, ir = _reference_itm_eval(sims, sims.T, txt2img, img2txt)
    for k, value in zip((1, 5, 10), tr):
        assert metrics[f"txt_r{k}"] == pytest.approx(value)
    for k, value in zip((1, 5, 10), ir):
        assert metrics[f"img_r{k}"] == pytest.approx(value)
    assert metrics["txt_r_mean"] == pytest.approx(sum(tr) / 3)
    assert metrics["r_mean"] == pytest.approx((sum(tr) / 3 + sum(ir) / 3) / 2)
    assert 0 < metrics["txt_r1"] < metrics["txt_r10"] < 100


def test_retrieval_metrics_keys_and_values_from_known_ranks():
    txt_ranks = torch.tensor([0, 3, 7, 12])  # R@1 25, R@5 50, R@10 75
    img_ranks = torch.tensor([0, 0, 4, 9, 10])  # R@1 40, R@5 60, R@10 80
    m = retrieval_metrics(txt_ranks, img_ranks, prefix="itc_")
    assert m == pytest.approx({
        "itc_txt_r1": 25.0, "itc_txt_r5": 50.0, "itc_txt_r10": 75.0, "itc_txt_r_mean": 50.0,
        "itc_img_r1": 40.0, "itc_img_r5": 60.0, "itc_img_r10": 80.0, "itc_img_r_mean": 60.0,
        "itc_r_mean": 55.0,
    })  # fmt: skip
    assert recall_at(torch.tensor([], dtype=torch.long), 1) == 0.0


def test_stable_topk_chunks_and_ties():
    from blip_recipes.evaluation.retrieval import _stable_topk

    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.3], [1.0, 0.0, 0.5, 0.5]])
    expected = [[1, 0, 2], [3, 0, 1], [0, 2, 3]]
    assert _stable_topk(scores, 3).tolist() == expected
    assert _stable_topk(scores, 3, chunk=2).tolist() == expected
