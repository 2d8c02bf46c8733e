"""Encode RGB frames into an H.264 MP4, streaming, with the exact size and frame rate.

Size. H.264 in 4:2:0 (``yuv420p``, what every browser and hardware decoder plays) cannot
describe an odd width or height: the SPS cropping that turns the coded macroblocks back
into the picture size counts in units of 2 luma samples for 4:2:0 (H.264 7.4.2.1.1), and
libx264 refuses odd sizes. So:

* even ``width`` and ``height``: ``yuv420p``, High profile;
* an odd ``width`` or ``height``: ``yuv444p``, High 4:4:4 Predictive profile. libx264 pads
  the picture internally (replicating the edge) and writes SPS cropping in units of one
  sample, so every decoder reports exactly ``width x height``: FFmpeg and everything built
  on it (PyAV, ffplay, mpv, VLC). Browsers and hardware decoders mostly do not play 4:4:4.

The alternative, an even 4:2:0 picture plus a ``clap`` (clean aperture) box in the MP4,
plays everywhere but is cropped almost nowhere: with FFmpeg 8 through PyAV the frames of
such a file decode at the padded size (container cropping is applied by the ``ffmpeg``
command-line tool, not by libavcodec, and PyAV cannot see it), so ``open_video`` and most
players would get one row or column too many.

Frame rate. The rate is a fraction, the closest one to ``fps`` with a denominator up to
1001, and the stream's time base is its inverse, so 24, 25, 29.97 (2997/100) and
30000/1001 (pass a ``Fraction``) come back exactly as the file's average frame rate.

Colour. RGB is converted with the BT.709 matrix to limited-range YUV, and the stream is
tagged BT.709, so decoders convert back with the same matrix.

Shape. Pixels are square unless ``sample_aspect_ratio`` says otherwise (frames of an
anamorphic clip kept at their stored size): then the H.264 VUI and the MP4 ``pasp`` box
carry it, and players stretch the picture to its displayed shape.
"""

from __future__ import annotations

import contextlib
import io
import os
from fractions import Fraction
from types import TracebackType
from typing import Protocol

import av
import numpy as np
import numpy.typing as npt
from av.container import OutputContainer
from av.video.frame import VideoFrame
from av.video.reformatter import ColorRange, Colorspace
from av.video.stream import VideoStream

from ivvae.core.names import DEFAULT_CRF
from ivvae.core.strict import MAX_SAR, MIN_SAR, exact_rate
from ivvae.video.reader import SWSCALE_THREADS

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
_ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_BT709 = 1  # AVCOL_PRI_BT709 == AVCOL_TRC_BT709 == AVCOL_SPC_BT709
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG
# A sink we cannot seek gets a fragmented MP4: the index comes first, then fragments.
_FRAGMENTED_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class ByteSink(Protocol):
    """Where an MP4 can go: anything with ``write``; ``seek``/``tell``/``seekable`` help."""

    def write(self, data: bytes, /) -> object: ...


class Mp4Writer:
    """A streaming H.264/MP4 encoder for ``(n, H, W, 3)`` uint8 RGB frames.

    ``sink`` is a path (written with the index at the front, "faststart", for progressive
    playback) or a binary file object (index at the end when it is seekable, a fragmented
    MP4 when it is not; the caller keeps ownership and closes it). Any ``width, height >= 1``
    works; see the module docstring for odd sizes. ``crf`` (0-51, lower is better) and
    ``preset`` are libx264's. ``sample_aspect_ratio``: how wide a pixel is shown for 1 high
    (see the module docstring). Use as a context manager, or call ``close`` to flush.
    """

    def __init__(
        self,
        sink: str | os.PathLike[str] | ByteSink,
        *,
        width: int,
        height: int,
        fps: float | Fraction,
        crf: int = DEFAULT_CRF,
        preset: str = "medium",
        sample_aspect_ratio: Fraction = Fraction(1),
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be at least 1, got {width}x{height}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        if preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {X264_PRESETS}, got {preset!r}")
        if not MIN_SAR <= sample_aspect_ratio <= MAX_SAR:
            raise ValueError(f"sample_aspect_ratio must be in [{MIN_SAR}, {MAX_SAR}], got "
                             f"{sample_aspect_ratio}")
        rate = exact_rate(fps)
        self.width = width
        self.height = height
        self.rate = rate
        self.frames_written = 0
        self._pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"

        if isinstance(sink, (str, os.PathLike)):
            # "file:" keeps FFmpeg from reading the path as some other protocol's URL.
            target: str | ByteSink = "file:" + os.path.abspath(os.fspath(sink))
            movflags = "+faststart"
        else:
            target = sink
            seekable = getattr(sink, "seekable", None)
            movflags = "" if seekable is not None and seekable() else _FRAGMENTED_MOVFLAGS
        container_options = {"movflags": movflags} if movflags else {}
        self._container: OutputContainer = av.open(
            target, mode="w", format="mp4", container_options=container_options
        )
        try:
            self._stream: VideoStream = self._container.add_stream(
                "libx264", rate=rate, options={"crf": str(crf), "preset": preset}
            )
            self._stream.width = width
            self._stream.height = height
            self._stream.pix_fmt = self._pix_fmt
            self._stream.time_base = Fraction(rate.denominator, rate.numerator)
            codec_context = self._stream.codec_context
            codec_context.thread_count = _ENCODE_THREADS
            codec_context.color_primaries = _BT709
            codec_context.color_trc = _BT709
            codec_context.colorspace = _BT709
            codec_context.color_range = _LIMITED_RANGE
            if sample_aspect_ratio != 1:  # square pixels: the stream says nothing, as before
                codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
        except BaseException:
            self._container.close()
            raise
        self._closed = False

    def write(self, frames: npt.NDArray[np.uint8]) -> None:
        """Append ``frames``, ``(n, H, W, 3)`` uint8 RGB with ``H, W`` = ``height, width``."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != expected or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be (n, {self.height}, {self.width}, 3) uint8, "
                f"got {frames.shape} {frames.dtype}"
            )
        for image in frames:
            rgb = VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            yuv = rgb.reformat(
                format=self._pix_fmt,
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
                threads=SWSCALE_THREADS,  # fork-safe: see ivvae.video.reader
            )
            yuv.pts = self.frames_written
            self.frames_written += 1
            for packet in self._stream.encode(yuv):
                self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finish the file.

        A writer that was given no frames leaves a file object empty and creates no file at
        a path (PyAV starts the MP4 with the first packet): there is no MP4 without frames.
        """
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # The file is unusable anyway; do not hide the original error behind a flush error.
        with contextlib.suppress(Exception):
            self.close()


def encode_mp4_bytes(
    frames: npt.NDArray[np.uint8],
    fps: float | Fraction,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
) -> bytes:
    """``(T, H, W, 3)`` uint8 RGB frames as the bytes of an MP4 file (see ``Mp4Writer``)."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    buffer = io.BytesIO()
    with Mp4Writer(
        buffer, width=frames.shape[2], height=frames.shape[1], fps=fps, crf=crf, preset=preset
    ) as writer:
        writer.write(frames)
    return buffer.getvalue()
