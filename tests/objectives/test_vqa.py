"""The VQA loss and the ranking scores against loops written out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip_recipes.evaluation.vqa import rank_candidates
from blip_recipes.objectives.vqa import (
    answer_token_losses,
    first_token_topk,
    rescore_topk,
    weighted_answer_loss,
)
from tests.models.tiny_vqa import DEC_ID, make_tokens, make_vqa


def test_weighted_loss_is_weighted_sum_of_summed_smoothed_ce_over_questions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen)
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0], [1, 3, 4, 8, 2]])
    weights = torch.tensor([0.6, 0.4, 0.2])
    expected = 0.0
    for row in range(3):
        targets = ids[row, 1:]
        keep = targets != 0
        ce = F.cross_entropy(logits[row][keep], targets[keep], label_smoothing=0.1,
                             reduction="sum")  # fmt: skip
        expected += weights[row] * ce
    loss = weighted_answer_loss(logits, ids, weights, num_questions=2, pad_token_id=0)
    assert torch.allclose(loss, expected / 2, atol=1e-6)
    per_answer = answer_token_losses(logits, ids, 0, 0.0)
    nll = -logits[1].log_softmax(-1)[torch.arange(2), ids[1, 1:3]].sum()
    assert torch.allclose(per_answer[1], nll, atol=1e-6)


def test_first_token_topk_reads_each_candidates_first_token():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    candidates = torch.tensor([[9, 0, 5], [9, 3, 5], [9, 1, 2]])  # first tokens 0, 3, 1
    probs, index = first_token_topk(logits, candidates, k=2)
    assert index.tolist() == [[1, 2], [0, 2]]
    assert torch.allclose(probs, torch.tensor([[0.4, 0.2], [0.4, 0.3]]))
    assert first_token_topk(logits, candidates, k=10)[1].shape == (2, 3)  # k capped at C


def test_rescore_picks_the_highest_scoring_of_the_k():
    logits = torch.zeros(4, 1, 3)
    logits[1, 0, 2] = 5.0  # question 0, its 2nd candidate predicts its target token 2
    logits[2, 0, 2] = 5.0  # question 1, its 1st candidate
    ids = torch.tensor([[1, 2]] * 4)
    topk = torch.tensor([[7, 4], [3, 8]])
    best, scores = rescore_topk(logits, ids, topk, pad_token_id=0)
    assert best.tolist() == [4, 3]
    assert scores.shape == (2, 2) and scores[0, 1] > scores[0, 0]


def test_rank_with_all_candidates_is_the_best_full_score():
    model = make_vqa(seed=5, noise=0.3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q_ids, q_mask = make_tokens(2, 7, seed=2)
    cand_ids, cand_mask = make_tokens(6, 4, seed=3)
    with torch.no_grad():
        states = model.encode_question(model.encode_image(images), q_ids, q_mask)
        result = rank_candidates(model, states, q_mask, cand_ids, cand_mask, k=6)
        two = rank_candidates(model, states, q_mask, cand_ids, cand_mask, k=2)
        rows = torch.arange(2).repeat_interleave(6)
        logits = model.answer_logits(states, q_mask, cand_ids.repeat(2, 1),
                                     cand_mask.repeat(2, 1), question_rows=rows)  # fmt: skip
    full = -answer_token_losses(logits, cand_ids.repeat(2, 1), 0, 0.1).view(2, 6)
    assert result.best.tolist() == full.argmax(1).tolist()
    assert torch.allclose(result.scores, full.gather(1, result.topk), atol=1e-5)
    # k = 2 re-scores only the two most probable first tokens
    first, _ = model.next_token_logits(torch.full((2, 1), DEC_ID), states, q_mask)
    probs = first.softmax(-1)[:, cand_ids[:, 1]]
    assert two.topk.tolist() == probs.topk(2, dim=1).indices.tolist()
    assert all(b in row for b, row in zip(two.best.tolist(), two.topk.tolist()))
