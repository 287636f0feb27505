"""NLVR2-style data: a sentence about a pair of images and whether it is true of them.

Annotation files are JSON lists (or JSONL) of records
``{"images": [left, right], "sentence": str, "label": "True" | "False" | true | false | 1 | 0}``
with image paths relative to an image root (the reference's `nlvr_{train,dev,test}.json`).

Training samples follow the reference's augmentation: the sentence is cleaned with
`pre_caption` (up to `data.max_words` words, 40 in the NLVR config); with probability 1/2 the
two images trade places, and when they do and the sentence names a side, every "left" becomes
"right" and back, so that the sentence still describes the pair. Each image gets the training
transform with its own draws.

The training loader is `TrainLoader`'s (same order over global positions, same bad-sample
replacement, same exact resume); only its batch maker differs: batches are
``{"images": uint8 (2B, 3, s, s) (the B left images, then the B right ones), "input_ids",
"attention_mask" (B, L), "labels" int64 (B,)}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.loader import TrainLoader
from blip_recipes.data.nodes import SampleTask, build_pipeline, stack
from blip_recipes.data.samples import (
    MAX_REPLACEMENTS,
    BadSampleError,
    BatchContext,
    EpochPlan,
    bad_record,
    describe_bad,
)
from blip_recipes.data.sources import AnnotationError
from blip_recipes.data.transforms import BadImage, EvalTransform, TrainTransform, open_image

_TRUE = ("true", "1")
_FALSE = ("false", "0")


@dataclass(frozen=True)
class NlvrExample:
    """One annotation record: two image paths (resolved), the raw sentence, label 1 = true."""

    images: tuple[str, str]
    sentence: str
    label: int


def _label(value: object, where: str) -> int:
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise AnnotationError(f"{where}: 'label' must be True or False, got {value!r}")


def load_nlvr_annotations(path: str | Path, image_root: str = "") -> list[NlvrExample]:
    """Read an NLVR2-style annotation file (module docstring).

    Raises:
        AnnotationError: naming the file, the record and what was expected.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    text = path.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: neither a JSON list nor JSONL ({e})") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records, got {type(records).__name__}")
    root = Path(image_root) if image_root else None
    examples = []
    for index, record in enumerate(records):
        where = f"{path} record {index}"
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected an object, got {type(record).__name__}")
        images = record.get("images")
        if not isinstance(images, list) or len(images) != 2:
            raise AnnotationError(f"{where}: 'images' must be a list of two paths, got {images!r}")
        sentence = record.get("sentence")
        if not isinstance(sentence, str) or not sentence.strip():
            raise AnnotationError(f"{where}: 'sentence' must be a non-empty string")
        if "label" not in record:
            raise AnnotationError(f"{where}: no 'label' (True or False)")
        resolved = tuple(str(root / p) if root is not None else str(p) for p in images)
        examples.append(NlvrExample(resolved, sentence, _label(record["label"], where)))  # type: ignore[arg-type]
    if not examples:
        raise AnnotationError(f"{path}: holds no records")
    return examples


def swap_sides(sentence: str) -> str:
    """Every word "left" becomes "right" and back (words split on single spaces)."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in sentence.split(" "))


def augment_pair(
    left: object, right: object, sentence: str, rng: random.Random
) -> tuple[object, object, str]:
    """The reference's pair augmentation: with probability 1/2 swap the images, and then also
    the sides the (cleaned) sentence names."""
    if rng.random() < 0.5:
        return left, right, sentence
    words = sentence.split(" ")
    if "left" in words or "right" in words:
        sentence = swap_sides(sentence)
    return right, left, sentence


class NlvrSource:
    """A map-style source of `NlvrExample`s for the training loader's epoch plan."""

    def __init__(self, examples: list[NlvrExample], name: str) -> None:
        self.examples = examples
        self.name = name
        self.num_images = len(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def image_id(self, index: int) -> int:
        return index


def load_pair_sample(example: NlvrExample, rng: random.Random, ctx: BatchContext):
    """(left uint8 (3, s, s), right, cleaned and augmented sentence, label) of one example."""
    sentence = pre_caption(example.sentence, ctx.max_words)
    if not sentence:
        raise BadImage("empty sentence after cleaning")
    left, right, sentence = augment_pair(*example.images, sentence, rng)
    return ctx.transform(open_image(left), rng), ctx.transform(open_image(right), rng), sentence


class PairBatchMaker:
    """The loader's map function for NLVR: one step's sample tasks -> this rank's pair batch.

    A bad sample (an unreadable image of the pair) is replaced as in `load_map_samples`: by the
    sample at a position drawn from (seed, epoch, position, attempt).
    """

    def __init__(self, plan: EpochPlan, ctx: BatchContext) -> None:
        self.plan, self.ctx = plan, ctx

    def __call__(self, tasks: list[SampleTask]) -> dict:
        epoch, position = tasks[0].epoch, tasks[0].step_position
        return self.make_batch(epoch, position, [t.position for t in tasks])

    def make_batch(self, epoch: int, position: int, positions: list[int]) -> dict:
        ctx, plan = self.ctx, self.plan
        order = plan.order(epoch)
        lefts, rights, sentences, labels, bad = [], [], [], [], []
        for pos in positions:
            sample_pos = pos
            for attempt in range(MAX_REPLACEMENTS + 1):
                rng = random.Random(derive_seed(ctx.seed, epoch, pos, attempt))
                source, index = plan.locate(int(order[sample_pos]))
                example = source.examples[index]
                try:
                    left, right, sentence = load_pair_sample(example, rng, ctx)
                    break
                except BadImage as e:
                    where = f"{source.name}[{index}]"
                    bad.append(bad_record(e, where, source.name, epoch, position=sample_pos))
                    sample_pos = derive_seed(ctx.seed, epoch, pos, attempt, 0xBAD) % plan.length
            else:
                raise BadSampleError(
                    f"{MAX_REPLACEMENTS} replacements in a row were bad samples; last: "
                    f"{describe_bad(bad[-1])}"
                )
            lefts.append(left)
            rights.append(right)
            sentences.append(sentence)
            labels.append(example.label)
        input_ids, attention_mask = ctx.tokenizer(sentences)
        return {
            "images": stack(lefts + rights),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "_epoch": epoch,
            "_position": position,
            "_bad": len(bad),
            "_bad_samples": bad,
        }


class NlvrTrainLoader(TrainLoader):
    """`TrainLoader` over NLVR examples: same order, state and resume; pair batches."""

    def _make_iterator(self):
        from blip_recipes.data.nodes import SamplePositions

        ctx = self.ctx
        positions = SamplePositions(
            self.plan.advance, ctx.batch_size, ctx.rank, ctx.world_size, self.epoch, self.position
        )
        return build_pipeline(
            positions,
            PairBatchMaker(self.plan, ctx),
            batch_size=ctx.batch_size,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            pin_memory=self.cfg.pin_memory,
            watchdog=self._watchdog(),
        )


def build_nlvr_train_loader(
    data_cfg,
    tokenizer,
    annotation: str,
    image_root: str,
    image_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> NlvrTrainLoader:
    """The NLVR training loader of this rank (`data.*` settings: batch size, workers, crop
    scale, RandAugment, max_words; `data.sources` is not used)."""
    transform = TrainTransform(
        image_size,
        min_scale=data_cfg.min_scale,
        randaugment=data_cfg.randaugment,
        use_draft=data_cfg.jpeg_draft,
        max_aspect_ratio=data_cfg.max_aspect_ratio,
        min_image_size=data_cfg.min_image_size,
    )
    ctx = BatchContext(tokenizer, transform, data_cfg.max_words, data_cfg.batch_size, rank,
                       world_size, seed)  # fmt: skip
    source = NlvrSource(load_nlvr_annotations(annotation, image_root), Path(annotation).name)
    plan = EpochPlan([source], [1.0], seed)  # type: ignore[list-item]
    return NlvrTrainLoader(plan, ctx, data_cfg)


class NlvrEvalPairs(Dataset):
    """Evaluation pairs `examples[i]` for i in `indices`: (uint8 (2, 3, s, s), cleaned
    sentence, label), no augmentation (resize to s x s)."""

    def __init__(
        self, examples: list[NlvrExample], indices: range, image_size: int, max_words: int
    ) -> None:
        self.examples, self.indices = examples, indices
        self.transform = EvalTransform(image_size)
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        example = self.examples[self.indices[i]]
        pair = torch.stack([self.transform(path) for path in example.images])
        return pair, pre_caption(example.sentence, self.max_words), example.label


__all__ = [
    "NlvrEvalPairs",
    "NlvrExample",
    "NlvrTrainLoader",
    "augment_pair",
    "build_nlvr_train_loader",
    "load_nlvr_annotations",
    "swap_sides",
]
