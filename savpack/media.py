"""The pictures an item shows the model: its images, and frames sampled uniformly from its videos.

Videos are decoded with PyAV (the optional extra `savpack[video]`: FFmpeg's libraries in a wheel) and reach the model
as images, one per frame, so every image-text family takes them without a video processor (docs/decisions.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from savpack_runtime.files import check_file
from savpack_runtime.format import DEFAULT_VIDEO_FRAMES
from savpack_runtime.images import load_image, to_rgb
from savpack_runtime.items import Example

from .errors import DataError



def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included; repeats when total < count."""
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def _open_video(path: Path):
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: reading videos needs PyAV: pip install 'savpack[video]'") from None
    check_file(path, DataError, "video file")  # before PyAV opens it: a FIFO would block, a device never end
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode video: {exc}") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: holds no video stream")
    return container


def check_video(path: str | Path) -> None:
    """Fail early (before any model work) on a video PyAV cannot open, or one without a video stream."""
    _open_video(Path(path)).close()


def sample_video_frames(path: str | Path, count: int = DEFAULT_VIDEO_FRAMES) -> list[Image.Image]:
    """Exactly `count` RGB frames sampled uniformly over the video's length (one decode pass, stopping early)."""
    if count < 1:
        raise DataError(f"video frames must be >= 1, got {count}")
    path = Path(path)
    container = _open_video(path)
    import av  # importable: _open_video has imported it

    try:
        with container:
            stream = container.streams.video[0]
            # Containers that do not store the frame count (Matroska, WebM) are counted by their packets: no decoding.
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise DataError(f"{path}: video holds no frames")
            wanted = frame_indices(total, count)
            container.seek(0)
            picked: dict[int, Image.Image] = {}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    picked[index] = to_rgb(frame.to_image())
                if index >= wanted[-1]:
                    break
    except DataError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode video: {exc}") from None
    missing = [index for index in wanted if index not in picked]
    if missing:
        raise DataError(f"{path}: video declares {total} frames but frame {missing[0]} does not decode (truncated file?)")
    return [picked[index] for index in wanted]


def load_media(example: Example, video_frames: int = DEFAULT_VIDEO_FRAMES) -> list[Image.Image]:
    """The item's pictures in prompt order (Example.media): each image, and `video_frames` frames per video."""
    pictures: list[Image.Image] = []
    for kind, path in example.media():
        if kind == "image":
            pictures.append(load_image(path))
        else:
            pictures.extend(sample_video_frames(path, video_frames))
    return pictures
