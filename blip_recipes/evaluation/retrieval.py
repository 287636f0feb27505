"""Image-text retrieval scoring with BLIP's protocol (reference `evaluation()` of
`train_retrieval.py`), split across ranks.

1. Features: every rank encodes its share of the images (ViT -> `vision_proj`, unit norm) and of
   the texts (`[CLS] text`, length 35 -> unimodal MED -> `text_proj`); the small contrastive
   features are all-gathered, the image token embeddings stay on the rank that computed them.
2. ITC: cosine similarity of every pair (no temperature). Each rank ranks the rows of its own
   image queries and text queries and keeps the top `k_test` candidates of each.
3. ITM rerank: each candidate pair is scored by the rank that holds its image's embeddings, with
   `[ENC]` in place of `[CLS]`: score = ITM logit of class 1 + ITC similarity. A pair found by
   both directions is computed once. The reranked top-k come first, the remaining candidates
   keep their ITC order.
4. Recall@1/5/10 both ways for the reranked scores and for ITC alone (`itc_*`).

Everything runs through the model's entry points (`encode_image`, `encode_text`, `itm_logits`),
which are FSDP2 forwards of a sharded model; every rank then makes the same number of calls
(padding with dummy batches). Every rank returns the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from blip_recipes.evaluation._dist import (
    all_gather_rows,
    all_reduce_sum,
    is_sharded,
    rank_and_world,
    run_balanced,
    shard_range,
)
from blip_recipes.evaluation.metrics import positive_ranks, retrieval_metrics
from blip_recipes.evaluation.retrieval_data import ImageInputs, RetrievalData
from blip_recipes.models.inputs import model_image_size


@dataclass
class RetrievalScores:
    """Top-k candidates of every query with their ITC and ITM scores, and the resulting ranks.

    `i2t_*` rows are image queries (text retrieval), `t2i_*` rows text queries (image
    retrieval); candidates are listed in ITC order (descending, ties by index).

    Attributes:
        i2t_candidates: (N_img, k) text indices.
        i2t_itc: (N_img, k) cosine similarity.
        i2t_itm: (N_img, k) ITM logit of class 1 (`[ENC]` first).
        t2i_candidates: (N_txt, k) image indices.
        t2i_itc: (N_txt, k).
        t2i_itm: (N_txt, k).
        itc_txt_ranks: (N_img,) rank of the first correct caption by ITC alone.
        itc_img_ranks: (N_txt,) rank of the correct image by ITC alone.
        txt_ranks: (N_img,) rank after the ITM rerank.
        img_ranks: (N_txt,) rank after the ITM rerank.
    """

    i2t_candidates: torch.Tensor
    i2t_itc: torch.Tensor
    i2t_itm: torch.Tensor
    t2i_candidates: torch.Tensor
    t2i_itc: torch.Tensor
    t2i_itm: torch.Tensor
    itc_txt_ranks: torch.Tensor
    itc_img_ranks: torch.Tensor
    txt_ranks: torch.Tensor
    img_ranks: torch.Tensor

    @property
    def i2t_scores(self) -> torch.Tensor:
        """(N_img, k) rerank scores: ITM logit + ITC similarity."""
        return self.i2t_itm + self.i2t_itc

    @property
    def t2i_scores(self) -> torch.Tensor:
        """(N_txt, k) rerank scores: ITM logit + ITC similarity."""
        return self.t2i_itm + self.t2i_itc

    def metrics(self) -> dict[str, float]:
        """Recall@1/5/10 both ways and means, reranked and (`itc_*`) ITC-only."""
        out = retrieval_metrics(self.txt_ranks.cpu(), self.img_ranks.cpu())
        out |= retrieval_metrics(self.itc_txt_ranks.cpu(), self.itc_img_ranks.cpu(), "itc_")
        return out

    def to(self, device: torch.device | str) -> RetrievalScores:
        """A copy with every tensor on `device`."""
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}  # fmt: skip
        return RetrievalScores(**fields)


class _Progress:
    """A tqdm bar on the main rank when stderr is a terminal (no-op elsewhere, in a pipe or a
    log file, or without tqdm)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="retrieval eval", unit="batch", leave=False,
                                disable=None)  # fmt: skip
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, phase: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(phase, refresh=False)
            self.bar.update(n)

    def reset(self, total: int) -> None:
        if self.bar is not None:
            self.bar.reset(total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def score_retrieval(
    model: nn.Module,
    tokenizer: Any,
    data: RetrievalData,
    k_test: int = 256,
    batch_size: int = 64,
    text_max_length: int = 35,
    image_size: int | None = None,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    inputs: ImageInputs | None = None,
) -> RetrievalScores:
    """Score every query of `data` with ITC, rerank its top `k_test` with ITM.

    Collective when a process group is initialised: call it on every rank with the same data;
    each rank encodes and reranks its share. The model may be plain (replicated) or FSDP2.

    Args:
        model: a `BlipPretrain` (online model); put in eval mode for the call.
        tokenizer: the run's tokenizer (`[CLS]`/`[ENC]` ids, fixed-length output).
        data: images, captions and their correspondence.
        k_test: candidates per query reranked with ITM (256 for COCO, 128 for Flickr30K).
        batch_size: images, texts or image-text pairs per forward.
        text_max_length: caption length in tokens (35 in the reference evaluation).
        image_size: input side; default the model's native size (other sizes interpolate the
            position embeddings).
        num_workers: image-decoding worker processes.
        device: where to compute; default the model's device.
        progress: show a progress bar on rank 0.
        inputs: how `data.images` entries are read and encoded; default :class:`ImageInputs`
            at `image_size` (video: `evaluation.video_retrieval.VideoInputs`).

    Returns:
        `RetrievalScores`, identical on every rank.
    """
    rank, world = rank_and_world()
    balanced = is_sharded(model)
    was_training = model.training
    model.eval()
    try:
        # Eager: varying batch sizes and pair counts would otherwise recompile the training
        # run's compiled blocks (and could reach the recompile limit) for a few forwards.
        with torch.compiler.set_stance("force_eager"):
            return _score(model, tokenizer, data, k_test, batch_size, text_max_length,
                          image_size, num_workers, device, progress and rank == 0,
                          balanced, rank, world, inputs)  # fmt: skip
    finally:
        model.train(was_training)


def _score(model, tokenizer, data, k_test, batch_size, text_max_length, image_size, num_workers,
           device, progress, balanced, rank, world, inputs=None) -> RetrievalScores:  # fmt: skip
    weight = model.visual_encoder.patch_embed.proj.weight
    device = torch.device(device) if device is not None else weight.device
    dtype = weight.dtype
    inputs = inputs or ImageInputs(image_size or model_image_size(model))
    n_img, n_txt = len(data.images), len(data.texts)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    local_img, local_txt = shard_range(n_img, rank, world), shard_range(n_txt, rank, world)

    # ---- 1. features
    all_ids, all_mask = tokenizer(list(data.texts), max_length=text_max_length)
    loader = DataLoader(inputs.dataset(data.images, local_img), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)  # fmt: skip
    text_batches = [range(s, min(s + batch_size, local_txt.stop))
                    for s in range(local_txt.start, local_txt.stop, batch_size)]  # fmt: skip
    bar = _Progress(progress, len(loader) + len(text_batches))

    def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs.encode(model, images.to(device, non_blocking=True), dtype)

    def encode_texts(rows: range) -> torch.Tensor:
        ids, mask = (
            all_ids[rows.start : rows.stop].to(device),
            all_mask[rows.start : rows.stop].to(device),
        )
        return model.encode_text(ids, mask).feat

    embeds_parts, img_feat_parts = [], []
    dummy_image = inputs.dummy()
    for _, (embeds, feat) in run_balanced(
        loader, len(loader), encode_images, dummy_image, balanced
    ):
        embeds_parts.append(embeds)
        img_feat_parts.append(feat)
        bar.update("images")
    txt_feat_parts = []
    for _, feat in run_balanced(
        text_batches, len(text_batches), encode_texts, range(0, 1), balanced
    ):
        txt_feat_parts.append(feat)
        bar.update("texts")
    embed_dim = model.vision_proj.out_features
    image_embeds = torch.cat(embeds_parts) if embeds_parts else None
    img_feat = (
        torch.cat(img_feat_parts) if img_feat_parts else torch.zeros(0, embed_dim, device=device)
    )
    txt_feat = (
        torch.cat(txt_feat_parts) if txt_feat_parts else torch.zeros(0, embed_dim, device=device)
    )
    img_feat_all = all_gather_rows(img_feat, n_img)
    txt_feat_all = all_gather_rows(txt_feat, n_txt)

    # ---- 2. ITC ranks and top-k of this rank's queries
    txt2img = torch.tensor(data.txt2img, dtype=torch.long, device=device)
    sims_i2t = img_feat_all[local_img.start : local_img.stop] @ txt_feat_all.t()
    img_index = torch.arange(local_img.start, local_img.stop, device=device)
    pos_i2t = txt2img[None, :] == img_index[:, None]
    itc_txt_ranks = positive_ranks(sims_i2t, pos_i2t)
    i2t_cand = _stable_topk(sims_i2t, k_i2t)
    i2t_itc = sims_i2t.gather(1, i2t_cand)
    del sims_i2t, pos_i2t

    sims_t2i = txt_feat_all[local_txt.start : local_txt.stop] @ img_feat_all.t()
    own_image = txt2img[local_txt.start : local_txt.stop]
    pos_t2i = torch.arange(n_img, device=device)[None, :] == own_image[:, None]
    itc_img_ranks = positive_ranks(sims_t2i, pos_t2i)
    t2i_cand = _stable_topk(sims_t2i, k_t2i)
    t2i_itc = sims_t2i.gather(1, t2i_cand)
    del sims_t2i, pos_t2i

    t2i_cand_all = all_gather_rows(t2i_cand, n_txt)

    # ---- 3. ITM on the pairs whose image lives here (each distinct pair once)
    i2t_codes = img_index[:, None] * n_txt + i2t_cand
    t2i_text = torch.arange(n_txt, device=device)[:, None].expand_as(t2i_cand_all)
    t2i_local = (t2i_cand_all >= local_img.start) & (t2i_cand_all < local_img.stop)
    t2i_codes = t2i_cand_all * n_txt + t2i_text
    codes = torch.unique(torch.cat([i2t_codes.flatten(), t2i_codes[t2i_local]]))  # sorted
    pair_batches = [codes[s : s + batch_size] for s in range(0, codes.numel(), batch_size)]

    def itm_logits(batch_codes: torch.Tensor) -> torch.Tensor:
        images, texts = batch_codes // n_txt, batch_codes % n_txt
        unique_images, rows = torch.unique(images, return_inverse=True)
        if image_embeds is None:  # a dummy call on a rank without images
            embeds = torch.zeros(1, 1, model.visual_encoder.width, device=device, dtype=dtype)
            rows = torch.zeros_like(rows)
        else:
            embeds = image_embeds.index_select(0, unique_images - local_img.start)
        texts_cpu = texts.cpu()
        logits = model.itm_logits(embeds, all_ids[texts_cpu].to(device),
                                  all_mask[texts_cpu].to(device), rows)  # fmt: skip
        return logits.float()[:, 1]

    bar.reset(len(pair_batches))
    dummy_pair = torch.full((1,), local_img.start * n_txt, dtype=torch.long, device=device)
    pair_scores = []
    for _, logits in run_balanced(
        pair_batches, len(pair_batches), itm_logits, dummy_pair, balanced
    ):
        pair_scores.append(logits)
        bar.update("ITM rerank")
    bar.close()
    scores = torch.cat(pair_scores) if pair_scores else torch.zeros(0, device=device)

    def lookup(query_codes: torch.Tensor) -> torch.Tensor:
        return scores[torch.searchsorted(codes, query_codes)]

    i2t_itm = lookup(i2t_codes) if codes.numel() else torch.zeros_like(i2t_itc)
    t2i_itm = torch.zeros(t2i_cand_all.shape, device=device, dtype=torch.float32)
    if t2i_local.any():
        t2i_itm[t2i_local] = lookup(t2i_codes[t2i_local])
    all_reduce_sum(t2i_itm)

    # ---- gather this rank's rows; final ranks (identical on every rank)
    i2t_cand = all_gather_rows(i2t_cand, n_img)
    i2t_itc = all_gather_rows(i2t_itc, n_img)
    i2t_itm = all_gather_rows(i2t_itm, n_img)
    t2i_itc = all_gather_rows(t2i_itc, n_txt)
    itc_txt_ranks = all_gather_rows(itc_txt_ranks, n_img)
    itc_img_ranks = all_gather_rows(itc_img_ranks, n_txt)

    all_images = torch.arange(n_img, device=device)
    reranked_txt = positive_ranks(i2t_itm + i2t_itc, txt2img[i2t_cand] == all_images[:, None])
    reranked_img = positive_ranks(t2i_itm + t2i_itc, t2i_cand_all == txt2img[:, None])
    txt_ranks = torch.where(reranked_txt < k_i2t, reranked_txt, itc_txt_ranks)
    img_ranks = torch.where(reranked_img < k_t2i, reranked_img, itc_img_ranks)
    return RetrievalScores(
        i2t_candidates=i2t_cand, i2t_itc=i2t_itc, i2t_itm=i2t_itm,
        t2i_candidates=t2i_cand_all, t2i_itc=t2i_itc, t2i_itm=t2i_itm,
        itc_txt_ranks=itc_txt_ranks, itc_img_ranks=itc_img_ranks,
        txt_ranks=txt_ranks, img_ranks=img_ranks,
    )  # fmt: skip


def _stable_topk(scores: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices of the `k` best columns per row, ties by index (the order `positive_ranks` uses),
    sorting `chunk` rows at a time to bound the index memory."""
    parts = [torch.argsort(scores[s : s + chunk], dim=1, descending=True, stable=True)[:, :k]
             for s in range(0, scores.shape[0], chunk)]  # fmt: skip
    return torch.cat(parts) if parts else scores.new_zeros((0, k), dtype=torch.long)


def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Any,
    data: RetrievalData,
    k_test: int = 256,
    batch_size: int = 64,
    text_max_length: int = 35,
    image_size: int | None = None,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Recall@1/5/10 (text and image retrieval), their means, and the ITC-only numbers.

    What the pretraining recipe calls every `eval.every_steps` (collective; same arguments on
    every rank). See :func:`score_retrieval` for the arguments.

    Returns:
        `{txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean}`
        and the same keys prefixed `itc_`, percentages.

    Example:
        >>> data = load_retrieval_data("coco_karpathy_test.json", "coco/images")  # doctest: +SKIP
        >>> evaluate_retrieval(model, tokenizer, data, k_test=256)["r_mean"]  # doctest: +SKIP
        80.1
    """
    return score_retrieval(model, tokenizer, data, k_test, batch_size, text_max_length,
                           image_size, num_workers, device, progress).metrics()  # fmt: skip
