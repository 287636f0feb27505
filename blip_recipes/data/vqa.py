"""VQA data: VQAv2 / OK-VQA-style JSON question files, the training source and its batches.

A question file is a JSON list (or JSON Lines, `.jsonl`) of records

    {"question_id": 262148000, "image": "val2014/COCO_val2014_000000262148.jpg",
     "question": "Where is he looking?", "answer": ["down", "down", "at table", ...]}

`image` is relative to the source's `image_root`; `answer` is the annotators' answers (VQAv2: 10;
repeats count) or one string (a single-answer source such as Visual Genome QA); it may be left
out of a test file. `question_id` is what the results file names (defaults to the record's
position when absent from every record).

Training (the reference's `vqa_dataset` + `vqa_collate_fn`): the question is cleaned with
:func:`pre_question`; each distinct answer of a record becomes one decoder row weighted by its
share of the record's answers (`answer_weights`); a single-answer record gets weight 0.2. A batch
holds B images and questions and the R >= B answer rows of all of them.

Bad input follows the loader's rules: a file or record that is not a VQA record stops with one
line naming the file, the record and the key; a missing or undecodable image is a bad sample,
replaced deterministically and counted (see :mod:`blip_recipes.data.loader`).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from blip_recipes.data.loader import TrainLoader
from blip_recipes.data.nodes import stack
from blip_recipes.data.packed import PackedStrings
from blip_recipes.data.samples import BatchContext, EpochPlan, MapBatchMaker, load_map_samples
from blip_recipes.data.sources import AnnotationError, DenseIds, _compact_ids
from blip_recipes.data.transforms import BadImage, open_image

SINGLE_ANSWER_WEIGHT = 0.2
"""Weight of the answer of a single-answer record (the reference's Visual Genome QA weight)."""
QUESTION_LENGTH = 35
"""Question tokens kept ([CLS] and [SEP] included), as the reference tokenizes questions."""
ANSWER_LENGTH = 16
"""Answer tokens kept ([DEC] and [SEP] included); VQA answers are a few words."""

_QUESTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a question as the reference does: lower-case, delete each of ``.!"()*#:;~``, strip
    trailing spaces, keep the first `max_words` words.

    Example:
        >>> pre_question("Is the man (on the left) happy?")
        'is the man on the left happy?'
    """
    question = _QUESTION_PUNCTUATION.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def answer_weights(answer: Sequence[str] | str) -> tuple[list[str], list[float]]:
    """Distinct answers and their weights: each answer's share of the list (order of first
    appearance), or `[answer]` with weight 0.2 for a single string.

    Example:
        >>> answer_weights(["2", "2", "3", "2"])
        (['2', '3'], [0.75, 0.25])
    """
    if isinstance(answer, str):
        return [answer], [SINGLE_ANSWER_WEIGHT]
    counts = Counter(answer)
    return list(counts), [n / len(answer) for n in counts.values()]


@dataclass
class VqaRecord:
    """One question: its image (path joined with the image root), question text, the annotators'
    answers (empty in a test file) and its id."""

    image: str
    question: str
    answers: list[str]
    question_id: int | str
    single_answer: bool = False


def _check_record(record: object, where: str, need_answers: bool) -> None:
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object with 'image', 'question', 'answer'")
    for key in ("image", "question"):
        if key not in record:
            raise AnnotationError(f"{where}: missing '{key}' (keys: {sorted(record)})")
        if not isinstance(record[key], str) or not record[key].strip():
            raise AnnotationError(
                f"{where}: '{key}' must be a non-empty string, got {record[key]!r}"
            )
    answer = record.get("answer")
    if answer is None:
        if need_answers:
            raise AnnotationError(f"{where}: missing 'answer' (keys: {sorted(record)})")
        return
    if isinstance(answer, str):
        answer = [answer]
    if (
        not isinstance(answer, list)
        or not answer
        or not all(isinstance(a, str) and a.strip() for a in answer)
    ):
        raise AnnotationError(
            f"{where}: 'answer' must be a non-empty list of non-empty strings (or one string), "
            f"got {record['answer']!r}"
        )
    qid = record.get("question_id")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (int, str))):
        raise AnnotationError(f"{where}: 'question_id' must be an integer or a string, got {qid!r}")


def _raw_records(path: str) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path} line {number}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise AnnotationError(f"{where}: not JSON ({e})") from None
            return
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: not a JSON list of VQA records: {e}") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of VQA records")
    for i, record in enumerate(records):
        yield f"{path} record {i}", record


def iter_vqa_records(
    path: str, image_root: str = "", need_answers: bool = True
) -> Iterator[VqaRecord]:
    """The records of a VQA question file (module docstring), checked one by one.

    Raises:
        AnnotationError: one line naming the file, the record (or line) and the key at fault.
        OSError: the file cannot be read.
    """
    for index, (where, record) in enumerate(_raw_records(path)):
        _check_record(record, where, need_answers)
        assert isinstance(record, dict)
        answer = record.get("answer")
        yield VqaRecord(
            image=os.path.join(image_root, record["image"]),
            question=record["question"],
            answers=[answer] if isinstance(answer, str) else list(answer or []),
            question_id=record.get("question_id", index),
            single_answer=isinstance(answer, str),
        )


def load_vqa_records(
    paths: Sequence[str] | str, image_root: str = "", need_answers: bool = True
) -> list[VqaRecord]:
    """Every record of one or more question files, in order; refuses duplicate question ids."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    records = [r for p in paths for r in iter_vqa_records(p, image_root, need_answers)]
    seen: dict[object, int] = {}
    for i, record in enumerate(records):
        if record.question_id in seen:
            raise AnnotationError(
                f"{', '.join(paths)}: question_id {record.question_id!r} appears twice "
                f"(records {seen[record.question_id]} and {i}); results are keyed by it"
            )
        seen[record.question_id] = i
    return records


def load_answer_list(path: str) -> list[str]:
    """A candidate answer list: a JSON list of distinct non-empty strings (the reference's
    `answer_list.json`)."""
    try:
        with open(path, encoding="utf-8") as f:
            answers = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not a JSON list of answers: {e}") from None
    if not isinstance(answers, list) or not answers:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of answer strings")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise AnnotationError(f"{path} entry {i}: expected a non-empty string, got {answer!r}")
    if len(set(answers)) != len(answers):
        repeated = next(a for a, n in Counter(answers).items() if n > 1)
        raise AnnotationError(f"{path}: answer {repeated!r} is listed more than once")
    return answers


class VqaSource:
    """The training source of VQA question files (the map-style source interface of
    :mod:`blip_recipes.data.sources`): `get` returns `(image path, (question, answers, weights),
    origin)`. Records are kept compressed (:class:`PackedStrings`)."""

    def __init__(self, paths: Sequence[str], image_root: str = "") -> None:
        packed, dense, ids = PackedStrings(), DenseIds(), []
        for path in paths:
            for record in iter_vqa_records(path, image_root, need_answers=True):
                answer = record.answers[0] if record.single_answer else record.answers
                packed.append(json.dumps([record.image, record.question, answer]))
                ids.append(dense(record.image))
        self.records = packed.finish()
        self.image_ids = _compact_ids(ids)
        self.num_images = len(dense)
        self.name = f"vqa[{', '.join(os.path.basename(p) for p in paths)}]"

    def __len__(self) -> int:
        return len(self.records)

    def image_id(self, index: int) -> int:
        return int(self.image_ids[index])

    def get(
        self, index: int, rng: random.Random
    ) -> tuple[str, tuple[str, list[str], list[float]], str]:
        image, question, answer = json.loads(self.records[index])
        answers, weights = answer_weights(answer)
        return image, (pre_question(question), answers, weights), f"{self.name}[{index}] {image}"


def load_vqa_sample(source: VqaSource, index: int, rng: random.Random, ctx: BatchContext):
    """(uint8 image (3, s, s), (question, answers, weights)) of `source[index]`; a missing or
    undecodable image raises :class:`BadImage` naming the sample."""
    image_ref, sample, origin = source.get(index, rng)
    try:
        if not sample[0]:
            raise BadImage("empty question after cleaning")
        return ctx.transform(open_image(image_ref), rng), sample
    except BadImage as e:
        error = BadImage(f"{origin}: {e}")
        error.origin, error.reason = origin, str(e)
        raise error from e


def tokenize_trimmed(
    tokenizer, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (N, L) padded to the longest text (at most `max_length` tokens)."""
    ids, mask = tokenizer(texts, max_length=max_length)
    length = max(int(mask.sum(dim=1).max()), 2)
    return ids[:, :length].contiguous(), mask[:, :length].contiguous()


class VqaBatchMaker(MapBatchMaker):
    """One rank's VQA batch: `images` uint8 (B, 3, s, s), `question_ids`/`question_mask` (B, Lq),
    `answer_ids`/`answer_mask` (R, La), `answer_weights` fp32 (R,), `answer_question` int64 (R,)
    (the question of each answer row), `image_ids` (B,)."""

    def __init__(
        self,
        plan: EpochPlan,
        ctx: BatchContext,
        question_length: int = QUESTION_LENGTH,
        answer_length: int = ANSWER_LENGTH,
    ) -> None:
        super().__init__(plan, ctx)
        self.question_length, self.answer_length = question_length, answer_length

    def make_batch(self, epoch: int, position: int, positions: list[int] | None = None) -> dict:
        ctx = self.ctx
        if positions is None:
            start = position + ctx.rank * ctx.batch_size
            positions = list(range(start, start + ctx.batch_size))
        images, samples, image_ids, bad = load_map_samples(
            self.plan, ctx, epoch, positions, load=load_vqa_sample
        )
        questions = [question for question, _, _ in samples]
        answers = [a for _, answer_list, _ in samples for a in answer_list]
        weights = [w for _, _, weight_list in samples for w in weight_list]
        rows = [i for i, (_, answer_list, _) in enumerate(samples) for _ in answer_list]
        question_ids, question_mask = tokenize_trimmed(ctx.tokenizer, questions,
                                                       self.question_length)  # fmt: skip
        answer_ids, answer_mask = tokenize_trimmed(ctx.tokenizer, answers, self.answer_length)
        return {
            "images": stack(images),
            "question_ids": question_ids,
            "question_mask": question_mask,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask,
            "answer_weights": torch.tensor(weights, dtype=torch.float32),
            "answer_question": torch.tensor(rows, dtype=torch.int64),
            "image_ids": torch.tensor(image_ids, dtype=torch.int64),
            "_epoch": epoch,
            "_position": position,
            "_bad": len(bad),
            "_bad_samples": bad,
        }


class VqaTrainLoader(TrainLoader):
    """The training loader (order, workers, bad samples, exact resume: :class:`TrainLoader`)
    making VQA batches (:class:`VqaBatchMaker`)."""

    def _batch_maker(self) -> MapBatchMaker:
        return VqaBatchMaker(self.plan, self.ctx)


def build_vqa_train_loader(
    data_cfg, tokenizer, image_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> VqaTrainLoader:
    """The VQA training loader of this rank over `data.sources` (kind `json` or `jsonl`: VQA
    question files; each source's `weight` repeats or subsamples it per epoch).

    Raises:
        ValueError: a source of another kind.
        FileNotFoundError: a question file is missing.
        AnnotationError: a question file is not VQA records (one line naming file and record).
    """
    from blip_recipes.data.transforms import TrainTransform

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wrong = [s.kind for s in data_cfg.sources if s.kind not in ("json", "jsonl")]
    if wrong:
        raise ValueError(
            f"VQA training reads question files: data.sources kinds must be json or jsonl, "
            f"got {wrong[0]!r}"
        )
    missing = [p for s in data_cfg.sources for p in s.paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"VQA question file(s) not found: {', '.join(missing)}")
    transform = TrainTransform(
        image_size,
        min_scale=data_cfg.min_scale,
        randaugment=data_cfg.randaugment,
        use_draft=data_cfg.jpeg_draft,
        max_aspect_ratio=data_cfg.max_aspect_ratio,
        min_image_size=data_cfg.min_image_size,
    )
    ctx = BatchContext(tokenizer=tokenizer, transform=transform, max_words=data_cfg.max_words,
                       batch_size=data_cfg.batch_size, rank=rank, world_size=world_size,
                       seed=seed)  # fmt: skip
    sources = [VqaSource(s.paths, s.image_root) for s in data_cfg.sources]
    plan = EpochPlan(sources, [s.weight for s in data_cfg.sources], seed)  # type: ignore[arg-type]
    return VqaTrainLoader(plan, ctx, data_cfg)


__all__ = [
    "ANSWER_LENGTH",
    "QUESTION_LENGTH",
    "SINGLE_ANSWER_WEIGHT",
    "VqaBatchMaker",
    "VqaRecord",
    "VqaSource",
    "VqaTrainLoader",
    "answer_weights",
    "build_vqa_train_loader",
    "iter_vqa_records",
    "load_answer_list",
    "load_vqa_records",
    "pre_question",
    "tokenize_trimmed",
]
