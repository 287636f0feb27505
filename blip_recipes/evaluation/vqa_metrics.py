"""The standard VQA accuracy and its answer normalisation (the official VQA evaluation's rules).

Accuracy of one predicted answer against the human answers of a question: for each of the n
annotators, leave that annotator out and score `min(#other annotators who gave the prediction
/ 3, 1)`; the question's accuracy is the mean over the n leave-one-out scores. With 10 answers
this is the familiar `min(#matching / 3, 1)` smoothed over annotator subsets: 3 matches give
(3 x 2/3 + 7 x 1) / 10 = 0.9, 4 or more give 1.

Normalisation, as the official script does it:

- the prediction: newlines/tabs to spaces, stripped; punctuation (`processPunctuation`); then
  lower-cased word by word, number words zero..ten to digits ("none" -> "0"), the articles
  a/an/the dropped, contractions written without their apostrophe restored ("dont" -> "don't");
- the human answers: punctuation only, and only when they are not all the same string.

Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
space somewhere in the text or the text has a digit-comma-digit, else replaced by a space; then
every period not followed by a digit is deleted ("3.5" keeps its period).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# the official pattern as written: its "(?!<=\d)" is a lookahead, so a period is kept only when
# a digit follows it
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip

_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've "
    "it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()
"""Contractions whose apostrophe-less spellings are restored. Forms that are also words
("shed", "well", "were", "ill", "its", "id", "wed", "hell") are left out, as in the official
list."""


def _without_apostrophes(word: str) -> set[str]:
    """Every spelling of `word` with one or more of its apostrophes removed."""
    parts = word.split("'")
    spellings = set()
    for keep in itertools.product(("'", ""), repeat=len(parts) - 1):
        spelling = parts[0] + "".join(sep + part for sep, part in zip(keep, parts[1:]))
        if spelling != word:
            spellings.add(spelling)
    return spellings


CONTRACTIONS = {bare: word for word in _CONTRACTED for bare in _without_apostrophes(word)}
"""Apostrophe-less spelling -> contraction ("dont" -> "don't", "hed've" -> "he'd've")."""


def strip_punctuation(text: str) -> str:
    """The official `processPunctuation` (module docstring)."""
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_words(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, articles dropped,
    contractions restored; words joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it.

    Example:
        >>> normalize_answer("Two dogs!")
        '2 dogs'
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction (module docstring), in [0, 1].

    Args:
        prediction: the model's answer (normalised here).
        human_answers: the annotators' answers (10 in VQAv2; at least one).

    Raises:
        ValueError: when `human_answers` is empty.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(h) for h in humans]
    matches = sum(h == predicted for h in humans)
    scores = [min(1.0, (matches - (h == predicted)) / 3) for h in humans]
    return sum(scores) / len(scores)


def mean_vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_accuracy` over questions, in [0, 1] (the official overall accuracy / 100)."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    return sum(map(vqa_accuracy, predictions, human_answers)) / len(predictions)


__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "mean_vqa_accuracy",
    "normalize_answer",
    "normalize_words",
    "strip_punctuation",
    "vqa_accuracy",
]
