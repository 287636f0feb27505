"""Generated NLVR2-style data with learnable structure, for the NLVR tests.

Every image is a plain black or white square (with a little pixel noise). A sentence names one
background colour, "black background and black background" or the same with white; its label is
True iff both images of the pair have that background. Labels are balanced (half True; the False
pairs spread over the three other combinations), so chance accuracy is 50 %.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"black": 15, "white": 245}


def _image(colour: str, rng: random.Random, size: int) -> Image.Image:
    base = COLOURS[colour]
    noise = bytes(max(0, min(255, base + rng.randint(-10, 10))) for _ in range(size * size * 3))
    return Image.frombytes("RGB", (size, size), noise)


def write_nlvr_split(root: Path, split: str, count: int, seed: int, size: int = 32) -> Path:
    """`root/<split>.json` with `count` records and their images under `root/<split>/`."""
    rng = random.Random(seed)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    others = {"black": "white", "white": "black"}
    records = []
    for i in range(count):
        colour = rng.choice(sorted(COLOURS))
        label = i % 2 == 0
        if label:
            pair = (colour, colour)
        else:
            pair = rng.choice([(colour, others[colour]), (others[colour], colour),
                               (others[colour], others[colour])])  # fmt: skip
        names = []
        for side, c in zip("ab", pair):
            name = f"{split}/{i:05d}_{side}.png"
            _image(c, rng, size).save(root / name)
            names.append(name)
        records.append({"images": names, "sentence": f"{colour} background and {colour} background",
                        "label": "True" if label else "False"})  # fmt: skip
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    return path
