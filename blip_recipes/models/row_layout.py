"""Row layouts of a multimodal MED pass: which text rows attend which image, which are decoder
(causal) rows, and the split of rows in layout order into encoder and decoder rows and back.

A layout is data, so one pass can mix the kinds of rows: the pretraining step packs ITM and
captioning into one pass (see :class:`RowLayout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


def cat_if_many(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` of ``tensors`` along ``dim``; a lone tensor is returned as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


class RowGroup(NamedTuple):
    """Text rows per image in one image group: `encoder` bidirectional rows, then `decoder`
    causal rows."""

    encoder: int
    decoder: int

    @property
    def rows(self) -> int:
        return self.encoder + self.decoder


@dataclass(frozen=True)
class RowLayout:
    """Which text rows of a multimodal pass attend which image, and which are decoder rows.

    The images come in `len(groups)` groups of M images each, concatenated group by group
    ((G * M, N, D_vision)). The text rows come group by group too; inside group g they are
    image-major: image m of the group owns rows `m * k_g ... m * k_g + k_g - 1` (k_g =
    `groups[g].rows`), its encoder rows first. Because cross-attention queries do not interact,
    all k_g rows of an image attend its keys/values as one (k_g * L)-token query sequence: the
    image tokens are projected to keys/values once per image, and no row is gathered.

    The pretraining step packs ITM and captioning into one pass with two groups over B images:
    `((2, 1), (1, 0))` = per image (ITM positive, ITM negative text, decoder) against the batch's
    images, then (ITM negative image) against the hard-negative images (their keys/values
    selected from the batch's, `select_kv`).
    """

    groups: tuple[RowGroup, ...]

    @classmethod
    def of(cls, *groups: tuple[int, int]) -> RowLayout:
        """`RowLayout.of((encoder_rows, decoder_rows), ...)` per image group."""
        return cls(tuple(RowGroup(*g) for g in groups))

    @property
    def encoder_only(self) -> bool:
        return all(g.decoder == 0 for g in self.groups)

    @property
    def decoder_only(self) -> bool:
        return all(g.encoder == 0 for g in self.groups)

    def rows_per_image(self) -> int:
        """Text rows per image summed over groups (rows = M * this)."""
        return sum(g.rows for g in self.groups)

    def split(self, x: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in layout order (R, ...) -> (encoder rows (R_e, ...), decoder rows (R_d, ...)).

        Views (no copy) when the layout has one kind of row only.
        """
        if self.encoder_only:
            return x, x[:0]
        if self.decoder_only:
            return x[:0], x
        encoder, decoder, offset = [], [], 0
        for group in self.groups:
            block = x[offset : offset + images * group.rows].unflatten(0, (images, group.rows))
            offset += images * group.rows
            if group.encoder:
                encoder.append(block[:, : group.encoder].flatten(0, 1))
            if group.decoder:
                decoder.append(block[:, group.encoder :].flatten(0, 1))
        return cat_if_many(encoder), cat_if_many(decoder)

    def merge(self, encoder: torch.Tensor, decoder: torch.Tensor, images: int) -> torch.Tensor:
        """Inverse of `split`: encoder and decoder rows -> rows in layout order."""
        if self.encoder_only:
            return encoder
        if self.decoder_only:
            return decoder
        parts, enc_at, dec_at = [], 0, 0
        for group in self.groups:
            pieces = []
            if group.encoder:
                size = images * group.encoder
                pieces.append(encoder[enc_at : enc_at + size].unflatten(0, (images, -1)))
                enc_at += size
            if group.decoder:
                size = images * group.decoder
                pieces.append(decoder[dec_at : dec_at + size].unflatten(0, (images, -1)))
                dec_at += size
            parts.append(cat_if_many(pieces, dim=1).flatten(0, 1))
        return cat_if_many(parts)


ENCODER_ROWS = RowLayout.of((1, 0))
"""One bidirectional row per image (ITM scoring, the transformers `multimodal` pass)."""
DECODER_ROWS = RowLayout.of((0, 1))
"""One causal row per image (captioning)."""


__all__ = ["DECODER_ROWS", "ENCODER_ROWS", "RowGroup", "RowLayout", "cat_if_many"]
