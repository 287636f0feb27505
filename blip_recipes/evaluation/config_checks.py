"""The [video] section's checks: frame count, annotations, the video files, PyAV installed.

They run when `video.annotation` is set (the video retrieval configs), so `blip validate`
names a missing video or a missing PyAV before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from blip_recipes.config.checks import LaunchContext, register_validator
from blip_recipes.config.sections import Config


def _examples(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


@register_validator
def _video(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    video = cfg.video
    if video.num_frames < 1:
        yield f"'video.num_frames' must be positive, got {video.num_frames}"
    if not video.annotation:
        return
    if not Path(video.annotation).is_file():
        yield f"'video.annotation' {video.annotation} does not exist (or is not a file)"
        return
    if video.root and not Path(video.root).is_dir():
        yield f"'video.root' {video.root} is not a folder (it does not exist)"
        return
    from blip_recipes.data.video import VIDEO_EXTRA_HINT

    try:
        import av  # noqa: F401
    except ImportError:
        yield f"'video.annotation' is set: {VIDEO_EXTRA_HINT}"
    from blip_recipes.evaluation.video_retrieval import load_video_retrieval_data, missing_videos

    try:
        data = load_video_retrieval_data(video.annotation, video.root, suffix=video.suffix)
    except ValueError as e:
        yield f"'video.annotation': {e}"
        return
    missing = missing_videos(data)
    if missing:
        yield (
            f"'video.annotation' names {len(missing)} of {len(data.images)} videos that are not "
            f"files: {_examples(missing)} (video.root={video.root!r}, video.suffix="
            f"{video.suffix!r})"
        )
