import pickle

import pytest
import torch

from blip_recipes.config import TokenizerConfig
from blip_recipes.data import BPETokenizer, build_tokenizer
from blip_recipes.data.synthetic import WORDS, synthetic_sample


def _check_roles(tok, length=30):
    ids, mask = tok(["a red circle", "a " * 100], max_length=None)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, length)
    assert ids[0, 0] == tok.cls_token_id
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok.sep_token_id
    assert (ids[0, n:] == tok.pad_token_id).all() and (mask[0, n:] == 0).all()
    assert mask[1].all() and ids[1, -1] == tok.sep_token_id  # truncated to max_length
    specials = {tok.pad_token_id, tok.cls_token_id, tok.sep_token_id}
    specials |= {tok.enc_token_id, tok.dec_token_id}
    assert len(specials) == 5
    assert max(specials) < tok.vocab_size
    assert tok.decode(ids[0]) == "a red circle"


def test_wordpiece_from_vocab_txt_bert_layout(bert_vocab_file):
    tok = build_tokenizer(TokenizerConfig(kind="wordpiece", path=str(bert_vocab_file)))
    _check_roles(tok)
    base = 104 + 11
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
    # [DEC] and [ENC] are added after the vocabulary, as the reference does (30522/30523 for BERT).
    assert (tok.dec_token_id, tok.enc_token_id, tok.vocab_size) == (base, base + 1, base + 2)
    ids, _ = tok(["Red circles"])
    assert ids[0, :5].tolist() == [101, 105, 106, 111, 102]  # known words map to their ids


def test_wordpiece_from_folder(bert_vocab_file, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text(bert_vocab_file.read_text())
    tok = build_tokenizer(TokenizerConfig(kind="wordpiece", path=str(folder)))
    assert tok(["dog"])[0][0, 1] == 107  # not [UNK]: the vocab_file trap is avoided
    tok.backend.save_pretrained(str(tmp_path / "saved"))  # tokenizer.json with [DEC]/[ENC]
    tok2 = build_tokenizer(TokenizerConfig(kind="wordpiece", path=str(tmp_path / "saved")))
    assert (tok2.vocab_size, tok2.dec_token_id, tok2.enc_token_id) == (
        tok.vocab_size,
        tok.dec_token_id,
        tok.enc_token_id,
    )


def test_wordpiece_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_tokenizer(TokenizerConfig(kind="wordpiece", path=str(tmp_path / "nope.txt")))


def test_bpe_from_tiktoken_file(tiktoken_file):
    tok = build_tokenizer(TokenizerConfig(kind="bpe", path=str(tiktoken_file)))
    _check_roles(tok)
    assert tok.vocab_size == 261 + 7
    ids, _ = tok(["red"])
    assert ids[0, 1] == 257  # the merged token "red"
    assert tok.decode(tok(["héllo wörld"])[0][0]) == "héllo wörld"
    tok2 = pickle.loads(pickle.dumps(tok))  # workers get a copy
    assert torch.equal(tok2(["red dog"])[0], tok(["red dog"])[0])


def test_bpe_reads_rewritten_file_not_cache(tiktoken_file):
    build_tokenizer(TokenizerConfig(kind="bpe", path=str(tiktoken_file)))
    lines = tiktoken_file.read_text().splitlines()[:256]
    tiktoken_file.write_text("\n".join(lines) + "\n")
    assert build_tokenizer(TokenizerConfig(kind="bpe", path=str(tiktoken_file))).vocab_size == 263


def test_bpe_needs_all_bytes():
    with pytest.raises(ValueError, match="single bytes"):
        BPETokenizer({b"a": 0})


def test_synthetic_tokenizer_covers_captions(synthetic_tokenizer):
    tok = synthetic_tokenizer
    _check_roles(tok)
    assert (tok.pad_token_id, tok.unk_token_id) == (0, 1)
    assert (tok.dec_token_id, tok.enc_token_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    for word in WORDS:
        assert tok.token_to_id(word) != tok.unk_token_id
    for i in range(50):
        caption = synthetic_sample(0, i)[1]
        ids, mask = tok([caption])
        assert tok.unk_token_id not in ids[0].tolist()
        assert tok.decode(ids[0]) == caption
