"""Zero-shot video-text retrieval with an image-text model (the reference's
`eval_retrieval_video.py`), on the image retrieval protocol of :mod:`.retrieval`.

A video is N frames (:func:`blip_recipes.data.video.uniform_frame_indices`), each resized to
the model's square input and encoded by the ViT on its own:

- ITC feature: each frame's `[CLS]` through `vision_proj`, the N projections averaged, then
  unit-normalised (the mean is taken before normalising, as the reference does);
- ITM: the N frames' token embeddings concatenated into one sequence of N x (1 + patches)
  tokens the text encoder cross-attends.

Texts are scored as for images (`[CLS]` / `[ENC]`, 35 tokens); every query's top `k_test`
candidates by ITC are reranked with ITM logit + ITC similarity. Recalls are reported with the
reference's names: `txt_r*` for video queries ranking texts, `vid_r*` for text queries ranking
videos, and the median rank `vid_mdR` (plus `txt_mdR`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from blip_recipes.data import normalize_images, pre_caption
from blip_recipes.data.video import read_video_frames
from blip_recipes.evaluation._dist import is_sharded
from blip_recipes.evaluation.metrics import median_rank, retrieval_metrics
from blip_recipes.evaluation.retrieval import RetrievalScores, score_retrieval
from blip_recipes.evaluation.retrieval_data import RetrievalData
from blip_recipes.models.inputs import model_image_size

VIDEO_KEYS = ("video", "clip_name")


def _read_records(path: Path) -> list[Any]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def load_video_retrieval_data(
    annotation: str, video_root: str = "", max_words: int = 40, suffix: str = ".mp4"
) -> RetrievalData:
    """Read MSRVTT-style test annotations (JSON list or JSONL).

    Each record names a video, by `"video"` (a path) or `"clip_name"` (the reference's
    MSRVTT files: `<video_root>/<clip_name><suffix>`), and a `"caption"` (text or list of
    texts). Records of the same video are merged, so a video may have several captions.
    Captions are cleaned with `pre_caption(text, max_words)` (40 words in the reference).

    Returns:
        `RetrievalData` whose `images` are the video paths.

    Raises:
        ValueError: naming the file, the record and what it lacks.
    """
    path = Path(annotation)
    records = _read_records(path)
    index_of: dict[str, int] = {}
    videos: list[str] = []
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    root = Path(video_root) if video_root else None
    for number, record in enumerate(records):
        where = f"{path} record {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if "video" in record:
            name = str(record["video"])
        elif "clip_name" in record:
            name = str(record["clip_name"]) + suffix
        else:
            raise ValueError(f"{where}: no video: expected a 'video' path or a 'clip_name'")
        captions = record.get("caption")
        if isinstance(captions, str):
            captions = [captions]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{where}: 'caption' must be a text or a non-empty list of texts")
        video = str(root / name) if root is not None else name
        if video not in index_of:
            index_of[video] = len(videos)
            videos.append(video)
            img2txt.append([])
        v = index_of[video]
        for caption in captions:
            img2txt[v].append(len(texts))
            texts.append(pre_caption(caption, max_words))
            txt2img.append(v)
    return RetrievalData(videos, texts, txt2img, img2txt)


def missing_videos(data: RetrievalData) -> list[str]:
    """The video paths of `data` that are not files."""
    return [str(v) for v in data.images if isinstance(v, (str, Path)) and not Path(v).is_file()]


class _Videos(Dataset):
    def __init__(self, videos: Sequence[Any], indices: range, num_frames: int, size: int) -> None:
        self.videos, self.indices = videos, indices
        self.num_frames, self.size = num_frames, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        ref = self.videos[self.indices[i]]
        if isinstance(ref, torch.Tensor):
            return ref
        return read_video_frames(ref, self.num_frames, self.size)


class VideoInputs:
    """Videos as retrieval inputs: N uniformly sampled frames per video (see module doc).

    `RetrievalData.images` entries are video paths, or uint8 (N, 3, s, s) frame tensors
    already at the evaluation size.
    """

    def __init__(self, num_frames: int, image_size: int) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames, self.image_size = num_frames, image_size

    def dataset(self, items: Sequence[Any], indices: range) -> Dataset:
        """uint8 (N, 3, s, s) frames of `items[indices]`, decoded in the loader's workers."""
        return _Videos(items, indices, self.num_frames, self.image_size)

    def dummy(self) -> torch.Tensor:
        """(1, N, 3, s, s) zeros."""
        s = self.image_size
        return torch.zeros(1, self.num_frames, 3, s, s, dtype=torch.uint8)

    def encode(
        self, model: nn.Module, batch: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, N, 3, s, s) -> (B, N * (1 + patches), D_vision) concatenated frame tokens
        and the (B, E) unit-norm mean of the frames' projected `[CLS]`."""
        b, n = batch.shape[:2]
        if n != self.num_frames:
            raise ValueError(f"got {n} frames per video, expected {self.num_frames}")
        frames = model.visual_encoder(normalize_images(batch.flatten(0, 1), dtype))
        projected = model.vision_proj(frames[:, 0]).float().view(b, n, -1).mean(dim=1)
        with torch.autocast(device_type=projected.device.type, enabled=False):
            feat = F.normalize(projected, dim=-1)
        return frames.reshape(b, n * frames.shape[1], frames.shape[2]), feat


@torch.no_grad()
def score_video_retrieval(
    model: nn.Module,
    tokenizer: Any,
    data: RetrievalData,
    num_frames: int = 8,
    k_test: int = 128,
    batch_size: int = 16,
    text_max_length: int = 35,
    image_size: int | None = None,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> RetrievalScores:
    """ITC for every video-text pair, ITM rerank of each query's top `k_test`.

    Collective under a process group (call on every rank with the same data); each rank
    decodes, encodes and reranks its share. The model must be replicated (not FSDP2-sharded):
    the frame features go through `vision_proj` outside the model's entry points.

    Args:
        model: a `BlipPretrain`-like model (`visual_encoder`, `vision_proj`, text entry points).
        data: videos (paths or frame tensors), captions and their correspondence.
        num_frames: frames per video (8 in the reference's MSRVTT evaluation).
        k_test: candidates reranked per query (128 in the reference).
        batch_size: videos, texts or video-text pairs per forward.
        image_size: frame side; default the model's native input size.
        Other arguments as :func:`blip_recipes.evaluation.retrieval.score_retrieval`.

    Returns:
        `RetrievalScores` (images = videos), identical on every rank.
    """
    if is_sharded(model):
        raise ValueError("video retrieval scores a replicated model, not an FSDP2-sharded one")
    inputs = VideoInputs(num_frames, image_size or model_image_size(model))
    return score_retrieval(model, tokenizer, data, k_test=k_test, batch_size=batch_size,
                           text_max_length=text_max_length, num_workers=num_workers,
                           device=device, progress=progress, inputs=inputs)  # fmt: skip


def video_retrieval_metrics(scores: RetrievalScores) -> dict[str, float]:
    """Recall@1/5/10, means and median ranks with the reference's video names.

    Returns:
        `{txt_r1, txt_r5, txt_r10, txt_r_mean, txt_mdR, vid_r1, vid_r5, vid_r10, vid_r_mean,
        vid_mdR, r_mean}` (percentages; median ranks 1-based) and the same prefixed `itc_` for
        ITC alone.
    """
    out: dict[str, float] = {}
    for prefix, txt, vid in (("", scores.txt_ranks, scores.img_ranks),
                             ("itc_", scores.itc_txt_ranks, scores.itc_img_ranks)):  # fmt: skip
        txt, vid = txt.cpu(), vid.cpu()
        for key, value in retrieval_metrics(txt, vid, prefix).items():
            out[key.replace(f"{prefix}img_", f"{prefix}vid_")] = value
        out[f"{prefix}txt_mdR"] = median_rank(txt)
        out[f"{prefix}vid_mdR"] = median_rank(vid)
    return out


__all__ = [
    "VideoInputs",
    "load_video_retrieval_data",
    "missing_videos",
    "score_video_retrieval",
    "video_retrieval_metrics",
]
