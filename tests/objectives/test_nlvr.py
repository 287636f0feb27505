import math

import torch

from blip_recipes.objectives import nlvr


def test_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    by_hand = (
        -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e)) - math.log(0.5)
    ) / 3
    assert abs(nlvr.nlvr_loss(logits, labels).item() - by_hand) < 1e-6
    assert nlvr.predictions(logits).tolist() == [0, 1, 0]  # a tie goes to 0
    assert nlvr.correct(logits, labels).item() == 1
    assert abs(nlvr.accuracy(logits, labels).item() - 1 / 3) < 1e-7
