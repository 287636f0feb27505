"""score_retrieval / evaluate_retrieval against a dense brute-force protocol, and 2-rank runs
(replicated and FSDP2) against one process."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from blip_recipes.evaluation import evaluate_retrieval, retrieval_metrics, score_retrieval
from blip_recipes.evaluation.metrics import positive_ranks
from blip_recipes.parallel._testing import spawn_ranks
from tests.evaluation.eval_helpers import (
    score_worker,
    tiny_captions,
    tiny_data,
    tiny_model,
    tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _dense_protocol(model, tok, data, k_test):
    """Every pair scored (ITC and ITM), then the reference protocol on dense matrices."""
    images = torch.stack(list(data.images))
    from blip_recipes.data import normalize_images

    embeds = model.visual_encoder(normalize_images(images))
    img_feat = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
    ids, mask = tok(data.texts, max_length=35)
    txt_feat = F.normalize(model.text_proj(model.text(ids, mask).hidden_states[:, 0]), dim=-1)
    sims = img_feat @ txt_feat.t()  # (N_img, N_txt)
    enc = ids.clone()
    enc[:, 0] = tok.enc_token_id
    n_img, n_txt = sims.shape
    itm = torch.empty(n_img, n_txt)
    for i in range(n_img):
        hidden = model.text(enc, mask, embeds[i : i + 1].expand(n_txt, -1, -1)).hidden_states
        itm[i] = model.itm_head(hidden[:, 0])[:, 1]
    txt2img = torch.tensor(data.txt2img)

    def ranks(score, itc, positives, k):
        # top-k by ITC get ITM + ITC and go first; the rest keep ITC order behind them
        order = torch.argsort(itc, dim=1, descending=True, stable=True)
        top = torch.zeros_like(itc, dtype=torch.bool).scatter(1, order[:, :k], True)
        final = torch.where(top, score + 1e4, itc - 1e4)
        return positive_ranks(final, positives), positive_ranks(itc, positives)

    pos_i2t = txt2img[None, :] == torch.arange(n_img)[:, None]
    txt_ranks, itc_txt = ranks(itm + sims, sims, pos_i2t, min(k_test, n_txt))
    img_ranks, itc_img = ranks(itm.t() + sims.t(), sims.t(), pos_i2t.t(), min(k_test, n_img))
    return sims, itm, txt_ranks, img_ranks, itc_txt, itc_img


@pytest.mark.parametrize("k_test", [3, 256])
def test_scores_and_ranks_equal_dense_protocol(k_test):
    model, tok, data = tiny_model(), tokenizer(), tiny_data()
    scores = score_retrieval(model, tok, data, k_test=k_test, batch_size=4)
    sims, itm, txt_ranks, img_ranks, itc_txt, itc_img = _dense_protocol(model, tok, data, k_test)
    k = min(k_test, len(data.texts))
    assert scores.i2t_candidates.shape == (len(data.images), k)
    rows = torch.arange(len(data.images))[:, None]
    torch.testing.assert_close(scores.i2t_itc, sims[rows, scores.i2t_candidates], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.i2t_itm, itm[rows, scores.i2t_candidates], atol=1e-5, rtol=0)
    cols = torch.arange(len(data.texts))[:, None]
    torch.testing.assert_close(
        scores.t2i_itm, itm.t()[cols, scores.t2i_candidates], atol=1e-5, rtol=0
    )
    assert scores.txt_ranks.tolist() == txt_ranks.tolist()
    assert scores.img_ranks.tolist() == img_ranks.tolist()
    assert scores.itc_txt_ranks.tolist() == itc_txt.tolist()
    assert scores.itc_img_ranks.tolist() == itc_img.tolist()
    metrics = scores.metrics()
    assert metrics == pytest.approx(
        retrieval_metrics(txt_ranks, img_ranks) | retrieval_metrics(itc_txt, itc_img, "itc_")
    )
    assert evaluate_retrieval(model, tok, data, k_test=k_test, batch_size=5) == pytest.approx(
        metrics
    )


def test_rerank_changes_order_and_model_mode_is_restored():
    model, tok, data = tiny_model(), tokenizer(), tiny_data()
    model.train()
    scores = score_retrieval(model, tok, data, k_test=4, batch_size=4)
    assert model.training
    # the ITM rerank reorders at least some candidate lists relative to ITC
    reordered = torch.argsort(scores.i2t_scores, dim=1, descending=True, stable=True)
    assert (reordered != torch.arange(4)).any()


def _compare_to_single(tmp_path, fsdp: bool, k_test: int):
    """Scores and (FSDP2-safe) captions on 2 gloo ranks equal those of one process."""
    reference = score_retrieval(tiny_model(), tokenizer(), tiny_data(), k_test=k_test, batch_size=3)
    spawn_ranks(score_worker, 2, tmp_path, str(tmp_path), fsdp, k_test)
    for rank in range(2):
        got = torch.load(tmp_path / f"scores_rank{rank}.pt")
        for name, value in reference.__dict__.items():
            if value.dtype == torch.long:
                assert torch.equal(got[name], value), (rank, name)
            else:
                torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0, msg=name)
        captions = json.loads((tmp_path / f"captions_rank{rank}.json").read_text())
        assert captions == tiny_captions(tiny_model(), rank)


@pytest.mark.slow  # the recipe test runs 2 replicated ranks through `blip run`
def test_two_ranks_replicated_equal_one_process(tmp_path):
    _compare_to_single(tmp_path, fsdp=False, k_test=3)


def test_two_ranks_fsdp2_equal_one_process(tmp_path):
    _compare_to_single(tmp_path, fsdp=True, k_test=5)
