"""A synthetic image-caption source with learnable structure, generated from (seed, index).

Each image shows one or two groups of identical coloured shapes (circles, squares, triangles),
each group in a horizontal band (top / middle / bottom), on a plain background; the caption says
what is where, e.g. ``"two red circles at the top and a blue square at the bottom on a black
background"``. Positions are vertical only, so horizontal flips keep captions true. Colours, shapes,
counts and bands are what a tiny model can learn to match (ITC/ITM) and describe (LM) within a
minute of CPU training. Shapes fill most of their cell (0.8-0.95 of the band height or of their
share of the width): at 64 px each is about one 16 px patch, so a colour is there to be matched
early; a tiny model's ITM learns to check colours before shapes, counts and bands. Drawing a
128 px image with Pillow takes well under a millisecond.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from blip_recipes.data._seeding import derive_seed

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("a", "two", "three")
BANDS = ("top", "middle", "bottom")
TEMPLATES = ("{objects} on a {background} background", "a picture of {objects} on {background}")

#: Every word a synthetic caption can contain (the synthetic tokenizer's vocabulary).
WORDS: tuple[str, ...] = tuple(
    sorted(
        set(COLOURS)
        | set(BACKGROUNDS)
        | set(SHAPES)
        | {s + "s" for s in SHAPES}
        | set(COUNTS)
        | set(BANDS)
        | {"at", "the", "and", "on", "background", "picture", "of"}
    )
)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def synthetic_sample(seed: int, index: int, size: int = 128) -> tuple[Image.Image, str]:
    """The image and caption of synthetic sample ``index`` (pure function of its arguments).

    Returns:
        (RGB image of ``size`` x ``size``, caption text)
    """
    rng = random.Random(derive_seed(seed, index, 0x5EED))
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    n_groups = rng.choice((1, 1, 2))
    bands = rng.sample(range(len(BANDS)), n_groups)
    bands.sort()
    colours = rng.sample(list(COLOURS), n_groups)
    phrases = []
    band_h = size / 3
    for band, colour in zip(bands, colours):
        shape = rng.choice(SHAPES)
        count = rng.randrange(1, 4)
        cell_w = size / count
        side = min(band_h, cell_w) * rng.uniform(0.8, 0.95)
        for k in range(count):
            cx = cell_w * (k + 0.5) + rng.uniform(-0.1, 0.1) * cell_w
            cy = band_h * (band + 0.5) + rng.uniform(-0.08, 0.08) * band_h
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            _draw_shape(draw, shape, box, COLOURS[colour])
        noun = shape if count == 1 else shape + "s"
        phrases.append(f"{COUNTS[count - 1]} {colour} {noun} at the {BANDS[band]}")
    template = rng.choice(TEMPLATES)
    caption = template.format(objects=" and ".join(phrases), background=background)
    return image, caption


class SyntheticSource:
    """Map-style source of ``num_samples`` synthetic samples.

    Args:
        num_samples: size of the source.
        seed: data seed; sample ``i`` is ``synthetic_sample(seed, i, image_size)``.
        image_size: side of the generated images in pixels.
    """

    def __init__(self, num_samples: int, seed: int, image_size: int = 128) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.image_size = image_size
        self.name = f"synthetic[{num_samples}]"

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_images(self) -> int:
        return self.num_samples

    def image_id(self, index: int) -> int:
        """Every synthetic sample is an image of its own: the id is the index."""
        return index

    def get(self, index: int, rng: random.Random):
        """Return ``(image, caption, origin)`` for ``index``; ``rng`` is unused (captions are fixed)."""
        image, caption = synthetic_sample(self.seed, index, self.image_size)
        return image, caption, f"synthetic:{index}"
