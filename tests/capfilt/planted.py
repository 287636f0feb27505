"""A planted CapFilt corpus: solid-colour images whose web captions name their colour (matching
pairs) or another image's colour (swapped pairs), with a captioner and a filter that know the
colours, so tests check the mechanics exactly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip_recipes.capfilt import TextScores

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 30, 170),
    "orange": (250, 140, 20),
}
NAMES = list(COLOURS)
MATCH, MISMATCH = 0.75, 0.25  # exact in float32


def colour_of(image: torch.Tensor) -> str:
    """The planted colour nearest to the mean of a uint8 (3, S, S) image."""
    mean = image.float().mean(dim=(1, 2))
    table = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    return NAMES[int(((table - mean) ** 2).sum(-1).argmin())]


def write_image(path: Path, colour: str, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.int16)
    arr = np.clip(base + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def planted_corpus(root: Path, n: int = 12) -> list[dict]:
    """``n`` images under ``root/images``: even ones captioned with their colour (matching), odd
    ones with the next colour (swapped). Returns the records; also writes ``root/web.json``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = NAMES[i % len(NAMES)]
        write_image(root / "images" / f"{i:03d}.png", colour, seed=i)
        named = colour if i % 2 == 0 else NAMES[(i + 1) % len(NAMES)]
        records.append({"image": f"{i:03d}.png", "caption": f"A {named} square."})
    (root / "web.json").write_text(json.dumps(records))
    return records


class PlantedScorer:
    """ITM 0.75 when the text names the image's colour, else 0.25; ITC a per-text score (its word
    count / 10) so that top-k by ITC has a known order."""

    image_size = 16

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(
        self, images: torch.Tensor, texts: Sequence[str], image_rows: torch.Tensor
    ) -> TextScores:
        self.calls.append(images.shape[0])
        itm, itc = [], []
        for text, row in zip(texts, image_rows.tolist()):
            itm.append(MATCH if colour_of(images[row]) in text.lower().split() else MISMATCH)
            itc.append(len(text.split()) / 10)
        return TextScores(torch.tensor(itm), torch.tensor(itc))


class PlantedCaptioner:
    """For each image: caption n is right ("a COLOUR thing" padded with n extra words, so later
    captions have a higher ITC) when ``right[n]``, else names another colour. Records the seeds."""

    image_size = 24

    def __init__(self, right: Sequence[bool] = (True,)) -> None:
        self.right = list(right)
        self.seeds: list[int] = []

    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> list[list[str]]:
        self.seeds += list(seeds)
        out = []
        for image in images:
            colour = colour_of(image)
            other = NAMES[(NAMES.index(colour) + 3) % len(NAMES)]
            out.append([f"a {colour if ok else other} thing" + " here" * n
                        for n, ok in enumerate(self.right)])  # fmt: skip
        return out


def planted_shards(root: Path, shards: int = 2, per_shard: int = 6) -> list[str]:
    """The planted corpus as tar shards ``root/web-{000..}.tar`` (``KEY.png`` + ``KEY.txt``; even
    samples matching, odd ones swapped). Returns the shard paths."""
    from blip_recipes.data.tar_format import write_shard

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            colour = NAMES[i % len(NAMES)]
            write_image(root / "tmp.png", colour, seed=i)
            named = colour if i % 2 == 0 else NAMES[(i + 1) % len(NAMES)]
            data = (root / "tmp.png").read_bytes()
            samples.append((f"{i:05d}", data, "png", f"A {named} square."))
        path = root / f"web-{s:03d}.tar"
        write_shard(str(path), samples)
        paths.append(str(path))
    (root / "tmp.png").unlink()
    return paths
