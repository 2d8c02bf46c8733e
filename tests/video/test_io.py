"""ivvae.video: decoding uploads into frames and encoding frames into MP4.

Expected values come from the generated source frames (``media.make_frames``) or from
PyAV read independently of ``ivvae.video``; nothing is a stored answer.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import numpy.typing as npt
import pytest

from ivvae.errors import (
    CorruptMedia,
    EmptyInput,
    InvalidInput,
    TooLarge,
    UnsupportedMedia,
)
from ivvae.video import (
    DEFAULT_FPS,
    Mp4Writer,
    VideoLimits,
    encode_mp4_bytes,
    exact_rate,
    open_video,
)
from ivvae.video.preprocess import Preprocess
from tests import media

Frames = npt.NDArray[np.uint8]


def psnr(a: Frames, b: Frames) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def assert_same_frames(decoded: Frames, source: Frames, min_psnr: float) -> None:
    """Same shape, each frame close to its source and closer to it than to any other."""
    assert decoded.shape == source.shape
    assert decoded.dtype == np.uint8
    for index, (got, want) in enumerate(zip(decoded, source, strict=True)):
        assert psnr(got, want) > min_psnr, f"frame {index}"
    if len(source) > 1:
        flat_got = decoded.reshape(len(decoded), -1).astype(np.float64)
        flat_want = source.reshape(len(source), -1).astype(np.float64)
        distances = ((flat_got[:, None, :] - flat_want[None, :, :]) ** 2).mean(axis=2)
        assert (distances.argmin(axis=1) == np.arange(len(source))).all(), "frame order"


def read(source: bytes | str | os.PathLike[str], limits: VideoLimits | None = None) -> Frames:
    with open_video(source, limits=limits or VideoLimits()) as reader:
        return reader.read_all()


# -- round trips through the formats uploads come in -------------------------------------

FORMATS = [
    ("libx264", "mp4", 22.0),
    ("libvpx-vp9", "webm", 22.0),
    ("libx264", "mkv", 22.0),
    ("mjpeg", "avi", 22.0),
    ("mpeg4", "avi", 22.0),
    ("gif", "gif", 17.0),  # 3-3-2 bit palette
]


@pytest.mark.parametrize("frames", [1, 2, 6])
@pytest.mark.parametrize(("codec", "container", "min_psnr"), FORMATS)
def test_round_trip(codec: str, container: str, min_psnr: float, frames: int) -> None:
    data = media.make_video(
        None, frames=frames, width=32, height=24, codec=codec, container=container
    )
    with open_video(data) as reader:
        info = reader.info
        decoded = reader.read_all()
    assert (info.width, info.height, info.rotation) == (32, 24, 0)
    # GIF delays are in 1/100 s: 1/24 s becomes 4/100 s.
    assert info.fps == pytest.approx(25.0 if container == "gif" else 24.0, rel=1e-6)
    assert info.num_frames in (frames, None)
    assert_same_frames(decoded, media.make_frames(frames, 32, 24), min_psnr)


@pytest.mark.parametrize(("codec", "container"), [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_long_clip_streams_in_chunks(codec: str, container: str) -> None:
    data = media.make_video(None, frames=400, width=32, height=24, codec=codec, container=container)
    with open_video(data) as reader:
        sizes = [len(chunk) for chunk in reader.iter_frames(64)]
    assert sizes == [64] * 6 + [16]


def test_chunks_concatenate_to_read_all() -> None:
    data = media.make_video(None, frames=10, width=32, height=24)
    with open_video(data) as reader:
        chunks = list(reader.iter_frames(4))
    assert [c.shape for c in chunks] == [(4, 24, 32, 3), (4, 24, 32, 3), (2, 24, 32, 3)]
    np.testing.assert_array_equal(np.concatenate(chunks), read(data))


def test_path_and_bytes_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    data = media.make_video(
        path, frames=5, width=32, height=24, codec="libvpx-vp9", container="webm"
    )
    np.testing.assert_array_equal(read(path), read(data))
    np.testing.assert_array_equal(read(str(path)), read(data))


def test_iter_frames_runs_once_and_checks_chunk() -> None:
    data = media.make_video(None, frames=3, width=32, height=24)
    with open_video(data) as reader:
        with pytest.raises(ValueError):
            reader.iter_frames(0)
        list(reader.iter_frames(2))
        with pytest.raises(RuntimeError):
            reader.iter_frames(2)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize(("width", "height"), [(32, 24), (33, 17), (1, 1)])
def test_image_is_one_frame(fmt: Literal["png", "jpeg"], width: int, height: int) -> None:
    data = media.make_image(fmt, width, height)
    with open_video(data) as reader:
        info = reader.info
        decoded = reader.read_all()
    assert (info.width, info.height) == (width, height)
    assert info.fps == DEFAULT_FPS
    source = media.make_frames(1, width, height)
    if fmt == "png":
        np.testing.assert_array_equal(decoded, source)  # lossless
    elif width > 1:
        assert_same_frames(decoded, source, 25.0)
    else:
        assert decoded.shape == (1, 1, 1, 3)



@pytest.mark.parametrize(("fmt", "suffix"), [("jpeg", ".jpg"), ("jpeg", ".jpeg"), ("png", ".png")])
def test_image_file_opens_by_path(tmp_path: Path, fmt: Literal["png", "jpeg"],
                                  suffix: str) -> None:
    # FFmpeg's probe trusted a ".jpg" name over a JPEG whose first segments it could not
    # see past (an embedded ICC profile, as cameras write) and picked its file-pattern
    # demuxer, off the whitelist: such photos read by path (CLI, training) failed as corrupt.
    path = tmp_path / f"photo{suffix}"
    data = media.make_image(fmt, 40, 24)
    path.write_bytes(media.add_jpeg_icc_profile(data) if fmt == "jpeg" else data)
    with open_video(path) as reader:
        assert reader.info.container.endswith("_pipe")
        decoded = reader.read_all()
    assert_same_frames(decoded, media.make_frames(1, 40, 24), 25.0)


def test_png_with_icc_profile_does_not_crash_the_process(tmp_path: Path) -> None:
    # PyAV 18 double-frees the metadata of a listed side data entry: reading a PNG with a
    # named ICC profile killed the process at its next garbage collection. In a child
    # process, so that a crash fails this test instead of the whole run.
    path = tmp_path / "icc.png"
    path.write_bytes(media.add_icc_profile(media.make_image("png", 32, 16)))
    script = textwrap.dedent(f"""
        import gc
        from ivvae.video import open_video
        for source in [{str(path)!r}, open({str(path)!r}, "rb").read()] * 3:
            with open_video(source) as reader:
                assert reader.read_all().shape == (1, 16, 32, 3)
            gc.collect()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

@pytest.mark.parametrize(
    ("codec", "container"),
    [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mjpeg", "avi"), ("gif", "gif")],
)
def test_odd_sizes(codec: str, container: str) -> None:
    data = media.make_video(None, frames=4, width=33, height=17, codec=codec, container=container)
    decoded = read(data)
    assert_same_frames(decoded, media.make_frames(4, 33, 17), 17.0)


@pytest.mark.parametrize(
    ("codec", "container"),
    [("libx264", "mp4"), ("libx264", "mkv"), ("libvpx-vp9", "webm"), ("mjpeg", "avi")],
)
def test_audio_track_is_ignored(codec: str, container: str) -> None:
    data = media.make_video(
        None, frames=5, width=32, height=24, codec=codec, container=container, audio=True
    )
    with av.open(io.BytesIO(data)) as check:
        assert len(check.streams.audio) == 1
    assert_same_frames(read(data), media.make_frames(5, 32, 24), 22.0)


def test_audio_only_file_has_no_video() -> None:
    with pytest.raises(UnsupportedMedia, match="no video stream"):
        open_video(media.make_audio_only())


@pytest.mark.parametrize(
    ("container", "rotation", "mirror"),
    [("mp4", r, m) for r in (0, 90, 180, 270) for m in (False, True)]
    + [("mkv", 90, False), ("mkv", 270, True)],
)
def test_display_matrix_is_applied(container: str, rotation: int, mirror: bool) -> None:
    data = media.make_video(
        None, frames=3, width=32, height=16, container=container, rotation=rotation, mirror=mirror
    )
    with open_video(data) as reader:
        info = reader.info
        decoded = reader.read_all()
    assert info.rotation == rotation
    turned = rotation in (90, 270)
    assert (info.width, info.height) == ((16, 32) if turned else (32, 16))
    source = media.make_frames(3, 32, 16)
    # A clockwise turn by `rotation` is np.rot90 with k = -rotation / 90; then the mirror.
    upright = np.rot90(source, -rotation // 90, axes=(1, 2))
    if mirror:
        upright = upright[:, :, ::-1]
    assert_same_frames(decoded, upright, 22.0)
    other_ways = [np.rot90(source, k, axes=(1, 2)) for k in range(4)]
    other_ways += [way[:, :, ::-1] for way in other_ways]
    for way in other_ways:
        if way.shape == upright.shape and not np.array_equal(way, upright):
            assert psnr(decoded, way) < psnr(decoded, upright) - 5


def _exif_upright(image: Frames, orientation: int) -> Frames:
    """What EXIF says orientation 1-8 looks like upright, from the tag's definition."""
    transposed = image.transpose(1, 0, 2)
    return {
        1: image,
        2: image[:, ::-1],
        3: image[::-1, ::-1],
        4: image[::-1],
        5: transposed,
        6: transposed[:, ::-1],
        7: transposed[::-1, ::-1],
        8: transposed[::-1],
    }[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied(orientation: int) -> None:
    byte_order = "II" if orientation % 2 else "MM"
    data = media.add_exif_orientation(media.make_image("jpeg", 32, 16), orientation, byte_order)
    decoded = read(data)
    upright = _exif_upright(media.make_frames(1, 32, 16)[0], orientation)
    assert_same_frames(decoded, upright[None], 24.0)


def test_transparency_is_composited_over_black() -> None:
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[..., :3] = (200, 120, 40)
    rgba[:, 8:, 3] = 255  # right half opaque, left half fully transparent
    rgba[:, :8, 3] = 0
    decoded = read(media.encode_png(rgba))[0]
    np.testing.assert_array_equal(decoded[:, :8], 0)
    np.testing.assert_array_equal(decoded[:, 8:], rgba[:, 8:, :3])


@pytest.mark.parametrize("codec", ["libvpx-vp9", "libvpx"])
def test_webm_alpha_is_composited_over_black(codec: str) -> None:
    # WebM keeps VP8/VP9 alpha beside each frame; FFmpeg's own decoders drop it, so the
    # transparent half used to come out in full colour.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 120, 40)
    rgba[:, 16:, 3] = 255
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        # libvpx (VP8) encodes alpha only without alternate reference frames.
        stream = container.add_stream(codec, rate=24, options={"deadline": "realtime",
                                                               "auto-alt-ref": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuva420p"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format="yuva420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames = read(out.getvalue())
    assert frames.shape == (3, 32, 32, 3)
    assert frames[:, :, :12].max() <= 8  # transparent: black, give or take the codec
    assert np.abs(frames[:, :, 20:].astype(int) - (200, 120, 40)).max() <= 12


def test_variable_frame_rate_keeps_every_frame_in_order() -> None:
    timestamps = [0, 1, 2, 4, 8, 9, 10, 16]
    data = media.make_video(
        None, frames=len(timestamps), width=32, height=24, fps=24, timestamps=timestamps
    )
    with open_video(data) as reader:
        info = reader.info
        decoded = reader.read_all()
    assert_same_frames(decoded, media.make_frames(len(timestamps), 32, 24), 22.0)
    assert 24 * len(timestamps) / 17 - 1 < info.fps < 24


@pytest.mark.parametrize("fps", [24, 12, 30])
def test_a_variable_rate_clip_resampled_gives_the_frames_its_plan_counts(fps: int) -> None:
    # The plan counts a clip's frames as its declared frames over its average rate (its
    # declared duration); the last frame used to last 1 / average rate instead, so a
    # variable-rate clip gave one frame more than counted, and num_frames of what it
    # gives was refused as too many.
    timestamps = [0, 1, 2, 5, 6, 7, 12, 13, 20, 21, *range(22, 40)]
    data = media.make_video(
        None, frames=len(timestamps), width=32, height=24, fps=24, timestamps=timestamps
    )
    options = Preprocess.parse({"fps": str(fps)})
    with open_video(data, preprocess=options) as reader:
        counted = options.available_frames(reader.info.num_frames, reader.info.fps)
        given = len(reader.read_all())
    assert counted == given == round(40 * fps / 24)
    exact = Preprocess.parse({"fps": str(fps), "num_frames": str(given)})
    with open_video(data, preprocess=exact) as reader:
        assert len(reader.read_all()) == given


@pytest.mark.parametrize("name", ["bikes", "carphone_pristine", "bigbuckbunny"])
def test_real_clips(name: str) -> None:
    path = media.sample_clip(name)
    with av.open(str(path)) as check:  # the oracle: what the container holds
        stream = check.streams.video[0]
        size = (stream.width, stream.height)
        packets = sum(1 for packet in check.demux(stream) if packet.size)
    with open_video(path) as reader:
        assert (reader.info.width, reader.info.height) == size
        assert reader.info.num_frames == packets
        count = 0
        for chunk in reader.iter_frames(32):
            assert chunk.shape[1:] == (size[1], size[0], 3)
            count += len(chunk)
    assert count == packets


# -- uploads that must be refused -------------------------------------------------------


def test_empty_input(tmp_path: Path) -> None:
    with pytest.raises(EmptyInput):
        open_video(b"")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(EmptyInput):
        open_video(empty)


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        open_video(tmp_path / "missing.mp4")
    with pytest.raises(InvalidInput):
        open_video(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(7).bytes(50_000),
        b"Just some text, not a video.\n" * 200,
        b'{"video": "no"}',
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    ],
    ids=["random", "text", "json", "playlist"],
)
def test_not_media(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        open_video(data)


def drain(data: bytes) -> None:
    with open_video(data) as reader:
        for _ in reader.iter_frames(8):
            pass


def _garble(data: bytes, start: int, length: int) -> bytes:
    garbled = bytearray(data)
    garbled[start : start + length] = bytes([0x55]) * len(garbled[start : start + length])
    return bytes(garbled)


def test_garbled_data_in_a_valid_container() -> None:
    png = media.make_image("png", 32, 24)
    idat = png.find(b"IDAT") + 6  # past the chunk type and the zlib header
    with pytest.raises(CorruptMedia):
        drain(_garble(png, idat, len(png) - idat - 16))
    mp4 = media.make_video(None, frames=6, width=32, height=24)
    mdat = mp4.find(b"mdat") + 4
    with pytest.raises(CorruptMedia):
        drain(_garble(mp4, mdat, 600))


def _streams(count: int) -> bytes:
    """An MP4 of ``count`` copies of one one-frame 16x16 H.264 stream."""
    with av.open(io.BytesIO(media.make_video(None, frames=1, width=16, height=16))) as one:
        template = one.streams.video[0]
        packets = [p for p in one.demux(template) if p.size]
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            for stream in [out.add_stream_from_template(template) for _ in range(count)]:
                for packet in packets:
                    packet.stream = stream
                    out.mux(packet)
    return buf.getvalue()


def _with_audio_tracks(container: str, tracks: int) -> bytes:
    """24 frames of video and ``tracks`` short audio tracks: a broadcast capture's shape."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        video = out.add_stream("libx264", rate=24)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = [out.add_stream("mp2", rate=48000) for _ in range(tracks)]
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * i, np.uint8),
                                               format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
        for stream in audio:
            silence = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16",
                                                 layout="mono")
            silence.sample_rate = 48000
            out.mux(stream.encode(silence))
            out.mux(stream.encode())
    return buf.getvalue()


def test_a_container_of_too_many_streams_is_refused_before_they_are_probed() -> None:
    """1000 streams (FFmpeg's own cap) took 760 MB to open; past MAX_STREAMS none is."""
    from ivvae.video.reader import MAX_STREAMS

    with pytest.raises(CorruptMedia, match=f"more than {MAX_STREAMS} streams"):
        drain(_streams(MAX_STREAMS + 1))
    # Many tracks, as broadcast captures hold, are no reason to refuse a clip.
    for container in ("mpegts", "matroska"):
        assert _count(_with_audio_tracks(container, 70)) == 24, container


def test_writer_given_no_frames_writes_nothing() -> None:
    sink = io.BytesIO()
    with Mp4Writer(sink, width=32, height=24, fps=24):
        pass
    assert sink.getvalue() == b""
    with pytest.raises(EmptyInput):
        open_video(sink.getvalue())


def test_truncated_real_mp4() -> None:
    data = media.sample_clip("bikes").read_bytes()
    with pytest.raises(CorruptMedia):
        drain(data[: len(data) // 2])


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_faststart_mp4(tmp_path: Path, keep: float) -> None:
    # Index first: the cut loses media data, not the index, so it shows while decoding.
    path = tmp_path / "fast.mp4"
    with Mp4Writer(path, width=64, height=48, fps=24) as writer:
        writer.write(media.make_frames(48, 64, 48))
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    with pytest.raises(CorruptMedia):
        drain(data[: int(len(data) * keep)])


def _sample_ends(data: bytes) -> list[int]:
    """Where each video sample of an MP4 ends in the file, as FFmpeg's demuxer reads it."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return [packet.pos + packet.size for packet in container.demux(stream) if packet.size]


def test_mp4_cut_between_two_samples_is_corrupt_not_short(tmp_path: Path) -> None:
    # A cut exactly at a sample's end is a clean end of file to FFmpeg: it decoded shorter
    # (CI drew one such cut at 50 % of an encoded clip).
    path = tmp_path / "fast.mp4"
    with Mp4Writer(path, width=64, height=48, fps=24) as writer:
        writer.write(media.make_frames(24, 64, 48))
    data = path.read_bytes()
    ends = _sample_ends(data)
    assert len(ends) == 24 and ends[-1] == len(data)  # the index is in front, mdat last
    for cut in ends[:-1]:
        with pytest.raises(CorruptMedia, match="truncated: its MP4/MOV box 'mdat' runs"):
            drain(data[:cut])
    cut_file = tmp_path / "cut.mp4"
    cut_file.write_bytes(data[: ends[10]])
    with pytest.raises(CorruptMedia, match="MP4/MOV box"):
        drain(str(cut_file))
    drain(data)


def test_fragmented_mp4_cut_inside_a_fragment_is_corrupt() -> None:
    data = media.make_video(None, frames=48, width=64, height=48,
                            muxer_options={"movflags": "empty_moov", "frag_duration": "250000"})
    boxes = _isobmff_boxes(data)
    fragments = [(offset, size) for kind, offset, size in boxes if kind == b"moof"]
    media_data = [(offset, size) for kind, offset, size in boxes if kind == b"mdat"]
    assert len(fragments) > 2
    drain(data)
    # Halfway into the second fragment's header and into its samples, and at the end of
    # a sample that is not the fragment's last.
    inside = [offset + size // 2 for offset, size in (fragments[1], media_data[1])]
    sample_ends = [end for end in _sample_ends(data)
                   if media_data[2][0] < end < sum(media_data[2])]
    assert sample_ends
    for cut in [*inside, sample_ends[0]]:
        with pytest.raises(CorruptMedia, match="MP4/MOV box"):
            drain(data[:cut])
    # A cut between two whole fragments is a shorter valid file: no box says otherwise.
    with open_video(data[: fragments[2][0]]) as reader:
        assert sum(len(chunk) for chunk in reader.iter_frames(8)) < 48


@pytest.mark.parametrize("codec", ["mjpeg", "mpeg4"])
def test_truncated_avi_is_corrupt_not_short(tmp_path: Path, codec: str) -> None:
    # FFmpeg reads an AVI that lost its trailing index chunk by chunk and stops quietly.
    data = media.make_video(None, frames=30, width=64, height=48, container="avi",
                            codec=codec)  # type: ignore[arg-type]
    assert _count(data) == 30
    movi = data.find(b"LIST", data.find(b"movi") - 8)
    index = data.rfind(b"idx1")
    assert 0 < movi < index
    frame_ends = [end for end in _avi_frame_ends(data) if end <= index]
    assert len(frame_ends) == 30
    # Inside a frame, and exactly between two frames: frames are missing.
    for cut in [(movi + index) // 2, frame_ends[14]]:
        with pytest.raises(CorruptMedia, match="truncated: its AVI chunk 'movi' runs"):
            drain(data[:cut])
    cut_file = tmp_path / "cut.avi"
    cut_file.write_bytes(data[: frame_ends[20]])
    with pytest.raises(CorruptMedia, match="AVI chunk 'movi'"):
        drain(str(cut_file))
    # Cut before the frames start: whichever check sees it first, it is corrupt.
    with pytest.raises(CorruptMedia):
        drain(data[:movi])
    # A cut inside the trailing index, or a RIFF size a sloppy writer left a little
    # too large, loses no frame: FFmpeg reads all of them, and so do we.
    assert _count(data[: index + 9]) == 30
    assert _count(data[: len(data) - 1]) == 30
    oversized = data[:4] + (len(data) + 8).to_bytes(4, "little") + data[8:]
    assert _count(oversized) == 30


def _avi_frame_ends(data: bytes) -> list[int]:
    """Where each video chunk (``00dc``) of an AVI's ``movi`` list ends, padding included."""
    start = data.find(b"movi") + 4
    ends, offset = [], start
    while offset + 8 <= len(data) and data[offset : offset + 4] != b"idx1":
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        offset += 8 + size + (size & 1)
        ends.append(offset)
    return ends


def _isobmff_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, offset, size)`` of the top-level boxes (32-bit sizes only)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        assert size >= 8, "a box of size 0 or a 64-bit size: not what these tests make"
        boxes.append((data[offset + 4 : offset + 8], offset, size))
        offset += size
    return boxes


@pytest.mark.parametrize("keep", [0.8, 0.97])
@pytest.mark.parametrize(("container", "codec", "audio"), [
    ("webm", "libvpx-vp9", False), ("mkv", "libx264", False), ("mkv", "libx264", True)])
def test_truncated_matroska_is_corrupt_not_short(container: str, codec: str, audio: bool,
                                                 keep: float) -> None:
    # Matroska demuxers stop quietly at a cut; the Segment's declared size gives it away.
    data = media.make_video(None, frames=40, width=64, height=48, container=container,
                            codec=codec, audio=audio)  # type: ignore[arg-type]
    assert _count(data) == 40
    with pytest.raises(CorruptMedia, match="truncated: its Matroska/WebM element 'Cluster' runs"):
        drain(data[: int(len(data) * keep)])


def _count(blob: bytes) -> int:
    with open_video(blob) as reader:
        return sum(len(chunk) for chunk in reader.iter_frames(8))


def _ebml_children(data: bytes) -> list[tuple[int, int, int]]:
    """``(id, offset, end)`` of the first Segment's top-level elements (known sizes only),
    parsed here rather than with ``ivvae.video.sniff``'s reader, which they check."""

    def element(pos: int) -> tuple[int, int, int]:
        id_length = 9 - data[pos].bit_length()
        size_length = 9 - data[pos + id_length].bit_length()
        size_bytes = data[pos + id_length : pos + id_length + size_length]
        size = int.from_bytes(size_bytes, "big") & ((1 << (7 * size_length)) - 1)
        start = pos + id_length + size_length
        return int.from_bytes(data[pos : pos + id_length], "big"), start, start + size

    header_id, _, segment_offset = element(0)
    segment_id, offset, segment_end = element(segment_offset)
    assert (header_id, segment_id, segment_end) == (0x1A45DFA3, 0x18538067, len(data))
    children = []
    while offset < len(data):
        kind, _, end = element(offset)
        children.append((kind, offset, end))
        offset = end
    return children


def test_matroska_cut_between_clusters_or_in_its_index() -> None:
    cluster, cues = 0x1F43B675, 0x1C53BB6B
    data = media.make_video(None, frames=96, width=64, height=48, container="mkv",
                            muxer_options={"cluster_time_limit": "1000"})
    children = _ebml_children(data)
    clusters = [(offset, end) for kind, offset, end in children if kind == cluster]
    assert len(clusters) >= 3 and children[-1][0] == cues
    # Between two clusters, or through the header of the next: media is missing.
    for cut in [clusters[1][1], clusters[1][1] + 2]:
        with pytest.raises(CorruptMedia, match="Matroska/WebM element 'Segment' runs"):
            drain(data[:cut])
    # Inside the trailing index (Cues), past its header: every frame is there, and decodes.
    _, index, end = children[-1]
    assert end - index > 16
    assert _count(data[: index + 16]) == 96


def test_a_jpeg_cut_in_its_scan_is_corrupt_not_grey(tmp_path: Path) -> None:
    from ivvae.video import sniff

    # FFmpeg's decoder filled the missing part in grey and answered a whole picture.
    jpeg = media.make_image("jpeg", 256, 192)
    scan = sniff._jpeg_scan_start(jpeg)
    assert scan is not None
    for cut in (scan - 5, scan + 200, len(jpeg) // 2, len(jpeg) - 2):
        with pytest.raises(CorruptMedia, match="no JPEG end-of-image marker"):
            drain(jpeg[:cut])
        (tmp_path / "cut.jpg").write_bytes(jpeg[:cut])
        with (pytest.raises(CorruptMedia, match="no JPEG end-of-image marker"),
              open_video(tmp_path / "cut.jpg") as reader):
            reader.read_all()
    assert _count(jpeg) == 1 and _count(jpeg + bytes(100)) == 1  # padding after the marker
    # A stray byte between two segments (some encoders write them; libjpeg skips them) is
    # no cut: the walk to the scan steps over it.
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    assert _count(jpeg[:app0_end] + b"\x00" + jpeg[app0_end:]) == 1


def test_a_gif_cut_after_or_inside_a_frame_is_corrupt_not_short() -> None:
    gif = media.make_video(None, frames=9, width=32, height=24, codec="gif", container="gif")
    assert _count(gif) == 9 and _count(gif + bytes(16)) == 9
    # What follows the trailer is not the walk's business (a newline, appended metadata).
    assert _count(gif + b"\n") == 9 and _count(gif + b"<x:xmpmeta>...</x:xmpmeta>") == 9
    for cut in (len(gif) - 1, len(gif) // 2):
        with pytest.raises(CorruptMedia, match="no GIF trailer"):
            drain(gif[:cut])


def test_live_matroska_without_sizes_is_left_to_its_duration_tag() -> None:
    # A live recording (a browser's MediaRecorder) leaves the Segment's size unknown.
    data = media.make_video(None, frames=40, width=64, height=48, container="webm",
                            codec="libvpx-vp9", muxer_options={"live": "1"})
    from ivvae.video import sniff

    assert sniff.cut_matroska_cluster(io.BytesIO(data), len(data)) is None
    assert _count(data) == 40


@pytest.mark.parametrize(
    "make",
    [
        lambda: media.make_huge_png(8192, 8192),
        lambda: media.make_lying_jpeg(8192, 8192),
        lambda: media.make_blank_video(3840, 2160, "libx264"),
        lambda: media.make_blank_video(4096, 4096, "gif"),
        # FFmpeg will not open a header of this size: too large, not damaged
        lambda: media.make_y4m(60000, 60000, payload=1000),
        lambda: media.make_y4m(2048, 2048),
    ],
    ids=["png", "jpeg", "h264", "gif", "y4m-unopenable", "y4m"],
)
def test_oversized_frames_are_refused_at_open(make: object) -> None:
    assert callable(make)
    with pytest.raises(TooLarge, match="exceed"):
        open_video(make())


def test_a_y4m_stream_reads_at_its_declared_size() -> None:
    with open_video(media.make_y4m(64, 48, frames=3)) as r:
        assert (r.info.width, r.info.height) == (64, 48)
        assert sum(len(c) for c in r.iter_frames(8)) == 3


def test_oversized_png_is_refused_without_decoding_it(tmp_path: Path) -> None:
    # In a fresh process, so the peak RSS says what open_video allocated. Decoding the
    # picture would take 64 MiB (grey) plus 192 MiB (RGB).
    path = tmp_path / "huge.png"
    path.write_bytes(media.make_huge_png(8192, 8192))
    script = textwrap.dedent(
        f"""
        import resource
        from ivvae.errors import TooLarge, UnsupportedMedia
        from ivvae.video import open_video
        try:  # warm up: load FFmpeg's formats and codecs
            open_video(b"not a video")
        except UnsupportedMedia:
            pass
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            open_video({str(path)!r})
        except TooLarge:
            pass
        else:
            raise SystemExit("not refused")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    grown_mib = int(result.stdout.strip())
    assert grown_mib < 32


def test_pixel_limit_boundary() -> None:
    data = media.make_video(None, frames=2, width=32, height=24)
    assert read(data, VideoLimits(max_pixels=32 * 24)).shape == (2, 24, 32, 3)
    with pytest.raises(TooLarge):
        open_video(data, limits=VideoLimits(max_pixels=32 * 24 - 1))


def test_declared_frame_count_over_limit_is_refused_at_open() -> None:
    data = media.make_video(None, frames=20, width=32, height=24)  # MP4 declares 20
    with pytest.raises(TooLarge):
        open_video(data, limits=VideoLimits(max_frames=10))


def test_an_edit_list_trim_declares_the_frames_it_shows() -> None:
    # A stream-copied cut or a QuickTime trim keeps all 17 samples (the stream declares
    # 17) and edits the first 4 out (its duration: 13 frames); 13 decode.
    full = media.make_video(None, frames=17, width=64, height=48, pattern="gradient")
    trimmed = media.trim_by_edit_list(full, skip=4)
    with open_video(full) as reader:
        assert reader.info.num_frames == 17
    with open_video(trimmed, limits=VideoLimits(max_frames=13)) as reader:
        assert reader.info.num_frames == 13
        frames = reader.read_all()
    np.testing.assert_array_equal(frames, read(full)[4:])
    with pytest.raises(TooLarge, match="declares 13 frames"):
        open_video(trimmed, limits=VideoLimits(max_frames=12))


def test_frame_limit_stops_decoding_early() -> None:
    # WebM declares no frame count: the limit is met while decoding, not after.
    data = media.make_video(
        None, frames=30, width=32, height=24, codec="libvpx-vp9", container="webm"
    )
    yielded = 0
    with open_video(data, limits=VideoLimits(max_frames=10)) as reader:
        assert reader.info.num_frames in (30, None)  # an estimate at most
        with pytest.raises(TooLarge):
            for chunk in reader.iter_frames(1):
                yielded += len(chunk)
    assert yielded == 10
    assert read(data, VideoLimits(max_frames=30)).shape[0] == 30


# -- Mp4Writer ---------------------------------------------------------------------------


def frames_and_rate(data: bytes) -> tuple[int, int, int, Fraction | None, str | None]:
    """Independent look at an MP4: frame count, size, average rate and pixel format."""
    with av.open(io.BytesIO(data), mode="r") as check:
        stream = check.streams.video[0]
        frames = list(check.decode(stream))
        return (
            len(frames),
            frames[0].width,
            frames[0].height,
            stream.average_rate,
            stream.codec_context.pix_fmt,
        )


@pytest.mark.parametrize(
    ("width", "height", "fps", "count"),
    [
        (32, 24, 24.0, 1),
        (32, 24, 25.0, 2),
        (33, 17, 29.97, 37),
        (17, 32, 23.976, 5),
        (64, 48, Fraction(30000, 1001), 12),
        (1, 1, 30.0, 3),
        (2, 2, 60.0, 4),
        (3, 5, 12.5, 6),
    ],
)
def test_writer_round_trips_size_count_and_rate(
    width: int, height: int, fps: float | Fraction, count: int
) -> None:
    source = media.make_frames(count, width, height)
    data = encode_mp4_bytes(source, fps)
    frames, got_w, got_h, rate, pix_fmt = frames_and_rate(data)
    assert (frames, got_w, got_h) == (count, width, height)
    if count > 1:
        assert rate == exact_rate(fps)
        assert float(rate) == pytest.approx(float(fps), abs=1e-9)
    assert pix_fmt == ("yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p")
    with open_video(data) as reader:
        assert (reader.info.width, reader.info.height) == (width, height)
        if count > 1:
            assert reader.info.fps == float(exact_rate(fps))
        decoded = reader.read_all()
    assert decoded.shape == source.shape


def test_writer_streams_across_calls_and_sinks(tmp_path: Path) -> None:
    source = media.make_frames(20, 48, 32)
    path = tmp_path / "out.mp4"
    with Mp4Writer(path, width=48, height=32, fps=24) as writer:
        for start in range(0, 20, 7):
            writer.write(source[start : start + 7])
    from_path = path.read_bytes()
    assert from_path.find(b"moov") < from_path.find(b"mdat")  # faststart

    class Pipe(io.RawIOBase):
        """A sink that cannot seek, like a socket."""

        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, chunk: bytes) -> int:  # type: ignore[override]
            self.data += chunk
            return len(chunk)

    pipe = Pipe()
    with Mp4Writer(pipe, width=48, height=32, fps=24) as writer:
        writer.write(source)
    for data in (from_path, bytes(pipe.data), encode_mp4_bytes(source, 24)):
        assert_same_frames(read(data), source, 25.0)


def test_writer_fidelity_on_a_smooth_gradient() -> None:
    source = media.make_frames(12, 96, 64, pattern="gradient")
    decoded = read(encode_mp4_bytes(source, 24, crf=18))
    assert psnr(decoded, source) > 35.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 24, 32), np.uint8),
        np.zeros((2, 24, 32, 3), np.float32),
        np.zeros((2, 32, 24, 3), np.uint8),
        np.zeros((24, 32, 3), np.uint8),
    ],
    ids=["no-channels", "float", "transposed", "no-time"],
)
def test_writer_rejects_wrong_frames(bad: Frames) -> None:
    with Mp4Writer(io.BytesIO(), width=32, height=24, fps=24) as writer, pytest.raises(ValueError):
        writer.write(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0, "height": 24, "fps": 24},
        {"width": 32, "height": 24, "fps": 0},
        {"width": 32, "height": 24, "fps": float("nan")},
        {"width": 32, "height": 24, "fps": 24, "crf": 60},
        {"width": 32, "height": 24, "fps": 24, "preset": "warp"},
    ],
)
def test_writer_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Mp4Writer(io.BytesIO(), **kwargs)  # type: ignore[arg-type]


def _box(kind: bytes, payload: bytes = b"", *, size: int | None = None,
         large: bool = False) -> bytes:
    if large:  # a size of 1, then the 64-bit size
        declared = size or 16 + len(payload)
        return (1).to_bytes(4, "big") + kind + declared.to_bytes(8, "big") + payload
    return (size if size is not None else 8 + len(payload)).to_bytes(4, "big") + kind + payload


@pytest.mark.parametrize(("data", "cut"), [
    (_box(b"ftyp", b"isom") + _box(b"moov", b"x" * 8) + _box(b"mdat", b"y" * 8), None),
    (_box(b"ftyp", b"isom") + _box(b"mdat", size=100) + b"y" * 20, ("mdat", 112)),
    (_box(b"ftyp", b"isom") + _box(b"mdat", b"y" * 4, size=1 << 20, large=True),
     ("mdat", 12 + (1 << 20))),
    (_box(b"ftyp", b"isom") + _box(b"moof", size=64), ("moof", 76)),
    # Only media boxes count: a cut trailing metadata box loses no samples.
    (_box(b"ftyp", b"isom") + _box(b"mdat", b"y") + _box(b"udta", size=99), None),
    (_box(b"ftyp", b"isom") + _box(b"mdat", size=0) + b"y" * 9, None),  # runs to the end
    (_box(b"ftyp", b"isom") + _box(b"mdat", size=3), None),  # malformed: FFmpeg's call
])
def test_cut_isobmff_box(data: bytes, cut: tuple[str, int] | None) -> None:
    from ivvae.video import sniff

    assert sniff.cut_isobmff_box(io.BytesIO(data), len(data)) == cut


def test_cut_isobmff_box_walks_a_bounded_number_of_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae.video import sniff

    data = _box(b"free") * 10 + _box(b"mdat", size=100)
    assert sniff.cut_isobmff_box(io.BytesIO(data), len(data)) == ("mdat", 180)
    monkeypatch.setattr(sniff, "MAX_TOP_LEVEL_BOXES", 10)
    assert sniff.cut_isobmff_box(io.BytesIO(data), len(data)) is None


def _riff(kind: bytes, size: int, payload: bytes) -> bytes:
    return kind + size.to_bytes(4, "little") + payload


def _avi(movi: bytes, *, riff_size: int | None = None, movi_size: int | None = None,
         tail: bytes = b"") -> bytes:
    """A RIFF AVI holding an ``hdrl`` list, a ``movi`` list with ``movi`` as its chunks,
    then ``tail`` (an index)."""
    hdrl = _riff(b"LIST", 8, b"hdrl" + b"h" * 4)
    movi_list = _riff(b"LIST", movi_size or 4 + len(movi), b"movi" + movi)
    body = b"AVI " + hdrl + movi_list + tail
    return _riff(b"RIFF", riff_size or len(body), body)


_FRAMES = _riff(b"00dc", 4, b"f" * 4) * 3
_INDEX = _riff(b"idx1", 16, b"i" * 16)


@pytest.mark.parametrize(("data", "cut"), [
    (_avi(_FRAMES, tail=_INDEX), None),
    # The movi list (it starts at byte 28) declares more frames than the file has.
    (_avi(_FRAMES, movi_size=100), ("movi", 28 + 8 + 100)),
    (_avi(_FRAMES, tail=_INDEX)[:-len(_INDEX) - 12], ("movi", 28 + 12 + len(_FRAMES))),
    # Only the index is cut, or the RIFF size is a little too large: no frame is lost.
    (_avi(_FRAMES, tail=_INDEX)[:-4], None),
    (_avi(_FRAMES, riff_size=200), None),
    # Cut before the movi list began.
    (_avi(_FRAMES)[:28], ("RIFF", 8 + 4 + 16 + 12 + len(_FRAMES))),
    # An OpenDML file: a second RIFF (AVIX) whose own movi list is cut.
    (_avi(_FRAMES) + _riff(b"RIFF", 4 + 12 + 50, b"AVIX" + _riff(b"LIST", 54, b"movi")),
     ("movi", 8 + 4 + 16 + 12 + len(_FRAMES) + 12 + 8 + 54)),
    # ... or whose header is cut.
    (_avi(_FRAMES) + b"RIFF\x10", ("RIFF", 8 + 4 + 16 + 12 + len(_FRAMES) + 12)),
    (_avi(_FRAMES) + b"\0\0", None),  # padding, not a chunk
    (_riff(b"RIFF", 0xFFFFFFFF, b"AVI " + b"x" * 8), None),  # written to a pipe
    (_avi(_FRAMES, movi_size=0xFFFFFFFF), None),
    (_avi(_FRAMES) + _riff(b"JUNK", 99, b""), None),
])
def test_cut_avi_movi(data: bytes, cut: tuple[str, int] | None) -> None:
    from ivvae.video import sniff

    assert sniff.cut_avi_movi(io.BytesIO(data), len(data)) == cut


def test_cut_matroska_cluster_with_a_void_between_clusters() -> None:
    from ivvae.video import sniff

    def element(kind: bytes, payload: bytes, *, size: int | None = None) -> bytes:
        return kind + bytes([0x80 | (size if size is not None else len(payload))]) + payload

    cluster = element(b"\x1f\x43\xb6\x75", b"c" * 8)
    void = element(b"\xec", b"\0" * 4)
    cues = element(b"\x1c\x53\xbb\x6b", b"q" * 8)
    header = element(b"\x1a\x45\xdf\xa3", b"")

    def segment(*children: bytes, size: int) -> bytes:
        return b"\x18\x53\x80\x67" + (size | 1 << 56).to_bytes(8, "big") + b"".join(children)

    whole = [cluster, void, cluster, cluster]
    declared = sum(len(child) for child in whole)
    data = header + segment(*whole[:3], size=declared)  # the last cluster is missing
    assert sniff.cut_matroska_cluster(io.BytesIO(data), len(data)) == (
        "Segment", len(header) + 12 + declared)
    data = header + segment(cluster, cues, size=declared)  # an index ends the media data
    assert sniff.cut_matroska_cluster(io.BytesIO(data), len(data)) is None
    data = header + segment(cluster, void, cluster[:5], size=declared)
    assert sniff.cut_matroska_cluster(io.BytesIO(data), len(data)) == (
        "Cluster", len(header) + 12 + 2 * len(cluster) + len(void))


def test_cut_matroska_cluster_leaves_malformed_files_to_ffmpeg() -> None:
    from ivvae.video import sniff

    data = media.make_video(None, frames=8, width=64, height=48, container="mkv")
    cluster = next(offset for kind, offset, _ in _ebml_children(data) if kind == 0x1F43B675)
    broken = data[:cluster] + b"\0" * 16 + data[cluster + 16 :]  # an id of length 0
    assert sniff.cut_matroska_cluster(io.BytesIO(broken), len(broken)) is None
    not_ebml = b"\0" * 64
    assert sniff.cut_matroska_cluster(io.BytesIO(not_ebml), len(not_ebml)) is None
