"""Benchmark inputs: loader-shaped batches already on the device, and a BERT-sized vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_LENGTH = 30
"""Caption length in tokens (the reference's max_length; the FLOP table assumes it)."""
BERT_VOCAB_SIZE = 30522
"""bert-base-uncased vocab.txt entries; [DEC] and [ENC] bring the model's vocabulary to 30524."""


def write_bert_layout_vocab(folder: str | Path) -> Path:
    """A ``vocab.txt`` with bert-base-uncased's size and special-token ids ([PAD]=0, [UNK]=100,
    [CLS]=101, [SEP]=102, [MASK]=103), so base/large run the real 30524-row vocabulary and LM
    head without a downloaded tokenizer. Only the ids matter to a throughput benchmark."""
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = [
        special.get(i, f"[unused{i}]" if i < 1000 else f"tok{i}") for i in range(BERT_VOCAB_SIZE)
    ]
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return path


def synthetic_batches(
    batch_size: int,
    image_size: int,
    vocab_size: int,
    special_ids: dict[str, int],
    device: torch.device,
    count: int = 4,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``count`` loader-shaped batches already on ``device``: uint8 images, ``[CLS] w.. [SEP]
    [PAD]..`` ids of random length (8..30 tokens, like web captions), matching masks."""
    g = torch.Generator().manual_seed(seed)
    low = max(special_ids.values()) + 1 if max(special_ids.values()) < 1000 else 1000
    high = vocab_size - 2  # [DEC] and [ENC] are the last two ids
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g,
                               dtype=torch.uint8)  # fmt: skip
        lengths = torch.randint(8, TEXT_LENGTH + 1, (batch_size,), generator=g)
        ids = torch.randint(low, high, (batch_size, TEXT_LENGTH), generator=g)
        positions = torch.arange(TEXT_LENGTH).expand(batch_size, -1)
        mask = (positions < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, special_ids["pad"]))
        ids[:, 0] = special_ids["cls"]
        ids.scatter_(1, (lengths - 1)[:, None], special_ids["sep"])
        batches.append(
            {
                "images": images.to(device),
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
            }  # fmt: skip
        )
    return batches
