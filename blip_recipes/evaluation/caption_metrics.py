"""Caption metrics as the COCO caption evaluation computes them: corpus BLEU-1..4 and CIDEr-D.

Both follow the definitions of the coco-caption toolkit (the one BLIP reports with), written
out here so that no Java tokenizer and no extra package is needed:

- **Tokenizer** (:func:`tokenize_caption`): a simple stand-in for the PTB tokenizer step of
  coco-caption, whose effect on captions is: lower-case, split off clitics (``dog's`` ->
  ``dog 's``, ``don't`` -> ``do n't``), and drop punctuation tokens (``. , ? ! : ; - ' "`` and
  brackets). Hyphenated words stay one token. Both candidates and references go through it.
- **BLEU** (:func:`corpus_bleu`): per sentence, n-gram counts of the candidate are clipped by
  the maximum count of that n-gram in any one reference; the clipped matches and the candidate
  n-gram totals are summed over the corpus; BLEU-n = (prod_{k<=n} (matches_k + 1e-15) /
  (total_k + 1e-9)) ** (1/n), times the brevity penalty exp(1 - r/c) when the summed candidate
  length c is below the summed reference length r, where each sentence contributes the length
  of its *closest* reference (ties: the shorter), coco-caption's option "closest".
- **CIDEr-D** (:func:`cider_d`): each sentence becomes four tf-idf vectors (n = 1..4) with the
  document frequency of an n-gram counted over the *reference sets* of the evaluated corpus
  (images whose references contain it) and idf = log(number of images) - log(max(1, df)); per
  reference, the cosine of the candidate and reference vectors with the candidate's weights
  clipped by the reference's (``min(cand, ref) * ref``), times a Gaussian length penalty
  exp(-(l_c - l_r)^2 / (2 * 6^2)); averaged over n, then over the references, times 10; the
  corpus score is the mean over images. As in coco-caption, the length l of a sentence is its
  number of bigrams (words - 1), which only differs from the word count for empty captions.

Scores here are fractions as coco-caption returns them (BLEU in [0, 1], CIDEr typically 0-2);
BLIP's paper reports them x 100.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

MAX_N = 4
CIDER_SIGMA = 6.0

_CLITIC = re.compile(r"(?i)(\w)(n't)\b|(\w)('s|'re|'ve|'ll|'d|'m)\b")
_PUNCTUATION = re.compile(r"""[.,?!:;"()\[\]{}`]|(?<![\w])-+|-+(?![\w])|--+""")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased word tokens of a caption with punctuation dropped (PTB-like, see module doc).

    Example:
        >>> tokenize_caption("A man's dog, running (fast)!")
        ['a', 'man', "'s", 'dog', 'running', 'fast']
    """
    text = text.lower()
    text = _CLITIC.sub(lambda m: f"{m[1]} {m[2]}" if m[1] else f"{m[3]} {m[4]}", text)
    text = _PUNCTUATION.sub(" ", text)
    tokens = []
    for token in text.split():
        if token.startswith("'") and token not in ("'s", "'re", "'ve", "'ll", "'d", "'m"):
            token = token.strip("'")  # quotes: 'word' -> word
        elif token.endswith("'"):
            token = token.rstrip("'")
        if token:
            tokens.append(token)
    return tokens


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram (as a tuple of tokens) for n = 1..max_n."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _check(candidates: Mapping, references: Mapping) -> None:
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:5]
        raise ValueError(
            f"candidates and references must cover the same images; differing ids: {missing}"
        )
    if not candidates:
        raise ValueError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"image {key!r} has no reference captions")


def corpus_bleu(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
    max_n: int = MAX_N,
) -> list[float]:
    """Corpus BLEU-1..max_n with the closest-reference brevity penalty (coco-caption's Bleu).

    Args:
        candidates: image id -> tokenized candidate (a list of tokens).
        references: image id -> its tokenized reference captions (at least one).

    Returns:
        ``[BLEU-1, ..., BLEU-max_n]`` as fractions.
    """
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for key, cand in candidates.items():
        refs = references[key]
        max_ref: dict[tuple, int] = {}
        for ref in refs:
            for gram, count in ngram_counts(ref, max_n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        for gram, count in ngram_counts(cand, max_n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        for n in range(1, max_n + 1):
            guess[n - 1] += max(0, len(cand) - n + 1)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (cand_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _tfidf(counts: Counter, df: Counter, log_images: float, max_n: int):
    """(per-n weight dicts, per-n norms, length in bigrams) of one sentence's n-gram counts."""
    vec: list[dict[tuple, float]] = [{} for _ in range(max_n)]
    norm = [0.0] * max_n
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = tf * (log_images - math.log(max(1.0, df[gram])))
        vec[n][gram] = weight
        norm[n] += weight * weight
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d_per_image(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
    max_n: int = MAX_N,
    sigma: float = CIDER_SIGMA,
) -> dict[Hashable, float]:
    """CIDEr-D of every image (coco-caption's ``Cider`` per-image scores); see the module doc.

    Args:
        candidates: image id -> tokenized candidate.
        references: image id -> its tokenized reference captions.

    Returns:
        image id -> score (x 10 scale, as coco-caption).
    """
    _check(candidates, references)
    ref_counts = {key: [ngram_counts(r, max_n) for r in refs] for key, refs in references.items()}
    df: Counter = Counter()
    for counts in ref_counts.values():
        df.update({gram for c in counts for gram in c})
    log_images = math.log(float(len(references)))
    scores = {}
    for key, cand in candidates.items():
        vec, norm, length = _tfidf(ngram_counts(cand, max_n), df, log_images, max_n)
        total = 0.0
        for counts in ref_counts[key]:
            vec_r, norm_r, length_r = _tfidf(counts, df, log_images, max_n)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0)
                          for g, w in vec[n].items())  # fmt: skip
                if norm[n] != 0 and norm_r[n] != 0:
                    dot /= norm[n] * norm_r[n]
                total += dot * penalty / max_n
        scores[key] = 10.0 * total / len(ref_counts[key])
    return scores


def cider_d(
    candidates: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[Sequence[str]]],
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_per_image`."""
    per_image = cider_d_per_image(candidates, references)
    return sum(per_image.values()) / len(per_image)


def caption_scores(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of raw caption texts, with coco-caption's key names.

    Args:
        candidates: image id -> generated caption.
        references: image id -> its reference captions (raw text).

    Returns:
        ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}`` as fractions (CIDEr x 10 scale).
    """
    cands = {k: tokenize_caption(v) for k, v in candidates.items()}
    refs = {k: [tokenize_caption(r) for r in v] for k, v in references.items()}
    bleu = corpus_bleu(cands, refs)
    out = {f"Bleu_{n + 1}": value for n, value in enumerate(bleu)}
    out["CIDEr"] = cider_d(cands, refs)
    return out


__all__ = [
    "caption_scores",
    "cider_d",
    "cider_d_per_image",
    "corpus_bleu",
    "ngram_counts",
    "tokenize_caption",
]
