"""Frame sampling as the reference's uniform strategy, decoding generated videos with PyAV."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from blip_recipes.data.video import read_video_frames, uniform_frame_indices

pytest.importorskip("av")


@pytest.mark.parametrize("frames", [1, 4, 8, 16])
def test_uniform_indices_equal_the_reference_numpy_call(frames):
    for length in list(range(1, 60)) + [300, 301, 999]:
        reference = np.arange(0, length, length / frames, dtype=int).tolist()
        assert uniform_frame_indices(length, frames) == reference, (length, frames)


def test_uniform_indices_examples():
    assert uniform_frame_indices(100, 8) == [0, 12, 24, 36, 48, 60, 72, 84]
    assert uniform_frame_indices(17, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert uniform_frame_indices(3, 4) == [0, 0, 0, 0]  # shorter than N: frame 0 repeated
    with pytest.raises(ValueError, match="num_frames"):
        uniform_frame_indices(10, 0)


def _gray_ramp(path, length=20, step=12):
    from blip_recipes.data.video import write_test_video

    frames = np.zeros((length, 32, 48, 3), np.uint8)
    for t in range(length):
        frames[t] = t * step
    write_test_video(path, frames)


def test_reads_the_sampled_frames_resized_square(tmp_path):
    _gray_ramp(tmp_path / "ramp.mp4")
    frames = read_video_frames(tmp_path / "ramp.mp4", num_frames=8, size=16)
    assert frames.shape == (8, 3, 16, 16) and frames.dtype == torch.uint8
    # frame i*2 of the ramp has gray level 24*i (lossy codec, limited-range YUV: a few levels off)
    levels = frames[:, :, 4:12, 4:12].float().mean(dim=(1, 2, 3))
    np.testing.assert_allclose(levels.numpy(), [24 * i for i in range(8)], atol=6)


def test_unreadable_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"nothing here")
    with pytest.raises(ValueError, match="not_a_video.mp4"):
        read_video_frames(bad, 4, 16)


def test_without_av_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(ImportError) as info:
        read_video_frames("x.mp4", 4, 16)
    assert str(info.value) == "video decoding needs PyAV: pip install blip-recipes[video]"
