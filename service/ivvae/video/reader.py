"""Decode an uploaded video (or image) into RGB frames, within limits, with PyAV.

``open_video`` is the only way in. It opens the container, picks the first video stream,
checks the limits against what the headers say, and decodes the first frame (which tells
the orientation, see ``ivvae.video.orientation``, and proves the data decodes) before it
returns. ``VideoReader.iter_frames``
then streams the rest in chunks.

Every refusal is one of the service's errors (``ivvae.errors``):

================================================  ===================
empty bytes or empty file                          ``EmptyInput``
a path that cannot be read                         ``InvalidInput``
not media, a format we do not accept, no video     ``UnsupportedMedia``
recognised container that does not decode          ``CorruptMedia``
Matroska/WebM ending > 2 frames before its         ``CorruptMedia``
declared stream duration (a truncated upload)
MP4/MOV whose ``mdat``/``moof`` box, AVI whose      ``CorruptMedia``
``RIFF`` chunk, Matroska/WebM whose ``Cluster``
or ``Segment`` (before its index) runs past the
end of the file (a truncated upload)
over ``VideoLimits`` (pixels per frame, frames)    ``TooLarge``
================================================  ===================

How the pixel limit is kept without allocating an oversized frame: FFmpeg's
``avformat_find_stream_info`` decodes a frame or more to fill in stream parameters, so it
runs with the decoder option ``max_pixels`` set to (a little over, see
``_DECODER_CAP_FACTOR``) the limit. A decoder then refuses, before allocating, any picture
over it, and the stream comes back with a size of 0x0. Only then is the declared size
looked up, in a second open with every decoder disabled (the size from the container
header) or, for still images and Y4M, from the PNG/JPEG/Y4M header itself; it picks
``TooLarge`` over ``CorruptMedia``, also where FFmpeg refuses to open a header of such a
size. The decoder used for the frames gets the same ``max_pixels``, and the limit proper
is checked against the real size of the first frame.

Security: only the demuxers in ``ALLOWED_DEMUXERS`` may open an upload, and no protocol may
be opened from inside one, so a playlist (HLS, concat, ...) cannot make FFmpeg fetch URLs or
read local files. Paths are opened by Python, never handed to FFmpeg as URLs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import Any, BinaryIO, TypeVar, cast

import av
import av.error
import numpy as np
import numpy.typing as npt
from av.container import InputContainer
from av.stream import Discard
from av.video.codeccontext import VideoCodecContext
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from ivvae.core.strict import MAX_FPS, MAX_SAR, MIN_FPS, MIN_SAR, exact_rate
from ivvae.errors import CorruptMedia, EmptyInput, InvalidInput, TooLarge, UnsupportedMedia
from ivvae.video import orientation, sniff
from ivvae.video.orientation import Orientation
from ivvae.video.preprocess import FrameSelector, Plan, Preprocess

# Frame rate reported for still images and for streams that declare none (or a nonsense one).
DEFAULT_FPS = 24.0
# Rates outside [MIN_FPS, MAX_FPS] are treated as undeclared: broken timestamps produce
# 90000/1, and the writer could not carry them (see ivvae.strict).

# FFmpeg demuxers an upload may be opened with (any alias of a demuxer's name matches).
# Audio-only formats are included so that their refusal says "no video stream".
ALLOWED_DEMUXERS = (
    "mov",  # mov,mp4,m4a,3gp,3g2,mj2
    "matroska",  # matroska,webm
    "avi",
    "gif",
    "apng",
    "flv",
    "mpegts",
    "mpeg",
    "ogg",
    "asf",
    "ivf",
    "yuv4mpegpipe",
    "h264",
    "hevc",
    "m4v",
    "obu",
    "mjpeg",
    "png_pipe",
    "jpeg_pipe",
    "webp_pipe",
    "bmp_pipe",
    "tiff_pipe",
    "mp3",
    "wav",
    "flac",
    "aac",
)
# FFmpeg's image2pipe demuxers ("png_pipe", ...) read still images.
_STILL_IMAGE_SUFFIX = "_pipe"

# FFmpeg's default is 1000, and opening probes every stream: a 1.2 MB MP4 of 1000 one-frame
# streams took 760 MB before a frame was read (0.76 MB a stream). Real files hold a video,
# audio tracks and subtitles, a broadcast capture a few programs of them, a Blu-ray's .m2ts
# some tens; past this a stream fails as ENOMEM (MP4 when opened, MPEG-TS and Matroska while
# read).
MAX_STREAMS = 256
_TOO_MANY_STREAMS = f"the container holds more than {MAX_STREAMS} streams, or is damaged"
_CONTAINER_OPTIONS = {
    "format_whitelist": ",".join(ALLOWED_DEMUXERS),
    # No protocol has this name, so nothing can be opened from inside the upload.
    "protocol_whitelist": "none",
    "max_streams": str(MAX_STREAMS),
}
_OPEN_TIMEOUT_S = 30.0  # probing the container and its streams
_READ_TIMEOUT_S = 30.0  # one packet read
_IO_BUFFER_BYTES = 1 << 18
# Decoders allocate whole macroblocks/superblocks (1920x1080 H.264 is decoded as 1920x1088)
# and check FFmpeg's ``max_pixels`` against that padded size, so their cap leaves room;
# the limit itself is checked against the real frame size.
_DECODER_CAP_FACTOR = 2
_DECODER_CAP_SLACK = 256 * 256
# swscale without slice threads. A frame's converter owns its threads, and frames can outlive
# a read in reference cycles: after a fork (a DataLoader worker) the child's garbage collector
# frees them and waits forever for threads that only the parent had. One thread converts as
# fast here (a 4K frame to 455x256: 7 ms against 9 ms with threads), with identical output.
SWSCALE_THREADS = 1
# Decoder threads per open video; the service decodes several uploads at once.
_DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))

Frames = npt.NDArray[np.uint8]


# How much larger than the frame limits the picture scaled to cover an exact size may be
# before it is cropped (a 4:3 clip upscaled to cover a 1920x1080 bucket is 1.33x).
_SCALED_PIXELS_FACTOR = 4
# How many frames fewer than its sample count a stream's declared duration must show
# before the duration is believed (see ``_frame_count``).
_EDIT_SLACK_FRAMES = 1.0


@dataclass(frozen=True)
class VideoLimits:
    """What an upload may not exceed.

    ``max_frames`` and ``max_pixels`` (per frame, width * height) bound what comes out,
    after preprocessing; ``max_source_pixels`` (``None``: ``max_pixels``) and
    ``max_source_seconds`` (``None``: no limit) bound the upload itself, checked against
    its headers before decoding and against what decodes.
    """

    max_frames: int = 2048
    max_pixels: int = 1920 * 1088
    max_source_pixels: int | None = None
    max_source_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_pixels < 1 or (self.max_source_pixels or 1) < 1 or (
                self.max_source_seconds is not None and not self.max_source_seconds > 0):
            raise ValueError(f"limits must be positive, got {self}")

    @property
    def source_pixels(self) -> int:
        return self.max_source_pixels or self.max_pixels


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, as a player shows it.

    ``width`` and ``height`` are the size of the upright picture in pixels, the frames
    that come out without resizing: after ``rotation``, the clockwise
    rotation in degrees (0, 90, 180 or 270) that was applied to the coded pictures, as
    the container's display matrix or a JPEG's EXIF orientation asks (a mirrored picture,
    rare, is also flipped left-right after the turn; see ``ivvae.video.orientation``).
    ``sample_aspect_ratio`` is how wide a pixel of that upright picture is shown for 1
    high: 1 for square pixels, 32/27 for a 16:9 DVD (for a quarter turn, the inverse of
    the stream's). A player shows the picture ``display_width`` x ``display_height``
    (the stored width scaled by the stream's SAR, rounded, then turned): that is the size
    ``resize`` and ``bucket`` plan from (see ``ivvae.video.preprocess``).
    ``fps`` is the average frame rate, or
    ``DEFAULT_FPS`` for still images and streams that declare none. ``num_frames`` is the
    count the container declares (fewer than its samples where an edit list trims the
    stream, as its duration shows), or an estimate from its duration, or ``None``; the
    frames actually decoded are authoritative. ``codec`` is FFmpeg's decoder name
    (``"h264"``) and ``container`` its demuxer name (``"mov,mp4,m4a,3gp,3g2,mj2"``).
    """

    width: int
    height: int
    fps: float
    num_frames: int | None
    codec: str
    container: str
    rotation: int
    sample_aspect_ratio: Fraction = Fraction(1)

    @property
    def still(self) -> bool:
        """A still image (FFmpeg's image demuxers), not a video."""
        return self.container.endswith(_STILL_IMAGE_SUFFIX)

    @property
    def display_width(self) -> int:
        if self.rotation % 180:
            return self.width
        return max(1, round(self.width * self.sample_aspect_ratio))

    @property
    def display_height(self) -> int:
        if self.rotation % 180:  # the stored width, shown SAR wider, became the height
            return max(1, round(self.height / self.sample_aspect_ratio))
        return self.height


class _Source:
    """An upload as bytes or a path, which can be opened more than once."""

    def __init__(self, source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> None:
        self._data: bytes | None = None
        self._path: str | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._data = bytes(source)
            if not self._data:
                raise EmptyInput("the upload is empty")
            self.head = self._data[: sniff.HEAD_BYTES]
            return
        self._path = os.fspath(source)
        try:
            with open(self._path, "rb") as file:
                self.head = file.read(sniff.HEAD_BYTES)
        except OSError as exc:
            raise InvalidInput(f"cannot read {self._path!r}: {exc.strerror or exc}") from exc
        if not self.head:
            raise EmptyInput(f"{self._path!r} is empty")

    def open(self) -> BinaryIO:
        if self._data is not None:
            return io.BytesIO(self._data)
        assert self._path is not None
        try:
            file = open(self._path, "rb")  # noqa: SIM115 (the caller closes it)
        except OSError as exc:
            raise InvalidInput(f"cannot read {self._path!r}: {exc.strerror or exc}") from exc
        # PyAV hands FFmpeg the file's name, and FFmpeg's probe can trust a ".jpg" suffix over
        # the content: it picked the file-pattern demuxer "image2" (off the whitelist) and
        # camera JPEGs opened by path failed as corrupt. Content alone decides, as for bytes.
        cast(Any, file.raw).name = "upload"
        return file


def _open_container(
    source: _Source, *, options: dict[str, str], container_options: dict[str, str]
) -> tuple[InputContainer, BinaryIO]:
    file = source.open()
    try:
        container = av.open(
            file,
            mode="r",
            options=options,
            container_options={**_CONTAINER_OPTIONS, **container_options},
            buffer_size=_IO_BUFFER_BYTES,
            timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S),
        )
    except av.error.ExitError as exc:
        file.close()
        raise CorruptMedia("the container could not be read in time") from exc
    except av.error.MemoryError as exc:  # what a stream past max_streams fails as
        file.close()
        raise CorruptMedia(_TOO_MANY_STREAMS) from exc
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        file.close()
        # Not media, a format off the whitelist (EINVAL), or a damaged container.
        kind = sniff.container_signature(source.head)
        if kind is None:
            raise UnsupportedMedia("not a supported video or image file") from exc
        raise CorruptMedia(f"damaged or truncated {kind} data") from exc
    except BaseException:
        file.close()
        raise
    return container, file


def _video_stream(container: InputContainer) -> VideoStream | None:
    """The first video stream that is not a cover picture (an audio file's album art)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _declared_size(source: _Source) -> tuple[int, int] | None:
    """The frame size the headers declare, found without decoding anything."""
    container, file = _open_container(
        source, options={}, container_options={"codec_whitelist": "none"}
    )
    try:
        stream = _video_stream(container)
        if stream is not None and stream.width > 0 and stream.height > 0:
            return stream.width, stream.height
    finally:
        container.close()
        file.close()
    return sniff.image_size(source.head)


_END_MARKERS = {"jpeg_pipe": (sniff.cut_jpeg, "JPEG end-of-image marker after its scan"),
                "gif": (sniff.cut_gif, "GIF trailer")}


def _check_not_cut(source: _Source, demuxer: str) -> None:
    """Refuse an MP4/MOV, AVI, Matroska/WebM, JPEG or GIF file cut inside its media data.
    FFmpeg would not: a cut between two MP4 samples ends its demuxer's packets cleanly, an
    AVI that lost its trailing index is read until the data stops, a Matroska demuxer stops
    quietly anywhere, and a GIF's at its last whole frame; the clip decodes shorter. A cut
    JPEG decodes grey where its data stopped. (MPEG-TS and raw H.264 streams have nothing
    that says where they end: a cut one decodes shorter.)"""
    if demuxer in _END_MARKERS:
        lacks, marker = _END_MARKERS[demuxer]
        if _walked(source, lacks)[0]:
            raise CorruptMedia(f"the upload is truncated: it has no {marker}")
        return
    if demuxer.startswith("mov"):
        walk, kind = sniff.cut_isobmff_box, "MP4/MOV box"
    elif demuxer == "avi":
        walk, kind = sniff.cut_avi_movi, "AVI chunk"
    elif demuxer.startswith("matroska"):
        walk, kind = sniff.cut_matroska_cluster, "Matroska/WebM element"
    else:
        return
    cut, size = _walked(source, walk)
    if cut is not None:
        box, end = cut
        raise CorruptMedia(f"the upload is truncated: its {kind} {box!r} runs to byte "
                           f"{end}, but the file ends at byte {size}")


_W = TypeVar("_W")


def _walked(source: _Source, walk: Callable[[BinaryIO, int], _W]) -> tuple[_W, int]:
    """``walk(file, size)`` over the upload, and its size."""
    file = source.open()
    try:
        size = file.seek(0, io.SEEK_END)
        return walk(file, size), size
    except OSError as exc:
        raise InvalidInput(f"the upload could not be read: {exc.strerror or exc}") from exc
    finally:
        file.close()


def _check_plan(plan: Plan, limits: VideoLimits) -> None:
    """Refuse output frames over ``max_pixels``, and an exact size so far from the clip's
    aspect ratio that scaling to cover it makes a huge picture first (``resize=1x12000``
    on a square clip scales it to 12000x12000, 432 MB a frame, to keep one column)."""
    if plan.width * plan.height > limits.max_pixels:
        raise TooLarge(f"frames of {plan.width}x{plan.height} exceed the limit of "
                       f"{limits.max_pixels} pixels")
    g = plan.geometry
    cap = _SCALED_PIXELS_FACTOR * max(limits.source_pixels, limits.max_pixels)
    if g.scaled_width * g.scaled_height > cap:
        option = "bucket" if plan.bucket is not None else "resize"
        raise TooLarge(f"option {option!r}: covering {plan.width}x{plan.height} scales the "
                       f"clip to {g.scaled_width}x{g.scaled_height} before cropping, over the "
                       f"limit of {cap} pixels; pick a size nearer the clip's aspect ratio")


def _check_declared_frames(declared: int | None, fps: float, plan: Plan,
                           limits: VideoLimits) -> None:
    """Refuse, before any frame is used, a clip whose declared frame count gives more
    output frames than ``max_frames`` under ``plan`` (the window, stride, rate and count
    options); the limit is checked again as frames come out, for headers that lie."""
    produced = plan.options.available_frames(declared, fps)
    if produced is not None and plan.frame_limit is not None:
        produced = min(produced, plan.frame_limit)
    if produced is None or produced <= limits.max_frames:
        return
    if plan.options.is_identity:
        raise TooLarge(f"the video declares {declared} frames, over the limit of "
                       f"{limits.max_frames}")
    gives = "" if produced == declared else f", which give {produced} after preprocessing"
    raise TooLarge(f"the video declares {declared} frames{gives}, over the limit of "
                   f"{limits.max_frames}; max_frames takes fewer")


def _check_pixels(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.source_pixels:
        raise TooLarge(f"frames of {width}x{height} exceed the limit of "
                       f"{limits.source_pixels} pixels")


def _sample_aspect_ratio(stream: VideoStream, still: bool) -> Fraction:
    """How wide a stored (coded, unturned) pixel is shown for 1 high, as FFmpeg's players
    decide (``av_guess_sample_aspect_ratio``: the container's, else the bitstream's), then
    the decoder's; 1 when none is set, for still images (a JPEG's or PNG's pixel density
    is no shape: image viewers and browsers show its pixels square), and for a value
    outside [1/4, 4] (a broken header, not a picture anyone shows)."""
    if still:
        return Fraction(1)
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar is not None and sar > 0:
            return Fraction(sar) if MIN_SAR <= sar <= MAX_SAR else Fraction(1)
    return Fraction(1)


def _declared_rate(stream: VideoStream, still: bool) -> float | None:
    """The frame rate the stream declares, ``None`` for still images and streams that
    declare none (or a nonsense one)."""
    if still:
        return None
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and MIN_FPS <= rate <= MAX_FPS:
            return float(rate)
    return None


def _variable_rate(stream: VideoStream) -> bool:
    """Whether the stream's frames are unevenly spaced: its average rate is not the rate
    its timestamps run at (a phone's variable-rate MP4). Matroska does not say (FFmpeg
    guesses one rate for both)."""
    average, base = stream.average_rate, stream.base_rate
    return average is not None and base is not None and average != base


def _declared_seconds(stream: VideoStream, container: InputContainer) -> float | None:
    seconds: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _stream_end(stream: VideoStream) -> float | None:
    """Where the stream declares its last frame ends, in seconds of presentation time."""
    if stream.start_time is None or stream.duration is None or stream.time_base is None:
        return None
    end = float((stream.start_time + stream.duration) * stream.time_base)
    return end if math.isfinite(end) else None


def _frame_count(stream: VideoStream, container: InputContainer, fps: float,
                 rate_declared: bool) -> tuple[int | None, bool]:
    """``(count, declared)``: the frames the stream declares (``declared``), else an
    estimate from its duration, else ``None``.

    A declared count is the stream's sample count unless its declared duration (the
    container's without one), at a rate the stream declares, shows more than a frame
    fewer: an MP4/MOV edit list (a stream-copied cut, a QuickTime trim) keeps every sample
    but shows only the edited span, and FFmpeg decodes only that. A frame of slack covers
    rounding, and a last sample stored without a duration (FFmpeg then leaves it out of
    both the duration and the average rate)."""
    seconds = _declared_seconds(stream, container)
    if stream.frames > 0:
        if (rate_declared and seconds is not None
                and stream.frames - seconds * fps > _EDIT_SLACK_FRAMES):
            return max(1, round(seconds * fps)), True
        return stream.frames, True
    return (None if seconds is None else max(1, round(seconds * fps))), False


def _tagged_duration(stream: VideoStream) -> float | None:
    """The stream's own duration from a Matroska/WebM ``DURATION`` tag (``HH:MM:SS.fff``),
    which muxers write at the end of the file; ``None`` when absent or malformed."""
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if not tag:
        return None
    try:
        hours, minutes, seconds = tag.strip().split(":")
        value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def open_video(
    source: bytes | str | os.PathLike[str], *, limits: VideoLimits = VideoLimits(),
    preprocess: Preprocess | None = None,
) -> VideoReader:
    """Open an upload (bytes) or a file (path) for decoding; see the module docstring.

    Checks the limits against the stream headers, then decodes the first frame and plans
    ``preprocess`` (``reader.plan``; see ``ivvae.video.preprocess``) for the clip: a
    declared frame count that gives more than ``limits.max_frames`` output frames under
    the plan is refused then, before any frame is used. Raises
    ``EmptyInput``, ``InvalidInput``, ``UnsupportedMedia``, ``CorruptMedia`` or
    ``TooLarge``; nothing from PyAV or the OS escapes.
    """
    src = _Source(source)
    decoder_cap = _DECODER_CAP_FACTOR * limits.source_pixels + _DECODER_CAP_SLACK
    pixel_cap = {"max_pixels": str(decoder_cap)}
    try:
        container, file = _open_container(src, options=pixel_cap, container_options={})
    except CorruptMedia:
        # A header declaring a size FFmpeg will not even open (a Y4M of 60000x60000) is
        # too large before it is damaged.
        declared = sniff.image_size(src.head)
        if declared is not None:
            _check_pixels(*declared, limits)
        raise
    try:
        _check_not_cut(src, container.format.name)
        stream = _video_stream(container)
        if stream is None:
            raise UnsupportedMedia("no video stream")
        if stream.codec_context is None:
            raise UnsupportedMedia("no decoder for the video codec")
        if stream.width > 0 and stream.height > 0:
            _check_pixels(stream.width, stream.height, limits)
        else:
            # A decoder refused an oversized picture while probing, or could not decode.
            declared = _declared_size(src)
            if declared is not None:
                _check_pixels(*declared, limits)
        seconds = _declared_seconds(stream, container)
        if (limits.max_source_seconds is not None and seconds is not None
                and seconds > limits.max_source_seconds):
            raise TooLarge(f"the video declares {seconds:.1f} s, over the limit of "
                           f"{limits.max_source_seconds:g} s")
        return VideoReader._start(container, file, stream, src, limits, pixel_cap,
                                  preprocess or Preprocess())
    except BaseException:
        container.close()
        file.close()
        raise


class VideoReader:
    """Frames of one open video, decoded on demand. Made by ``open_video``; not thread-safe.

    ``info`` describes the upload as it is; ``plan`` what preprocessing makes of it (the
    output size is ``plan.width`` x ``plan.height``, the output rate ``plan.fps``).
    Use as a context manager, or call ``close``. ``iter_frames`` can run once: decoding
    streams forward through the upload.
    """

    info: VideoInfo
    plan: Plan

    def __init__(
        self,
        container: InputContainer | None,
        file: BinaryIO | None,
        frames: Iterator[VideoFrame],
        first: VideoFrame,
        info: VideoInfo,
        orientation: Orientation,
        limits: VideoLimits,
        plan: Plan,
        declared_seconds: float | None = None,
        stream_end: float | None = None,
    ) -> None:
        self.info = info
        self.plan = plan
        self._declared_seconds = declared_seconds
        self._stream_end = stream_end
        self._container = container
        self._file = file
        self._frames = frames
        self._first: VideoFrame | None = first
        self._limits = limits
        g = plan.geometry
        # The scaled size in coded (unrotated) orientation: rotation is applied after.
        self._scaled_coded = ((g.scaled_height, g.scaled_width) if orientation.clockwise % 180
                              else (g.scaled_width, g.scaled_height))
        self._upscale = g.scaled_width * g.scaled_height > first.width * first.height
        self._orientation = orientation
        self._started = False
        self._closed = False
        self.source_frames_read = 0
        # The source frames the output came from: (index, seconds from the first frame) of
        # the first and the last one emitted (None until one is).
        self.first_used: tuple[int, float] | None = None
        self.last_used: tuple[int, float] | None = None

    @classmethod
    def _start(
        cls,
        container: InputContainer,
        file: BinaryIO,
        stream: VideoStream,
        source: _Source,
        limits: VideoLimits,
        decoder_options: dict[str, str],
        preprocess: Preprocess,
    ) -> VideoReader:
        for other in container.streams:
            if other.index != stream.index:
                other.discard = Discard.all
        decoder = _alpha_decoder(stream) or stream.codec_context
        decoder.thread_count = _DECODE_THREADS
        decoder.thread_type = "AUTO"
        decoder.options = dict(decoder_options)

        frames = _decode(container, stream, decoder)
        first = next(frames, None)
        if first is None:
            raise CorruptMedia("the video stream has no decodable frames")
        _check_pixels(first.width, first.height, limits)

        still = container.format.name.endswith(_STILL_IMAGE_SUFFIX)
        rate = _declared_rate(stream, still)
        fps = DEFAULT_FPS if rate is None else rate
        count, declared = _frame_count(stream, container, fps, rate is not None)
        exif = sniff.jpeg_exif_orientation(source.head) if still else None
        turn = orientation.of_frame(first, exif, codec=stream.codec_context.name)
        width, height = turn.display_size(first.width, first.height)
        info = VideoInfo(
            width=width,
            height=height,
            fps=fps,
            num_frames=count,
            codec=stream.codec_context.name,
            container=container.format.name,
            rotation=turn.clockwise,
            sample_aspect_ratio=turn.sample_aspect_ratio(_sample_aspect_ratio(stream, still)),
        )
        plan = preprocess.plan(width, height, info.num_frames, fps, info.sample_aspect_ratio,
                               variable_rate=_variable_rate(stream))
        _check_plan(plan, limits)
        if plan.exact and plan.frame_limit is not None and plan.frame_limit > limits.max_frames:
            raise TooLarge(f"{plan.frame_limit} frames exceed the limit of "
                           f"{limits.max_frames}")
        if declared:
            _check_declared_frames(count, fps, plan, limits)
        return cls(container, file, frames, first, info, turn, limits, plan,
                   _tagged_duration(stream), _stream_end(stream))

    def iter_frames(self, chunk: int) -> Iterator[Frames]:
        """Yield the output frames in order as ``(n, H, W, 3)`` uint8 RGB, ``n <= chunk``.

        ``H, W`` are ``plan.height, plan.width`` (without preprocessing, ``info.height,
        info.width``): rotation and mirroring are applied (see
        ``ivvae.video.orientation``), then the plan's swscale resize and crop (an
        anamorphic picture is scaled straight to the plan's size, which was planned from
        its displayed shape: the output is square-pixel). Frames whose
        coded size changes mid-stream are scaled like the first, as players do; alpha is
        composited over black. Frames are selected as ``plan`` says while they stream
        out; decoding stops once the plan's frame count is reached. Raises ``TooLarge`` as
        soon as an output frame past ``limits.max_frames`` (or a source frame past
        ``limits.max_source_seconds``) is decoded, ``InvalidInput`` when the clip ends
        short of the frame count the plan needs exactly, and ``CorruptMedia`` if decoding
        fails. Holds at most one chunk.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self._start_once()
        return self._chunks(chunk)

    def read_all(self) -> Frames:
        """Every frame as one ``(T, H, W, 3)`` uint8 RGB array; see ``iter_frames``."""
        return np.concatenate(list(self.iter_frames(64)), axis=0)

    def count_frames(self) -> int:
        """How many output frames the plan selects, as ``iter_frames`` would give them
        (its checks and errors included), decoding each source frame but converting none:
        the length a clip's windows are cut from (``ivvae.dataset.windows``). Runs once,
        in place of ``iter_frames``."""
        self._start_once()
        return sum(1 for _ in self._selected())

    def _start_once(self) -> None:
        """Decoding streams forward through the upload: frames are read out once."""
        if self._closed:
            raise RuntimeError("the reader is closed")
        if self._started:
            raise RuntimeError("iter_frames can run only once per open video")
        self._started = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._first = None
        if self._container is not None:
            self._container.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _chunks(self, chunk: int) -> Iterator[Frames]:
        height, width = self.plan.height, self.plan.width
        buffer: Frames | None = None
        filled = 0
        for frame in self._selected():
            if buffer is None:
                buffer = np.empty((chunk, height, width, 3), dtype=np.uint8)
            buffer[filled] = self._picture(frame)
            filled += 1
            if filled == chunk:
                yield buffer
                buffer, filled = None, 0
        if buffer is not None:
            yield buffer[:filled]

    def _selected(self) -> Iterator[VideoFrame]:
        """The source frame of each output frame, as the plan selects them by timestamp
        (a frame repeated by ``fps`` comes once per output frame)."""
        plan, limit = self.plan, self.plan.frame_limit
        selector: FrameSelector = plan.selector(self.info.fps)
        produced = 0
        previous: VideoFrame | None = None
        origin: float | None = None
        at = (0, 0.0)  # the previous frame's index and seconds
        for index, frame in enumerate(self._all_frames()):
            time = frame.time
            if origin is None:
                origin = time if time is not None else 0.0
            seconds = (time - origin) if time is not None else index / self.info.fps
            copies = selector.push(seconds)
            if produced + (copies if limit is None else min(copies, limit - produced)) > (
                    self._limits.max_frames):
                # A timestamp gap (hours in a 17 KB MPEG-TS) resampled to a rate asks for
                # thousands of copies at once: refused now, not after encoding 2048 of them.
                raise self._too_many()
            while copies:
                copies -= 1
                assert previous is not None
                yield from self._emit(previous, produced, at)
                produced += 1
                if limit is not None and produced >= limit:
                    return
            previous, at = frame, (index, seconds)
        if previous is not None:
            end = (None if self._stream_end is None or origin is None
                   else self._stream_end - origin)
            copies = selector.finish(end)
            while copies and (limit is None or produced < limit):
                copies -= 1
                yield from self._emit(previous, produced, at)
                produced += 1
        if produced == 0:
            raise InvalidInput("preprocessing selects no frames: the window starts after "
                               "the clip ends")
        if plan.exact and limit is not None and produced < limit:
            raise InvalidInput(f"the clip gives only {produced} frames after "
                               f"preprocessing; {limit} are needed "
                               f"({plan.bucket or 'num_frames'})")

    def _emit(self, frame: VideoFrame, produced: int,
              at: tuple[int, float]) -> Iterator[VideoFrame]:
        if self.first_used is None:
            self.first_used = at
        self.last_used = at
        if produced >= self._limits.max_frames:
            raise self._too_many()
        yield frame

    def _picture(self, frame: VideoFrame) -> npt.NDArray[np.uint8]:
        """An output frame's picture: ``_to_rgb``, then the plan's crop."""
        g = self.plan.geometry
        rgb = self._to_rgb(frame)
        if g.crops:
            rgb = rgb[g.top : g.top + g.height, g.left : g.left + g.width]
        return rgb

    def _too_many(self) -> TooLarge:
        return TooLarge(f"the video has more than {self._limits.max_frames} frames"
                        + ("" if self.plan.options.is_identity else " after preprocessing")
                        + "; max_frames takes fewer")

    def _all_frames(self) -> Iterator[VideoFrame]:
        first, self._first = self._first, None
        if first is None:
            return
        last_time = first.time
        origin = first.time or 0.0
        cap = self._limits.max_source_seconds
        self.source_frames_read = 1
        yield first
        while not self._closed:
            frame = next(self._frames, None)
            if frame is None:
                self._check_complete(last_time)
                return
            last_time = frame.time if frame.time is not None else last_time
            self.source_frames_read += 1
            if cap is not None and last_time is not None and last_time - origin > cap:
                raise TooLarge(f"the video is longer than the limit of {cap:g} s")
            yield frame

    def _check_complete(self, last_time: float | None) -> None:
        """Matroska/WebM demuxers stop quietly at a cut: compare the decoded end with the
        duration the file declares for this stream, and call a shortfall of more than two
        frames (and 1 %) what it is, a truncated upload."""
        declared = self._declared_seconds
        if declared is None or last_time is None:
            return
        frame_s = 1.0 / self.info.fps
        end = last_time + frame_s
        if end < declared - max(2 * frame_s, 0.01 * declared):
            # (A Matroska demuxer also stops quietly at the stream cap.)
            if self._container is not None and len(self._container.streams) >= MAX_STREAMS:
                raise CorruptMedia(_TOO_MANY_STREAMS)
            raise CorruptMedia(f"truncated {self.info.container} data: the file declares "
                               f"{declared:.3f} s of video, only {end:.3f} s decode")

    def _to_rgb(self, frame: VideoFrame) -> npt.NDArray[np.uint8]:
        """One frame as ``(H, W, 3)`` uint8 RGB, upright, at the plan's scaled size
        (swscale: area averaging down, bicubic up)."""
        width, height = self._scaled_coded
        interpolation = "BICUBIC" if self._upscale else "AREA"
        # A palette can hold transparency too (GIF, PNG with tRNS).
        has_alpha = frame.format.has_palette or any(
            component.is_alpha for component in frame.format.components
        )
        try:
            if has_alpha:
                rgba = cast(Frames, frame.to_ndarray(format="rgba", width=width, height=height,
                                                     interpolation=interpolation,
                                                     threads=SWSCALE_THREADS))
                alpha = rgba[..., 3:].astype(np.uint16)
                rgb = ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
            else:
                rgb = cast(Frames, frame.to_ndarray(format="rgb24", width=width, height=height,
                                                    interpolation=interpolation,
                                                    threads=SWSCALE_THREADS))
        except (av.error.FFmpegError, ValueError) as exc:
            raise CorruptMedia(f"a frame could not be converted to RGB: {exc}") from exc
        return self._orientation.apply(rgb)


def open_frames(frames: Frames, *, fps: float = DEFAULT_FPS,
                limits: VideoLimits = VideoLimits(),
                preprocess: Preprocess | None = None) -> VideoReader:
    """A reader over frames already in memory, ``(T, H, W, 3)`` uint8 RGB at ``fps``
    (a tensor upload), with the same limits and preprocessing as ``open_video``: the frames
    go through the same swscale resize and timestamp selection."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(
            frames):
        raise InvalidInput(f"frames must be (T, H, W, 3) uint8 with T >= 1, got "
                           f"{list(frames.shape)} {frames.dtype}")
    t, height, width, _ = frames.shape
    _check_pixels(width, height, limits)
    try:
        rate = exact_rate(fps)  # as its cache key and latent have it
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None

    def video_frames() -> Iterator[VideoFrame]:
        for index in range(t):
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame.pts = index
            frame.time_base = 1 / rate
            yield frame

    stream = video_frames()
    first = next(stream)
    info = VideoInfo(width=width, height=height, fps=float(rate), num_frames=t, codec="raw",
                     container="tensor", rotation=0)
    plan = (preprocess or Preprocess()).plan(width, height, t, float(rate))
    _check_plan(plan, limits)
    # The count is known here, unlike a file's declared one: refuse before encoding any.
    produced = plan.options.available_frames(t, float(rate))
    if produced is not None and plan.frame_limit is not None:
        produced = min(produced, plan.frame_limit)
    if produced is not None and produced > limits.max_frames:
        raise TooLarge(f"{t} frames give {produced} after preprocessing, over the limit of "
                       f"{limits.max_frames}; max_frames takes fewer")
    return VideoReader(None, None, stream, first, info, Orientation(0), limits, plan)


def _alpha_decoder(stream: VideoStream) -> VideoCodecContext | None:
    """A libvpx decoder for a VP8/VP9 stream that carries alpha, else ``None``.

    WebM keeps VP8/VP9 alpha as a second picture in each block's BlockAdditional (the track
    says ``alpha_mode: 1``); FFmpeg's own vp8/vp9 decoders ignore it and give opaque
    frames, libvpx's read it (``yuva420p``), so alpha is composited like any other."""
    name = stream.codec_context.name
    libvpx = {"vp8": "libvpx", "vp9": "libvpx-vp9"}.get(name)
    if libvpx is None or stream.metadata.get("alpha_mode") != "1":
        return None
    try:
        decoder = cast(VideoCodecContext, av.CodecContext.create(libvpx, "r"))
    except (av.error.FFmpegError, ValueError):  # an FFmpeg built without libvpx
        return None
    decoder.extradata = stream.codec_context.extradata
    return decoder


def _decode(container: InputContainer, stream: VideoStream, decoder: VideoCodecContext
            ) -> Iterator[VideoFrame]:
    """Decoded frames of ``stream`` in presentation order, FFmpeg's errors as ours."""
    try:
        for packet in container.demux(stream):
            yield from decoder.decode(packet)
    except av.error.ExitError as exc:
        raise CorruptMedia("reading the video timed out") from exc
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        # MPEG-TS and Matroska add streams as they find them while reading: the stream cap
        # fails there (ENOMEM), not when the file is opened.
        if isinstance(exc, av.error.MemoryError) and len(container.streams) >= MAX_STREAMS:
            raise CorruptMedia(_TOO_MANY_STREAMS) from exc
        raise CorruptMedia(f"the video stream does not decode: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__
