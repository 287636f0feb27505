"""Tokenizers with BLIP's special roles, producing fixed-length ids and masks.

Every tokenizer here has the same surface (:class:`Tokenizer`): ``[CLS] text [SEP] [PAD]...``
at a fixed length (30 in pretraining), plus ``[ENC]`` (first token for ITM) and ``[DEC]`` (first
token / BOS for the LM). The model's vocabulary size is ``tokenizer.vocab_size``.

- ``wordpiece``: a BERT tokenizer through ``transformers`` from a local ``vocab.txt`` or a tokenizer
  folder; ``[DEC]`` and ``[ENC]`` are added as the reference does (30522 and 30523 for
  ``bert-base-uncased``). Nothing is downloaded.
- ``bpe``: a byte-level BPE through ``tiktoken`` from a local ``.tiktoken`` ranks file (read by this
  module, so tiktoken's path cache never serves a stale file); the special roles are appended after
  the largest rank.
- ``synthetic``: a small WordPiece vocabulary covering the synthetic captions (plus single letters,
  so any word tokenizes without ``[UNK]``), laid out like BERT's: ``[PAD]=0, [UNK], [CLS], [SEP],
  [MASK]``, words, then ``[DEC]``, ``[ENC]`` last.
"""

from __future__ import annotations

import base64
import json
import os
import string
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from blip_recipes.config.sections import TokenizerConfig

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"

# GPT-2's pre-tokenisation pattern (used for .tiktoken files, which carry no pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@runtime_checkable
class Tokenizer(Protocol):
    """What the loader and the recipes need from a tokenizer."""

    vocab_size: int
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    enc_token_id: int
    dec_token_id: int
    max_length: int

    def __call__(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize to ``(input_ids, attention_mask)``, both int64 of shape (N, max_length)."""

    def decode(self, ids) -> str:
        """Text of ``ids`` without special tokens."""


class WordPieceTokenizer:
    """BERT WordPiece through ``transformers`` with ``[DEC]`` (BOS) and ``[ENC]`` added.

    Args:
        backend: a ``transformers`` fast BERT tokenizer.
        max_length: default fixed length.
    """

    def __init__(self, backend, max_length: int = 30) -> None:
        for token in (DEC_TOKEN,):
            if token not in backend.get_vocab():
                backend.add_special_tokens({"bos_token": token})
        if ENC_TOKEN not in backend.get_vocab():
            backend.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        self.backend = backend
        self.max_length = max_length
        vocab = backend.get_vocab()
        self.vocab_size = len(backend)
        self.pad_token_id = backend.pad_token_id
        self.cls_token_id = backend.cls_token_id
        self.sep_token_id = backend.sep_token_id
        self.enc_token_id = vocab[ENC_TOKEN]
        self.dec_token_id = vocab[DEC_TOKEN]
        self.unk_token_id = backend.unk_token_id

    def __call__(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backend(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return out["input_ids"].long(), out["attention_mask"].long()

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (for tests and tools)."""
        return self.backend.convert_tokens_to_ids(token)


class BPETokenizer:
    """Byte-level BPE through ``tiktoken`` with BLIP's special roles appended after the ranks.

    Args:
        ranks: mergeable ranks (bytes -> rank); must contain all 256 single bytes.
        max_length: default fixed length.
        pattern: pre-tokenisation regex (GPT-2's by default).
        name: encoding name shown in errors.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        max_length: int = 30,
        pattern: str = GPT2_PATTERN,
        name: str = "blip-bpe",
    ) -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(
                f"BPE ranks miss {len(missing)} of the 256 single bytes (e.g. {missing[:5]}): "
                "tiktoken needs every byte to encode arbitrary text"
            )
        self._ranks = ranks
        self._pattern = pattern
        self._name = name
        self.max_length = max_length
        base = max(ranks.values()) + 1
        roles = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC_TOKEN, ENC_TOKEN)
        self.special_tokens = {tok: base + i for i, tok in enumerate(roles)}
        self.vocab_size = base + len(roles)
        self.pad_token_id = self.special_tokens["[PAD]"]
        self.unk_token_id = self.special_tokens["[UNK]"]
        self.cls_token_id = self.special_tokens["[CLS]"]
        self.sep_token_id = self.special_tokens["[SEP]"]
        self.dec_token_id = self.special_tokens[DEC_TOKEN]
        self.enc_token_id = self.special_tokens[ENC_TOKEN]
        self._encoding = None

    @property
    def encoding(self):
        """The ``tiktoken.Encoding`` (built lazily, so that the tokenizer pickles to workers)."""
        if self._encoding is None:
            import tiktoken

            self._encoding = tiktoken.Encoding(
                name=self._name,
                pat_str=self._pattern,
                mergeable_ranks=self._ranks,
                special_tokens=self.special_tokens,
            )
        return self._encoding

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_encoding"] = None
        return state

    def __call__(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = max_length or self.max_length
        ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, tokens in enumerate(self.encoding.encode_ordinary_batch(list(texts))):
            seq = [self.cls_token_id, *tokens[: length - 2], self.sep_token_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(self.special_tokens.values())
        return self.encoding.decode([i for i in ids if i not in special])


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file (``base64(token) rank`` per line) without tiktoken's path cache."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a '<base64 token> <rank>' line") from e
    return ranks


def synthetic_vocab() -> list[str]:
    """The synthetic tokenizer's vocabulary in id order (BERT-like layout, [DEC]/[ENC] last)."""
    from blip_recipes.data.synthetic import WORDS

    letters = list(string.ascii_lowercase + string.digits)
    words = list(dict.fromkeys([*WORDS, *letters, *("##" + c for c in letters)]))
    punctuation = list(dict.fromkeys(string.punctuation))
    return [*SPECIAL_TOKENS, *words, *punctuation, DEC_TOKEN, ENC_TOKEN]


def vocab_size_estimate(tok: TokenizerConfig) -> int | None:
    """The vocabulary size of tokenizer section ``tok`` (anything with ``kind`` and ``path``)
    without loading it (None: unknown, use the preset's)."""
    try:
        if tok.kind == "synthetic":
            return len(synthetic_vocab())
        if not tok.path:
            return None
        path = Path(tok.path)
        if tok.kind == "wordpiece" and path.is_dir():
            path = path / "vocab.txt"
        if path.is_file():
            with path.open("rb") as f:
                lines = sum(1 for line in f if line.strip())
            return lines + (2 if tok.kind == "wordpiece" else 7)  # added special tokens
    except OSError:
        pass
    return None


def _load_wordpiece_backend(path: str):
    from transformers import BertTokenizerFast

    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return BertTokenizerFast.from_pretrained(str(p), local_files_only=True)
        if (p / "vocab.txt").exists():
            # Never `from_pretrained` on a folder with only vocab.txt, nor `vocab_file=`: in
            # transformers 5 both silently build a 5-token vocabulary (every word -> [UNK]).
            lower = True
            cfg_file = p / "tokenizer_config.json"
            if cfg_file.exists():
                lower = json.loads(cfg_file.read_text()).get("do_lower_case", True)
            return BertTokenizerFast(vocab=str(p / "vocab.txt"), do_lower_case=lower)
        raise FileNotFoundError(f"tokenizer folder {p} has neither tokenizer.json nor vocab.txt")
    if p.is_file():
        return BertTokenizerFast(vocab=str(p))
    raise FileNotFoundError(
        f"tokenizer.path '{path}' does not exist (give a local vocab.txt or tokenizer folder; "
        "nothing is downloaded)"
    )


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Build the tokenizer described by the ``[tokenizer]`` section.

    Example:
        >>> tok = build_tokenizer(TokenizerConfig(kind="synthetic"))
        >>> ids, mask = tok(["a red circle"])
        >>> ids.shape, int(ids[0, 0]) == tok.cls_token_id
        (torch.Size([1, 30]), True)
    """
    if cfg.kind == "synthetic":
        from transformers import BertTokenizerFast

        vocab = {tok: i for i, tok in enumerate(synthetic_vocab())}
        return WordPieceTokenizer(BertTokenizerFast(vocab=vocab), cfg.max_length)
    if not cfg.path:
        raise ValueError(f"tokenizer.path is required for tokenizer.kind='{cfg.kind}'")
    if cfg.kind == "wordpiece":
        backend = _load_wordpiece_backend(cfg.path)
        if len(backend) <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"tokenizer at {cfg.path} loaded only {len(backend)} tokens: check the vocab file"
            )
        return WordPieceTokenizer(backend, cfg.max_length)
    if cfg.kind == "bpe":
        return BPETokenizer(read_tiktoken_ranks(cfg.path), cfg.max_length, name=Path(cfg.path).stem)
    raise ValueError(f"unknown tokenizer.kind '{cfg.kind}' (wordpiece, bpe or synthetic)")
