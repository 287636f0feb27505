"""Zero-shot video retrieval: scores equal a dense brute-force version of the reference's
protocol (mean-pooled frame ITC, concatenated frame tokens for ITM), metric names and median
ranks, MSRVTT-style annotations, and a briefly trained tiny model retrieving matched videos."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from blip_recipes.data import normalize_images
from blip_recipes.evaluation import RetrievalData
from blip_recipes.evaluation.metrics import positive_ranks
from blip_recipes.evaluation.video_retrieval import (
    load_video_retrieval_data,
    score_video_retrieval,
    video_retrieval_metrics,
)
from tests.evaluation.eval_helpers import WORDS, tiny_model, tokenizer

FRAMES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _videos(n: int = 5, seed: int = 0) -> RetrievalData:
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randint(0, 256, (FRAMES, 3, 32, 32), dtype=torch.uint8, generator=gen)
              for _ in range(n)]  # fmt: skip
    texts, txt2img, img2txt = [], [], []
    for v in range(n):
        per = 1 + v % 2
        img2txt.append(list(range(len(texts), len(texts) + per)))
        for j in range(per):
            texts.append(" ".join(WORDS[(v * 3 + j + i) % len(WORDS)] for i in range(4)))
            txt2img.append(v)
    return RetrievalData(videos, texts, txt2img, img2txt)


@torch.no_grad()
def _dense(model, tok, data, k):
    """Every pair scored as the reference does, then top-k ITM rerank on dense matrices."""
    frames = torch.stack(list(data.images))  # (V, N, 3, s, s)
    v, n = frames.shape[:2]
    embeds = model.visual_encoder(normalize_images(frames.flatten(0, 1)))
    video_feat = F.normalize(model.vision_proj(embeds[:, 0]).view(v, n, -1).mean(1), dim=-1)
    tokens = embeds.view(v, -1, embeds.shape[-1])  # frames' tokens concatenated
    ids, mask = tok(data.texts, max_length=35)
    txt_feat = F.normalize(model.text_proj(model.text(ids, mask).hidden_states[:, 0]), dim=-1)
    sims = video_feat @ txt_feat.t()
    enc = ids.clone()
    enc[:, 0] = tok.enc_token_id
    itm = torch.stack([
        model.itm_head(model.text(enc, mask, tokens[i : i + 1].expand(len(ids), -1, -1))
                       .hidden_states[:, 0])[:, 1]
        for i in range(v)
    ])  # fmt: skip
    pos = torch.tensor(data.txt2img)[None, :] == torch.arange(v)[:, None]

    def ranks(score, itc, positives, k):
        order = torch.argsort(itc, dim=1, descending=True, stable=True)
        top = torch.zeros_like(itc, dtype=torch.bool).scatter(1, order[:, :k], True)
        return positive_ranks(torch.where(top, score + 1e4, itc - 1e4), positives)

    txt = ranks(itm + sims, sims, pos, min(k, sims.shape[1]))
    vid = ranks(itm.t() + sims.t(), sims.t(), pos.t(), min(k, v))
    return sims, itm, txt, vid


@pytest.mark.parametrize("k_test", [2, 128])
def test_scores_equal_the_dense_reference_protocol(k_test):
    model, tok, data = tiny_model(), tokenizer(), _videos()
    scores = score_video_retrieval(model, tok, data, num_frames=FRAMES, k_test=k_test,
                                   batch_size=2)  # fmt: skip
    sims, itm, txt, vid = _dense(model, tok, data, k_test)
    rows = torch.arange(len(data.images))[:, None]
    torch.testing.assert_close(scores.i2t_itc, sims[rows, scores.i2t_candidates], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.i2t_itm, itm[rows, scores.i2t_candidates], atol=1e-5, rtol=0)
    cols = torch.arange(len(data.texts))[:, None]
    torch.testing.assert_close(
        scores.t2i_itm, itm.t()[cols, scores.t2i_candidates], atol=1e-5, rtol=0
    )
    assert scores.txt_ranks.tolist() == txt.tolist()
    assert scores.img_ranks.tolist() == vid.tolist()


def test_wrong_frame_count_is_refused():
    data = _videos()
    with pytest.raises(ValueError, match="expected 4"):
        score_video_retrieval(tiny_model(), tokenizer(), data, num_frames=4)


def test_metric_names_and_median_ranks_by_hand():
    ranks = SimpleNamespace(
        txt_ranks=torch.tensor([0, 2, 11]), img_ranks=torch.tensor([0, 0, 4, 9]),
        itc_txt_ranks=torch.tensor([1, 2, 11]), itc_img_ranks=torch.tensor([5, 0, 4, 20]),
    )  # fmt: skip
    m = video_retrieval_metrics(ranks)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == pytest.approx(200 / 3)
    assert m["txt_r10"] == pytest.approx(200 / 3) and m["txt_mdR"] == 3.0  # 1, 3, 12
    assert (m["vid_r1"], m["vid_r5"], m["vid_r10"]) == (50.0, 75.0, 100.0)
    assert m["vid_mdR"] == 3.0  # ranks 1, 1, 5, 10: mean of the middle two
    assert m["vid_r_mean"] == pytest.approx(75.0)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + 75.0) / 2)
    assert m["itc_vid_mdR"] == 5.5 and m["itc_txt_r1"] == 0.0
    assert not any(k.startswith(("img_", "itc_img_")) for k in m)


def test_msrvtt_annotations_clip_names_and_merged_captions(tmp_path):
    lines = [{"clip_name": "video7010", "caption": "A Man  Is Talking!"},
             {"clip_name": "video7011", "caption": ["a dog runs", "a dog is running"]},
             {"video": "other/clip.webm", "caption": "a cat"},
             {"clip_name": "video7010", "caption": "someone speaks"}]  # fmt: skip
    path = tmp_path / "msrvtt_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    data = load_video_retrieval_data(str(path), "videos")
    assert data.images == ["videos/video7010.mp4", "videos/video7011.mp4", "videos/other/clip.webm"]
    assert data.texts == ["a man is talking", "a dog runs", "a dog is running", "a cat",
                          "someone speaks"]  # fmt: skip
    assert data.txt2img == [0, 1, 1, 2, 0]
    assert data.img2txt == [[0, 4], [1, 2], [3]]


@pytest.mark.parametrize(
    ("record", "message"),
    [({"caption": "x"}, "record 0: no video"), ({"clip_name": "a"}, "'caption' must be"),
     ({"clip_name": "a", "caption": []}, "'caption' must be")],
)  # fmt: skip
def test_bad_annotations_name_the_record(tmp_path, record, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=message):
        load_video_retrieval_data(str(path))


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
RGB = torch.tensor([[220, 30, 30], [30, 30, 220], [30, 200, 30], [230, 230, 40],
                    [150, 40, 170], [240, 140, 20], [240, 240, 240], [15, 15, 15]])  # fmt: skip


def _color_videos(gen: torch.Generator, frames: int = 4) -> list[torch.Tensor]:
    """Video c: noisy frames of color c (each frame differs, the color is the content)."""
    return [(RGB[c].view(1, 3, 1, 1) + torch.randn(frames, 3, 32, 32, generator=gen) * 25)
            .clamp(0, 255).to(torch.uint8) for c in range(len(COLORS))]  # fmt: skip


@pytest.mark.slow  # ~4 s: 60 Adam steps of the tiny model
def test_briefly_trained_model_retrieves_matched_videos_well_above_chance():
    """ITC + ITM trained on single frames (as images) with their video's caption; retrieval of
    unseen noisy videos through mean-pooled frames then beats chance (R@1 12.5 %, r_mean 58.3)."""
    gen = torch.Generator().manual_seed(0)
    model, tok = tiny_model(), tokenizer()
    texts = [f"a {c} video" for c in COLORS]
    ids, mask = tok(texts, max_length=35)
    enc = ids.clone()
    enc[:, 0] = tok.enc_token_id
    labels = torch.arange(len(texts))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n != "temp"], lr=5e-3)
    model.train()
    for _ in range(60):
        one_frame = torch.stack([v[int(torch.randint(0, 4, (1,), generator=gen))]
                                 for v in _color_videos(gen)])  # fmt: skip
        embeds, feat = model.encode_image(normalize_images(one_frame))
        logits = feat @ model.encode_text(ids, mask).feat.t() / 0.1
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        itm = model.itm_logits(embeds, torch.cat([enc, enc]), torch.cat([mask, mask]),
                               torch.cat([labels, labels.roll(1)]))  # fmt: skip
        loss = loss + F.cross_entropy(itm, (torch.arange(16) < 8).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    videos = _color_videos(torch.Generator().manual_seed(1))
    data = RetrievalData(videos, texts, list(range(8)), [[i] for i in range(8)])
    m = video_retrieval_metrics(score_video_retrieval(model, tok, data, num_frames=4, k_test=4))
    assert m["itc_txt_r1"] >= 75.0 and m["itc_vid_r1"] >= 50.0, m  # chance: 12.5
    assert m["r_mean"] >= 75.0 and m["itc_vid_mdR"] <= 2.0, m  # chance: 58.3 and 4.5
