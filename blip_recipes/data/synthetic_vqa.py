"""Synthetic VQA data with learnable structure: shapes on a plain background, and questions
about their colour, shape, count and the background, answered from the picture.

Each image shows one group of 1-3 identical shapes (the synthetic captioning source's colours,
shapes and backgrounds), as large as fits, in the top or the bottom half. A question asks one of four things; its answer
comes from the image, so a model must look to answer (a question-only guesser gets the most
frequent answer of each question kind: about 1/6 for colour, 1/3 for the others).
`write_synthetic_vqa` writes images and VQA question files a fine-tuning run can read.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, _draw_shape

QUESTIONS = {
    "colour": "what colour are the shapes",
    "shape": "what shape are they",
    "count": "how many shapes are there",
    "background": "what colour is the background",
}
COUNT_WORDS = ("one", "two", "three")
ANSWERS = sorted({*COLOURS, *SHAPES, *COUNT_WORDS, *BACKGROUNDS})
"""Every answer a synthetic question can have (the candidate list)."""


def synthetic_vqa_sample(seed: int, index: int, size: int = 32) -> tuple[Image.Image, str, str]:
    """(image, question, answer) of sample `index`, a pure function of its arguments."""
    rng = random.Random(derive_seed(seed, index, 0x5A))
    background = rng.choice(list(BACKGROUNDS))
    colour = rng.choice([c for c in COLOURS if c != background])
    shape, count, band = rng.choice(SHAPES), rng.randrange(1, 4), rng.randrange(2)
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    band_h, cell_w = size / 2, size / count
    side = min(band_h, cell_w) * 0.9
    for k in range(count):
        cx, cy = cell_w * (k + 0.5), band_h * (band + 0.5)
        _draw_shape(draw, shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2),
                    COLOURS[colour])  # fmt: skip
    kind = rng.choice(list(QUESTIONS))
    answer = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count - 1],
              "background": background}[kind]  # fmt: skip
    return image, QUESTIONS[kind], answer


def write_synthetic_vqa(
    out_dir: str | Path, num_train: int, num_test: int, seed: int = 0, size: int = 32
) -> dict[str, Path]:
    """Write `images/`, `train.json`, `test.json` (VQA records, 10 answers each: 9 right, one
    random, as annotators disagree) and `answer_list.json` under `out_dir`.

    Returns:
        `{"train", "test", "answer_list", "image_root"}` paths.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for index in range(num_train + num_test):
        image, question, answer = synthetic_vqa_sample(seed, index, size)
        name = f"{index:06d}.png"
        image.save(out / "images" / name)
        noise = random.Random(derive_seed(seed, index, 0xA5)).choice(ANSWERS)
        split = "train" if index < num_train else "test"
        splits[split].append({"question_id": index, "image": name, "question": question,
                              "answer": [answer] * 9 + [noise]})  # fmt: skip
    paths = {"image_root": out / "images", "answer_list": out / "answer_list.json"}
    for split, records in splits.items():
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records))
    paths["answer_list"].write_text(json.dumps(ANSWERS))
    return paths


__all__ = ["ANSWERS", "QUESTIONS", "synthetic_vqa_sample", "write_synthetic_vqa"]
