"""Video I/O: uploads (video or image, bytes or path) to RGB frames, and frames to MP4.

Frames at this boundary are ``(T, H, W, 3)`` uint8 RGB in [0, 255], upright as a player
shows them. Nothing here imports torch.
"""

from ivvae.core.strict import exact_rate
from ivvae.video.preprocess import Bucket, Plan, Preprocess
from ivvae.video.reader import (
    DEFAULT_FPS,
    VideoInfo,
    VideoLimits,
    VideoReader,
    open_frames,
    open_video,
)
from ivvae.video.writer import Mp4Writer, encode_mp4_bytes

__all__ = [
    "DEFAULT_FPS",
    "Bucket",
    "Mp4Writer",
    "Plan",
    "Preprocess",
    "VideoInfo",
    "VideoLimits",
    "VideoReader",
    "encode_mp4_bytes",
    "exact_rate",
    "open_frames",
    "open_video",
]
