"""Video frames for zero-shot video-text retrieval: which frames, decoded how.

Decoding goes through PyAV (FFmpeg), an optional extra: ``pip install blip-recipes[video]``.
Frames come out as uint8 (N, 3, size, size) tensors, each frame resized to a square with
libswscale (the aspect ratio is not kept, as the reference's decord reader with a fixed
width and height does not keep it), ready for :func:`blip_recipes.data.normalize_images`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

VIDEO_EXTRA_HINT = "video decoding needs PyAV: pip install blip-recipes[video]"


def require_av() -> Any:
    """The `av` module, or an ImportError whose one line says how to install it."""
    try:
        import av
    except ImportError:
        raise ImportError(VIDEO_EXTRA_HINT) from None
    return av


def uniform_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """The frames the reference's "uniform" sampling reads: `i * (V // N)` for i < N.

    The reference asks numpy for ``arange(0, V, V / N, dtype=int)``; with an integer dtype
    numpy steps by the truncated step, so frame i is ``i * floor(V / N)``: it starts at frame
    0, strides by a whole number of frames and may leave up to N - 1 frames at the end unseen.
    A video shorter than N frames (stride 0) repeats its first frame N times, as there.

    Example:
        >>> uniform_frame_indices(100, 8)
        [0, 12, 24, 36, 48, 60, 72, 84]
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_video_frames < 1:
        raise ValueError("the video has no frames")
    stride = num_video_frames // num_frames
    return [i * stride for i in range(num_frames)]


def _count_frames(container: Any, stream: Any) -> int:
    """Frames of the stream: the container's count when it records one, else its packets."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0, stream=stream)
    return count


def read_video_frames(path: str | os.PathLike, num_frames: int, size: int) -> torch.Tensor:
    """Decode the :func:`uniform_frame_indices` frames of a video file.

    Args:
        path: a video file FFmpeg can read (mp4, webm, avi...).
        num_frames: N, frames per video.
        size: side of the square each frame is resized to.

    Returns:
        uint8 (N, 3, size, size).

    Raises:
        ImportError: PyAV is not installed (one line naming the extra).
        ValueError: the file is not a readable video (naming it).
    """
    av = require_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            stream = container.streams.video[0]
            wanted = uniform_frame_indices(_count_frames(container, stream), num_frames)
            picked: dict[int, np.ndarray] = {}
            last = max(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    rgb = frame.reformat(width=size, height=size, format="rgb24")
                    picked[index] = rgb.to_ndarray()
                if index >= last:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None
    if not picked:
        raise ValueError(f"cannot decode video {path}: no frame decoded")
    # A recorded count larger than what decodes: the missing tail repeats the last decoded frame.
    frames = [picked.get(i, picked[max(k for k in picked if k <= i)]) for i in wanted]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def write_test_video(
    path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4"
) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames to a video file (small generated test videos)."""
    av = require_av()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


__all__ = [
    "VIDEO_EXTRA_HINT",
    "read_video_frames",
    "require_av",
    "uniform_frame_indices",
    "write_test_video",
]
