"""Row layouts of the packed multimodal pass: split into encoder / decoder rows and back."""

from __future__ import annotations

import torch

from blip_recipes.models.row_layout import ENCODER_ROWS, RowLayout


def test_row_layout_split_and_merge_are_inverse():
    layout = RowLayout.of((2, 1), (1, 0))  # the pretraining layout over 3 images
    rows = torch.arange(12)
    encoder, decoder = layout.split(rows, images=3)
    assert encoder.tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 11]
    assert decoder.tolist() == [2, 5, 8]
    assert torch.equal(layout.merge(encoder, decoder, images=3), rows)
    assert layout.rows_per_image() == 4
    same, none = ENCODER_ROWS.split(rows, images=12)
    assert same.data_ptr() == rows.data_ptr() and none.numel() == 0  # one kind: a view
