"""Preprocessing applied by the reader on real clips, checked against PyAV decoding them
independently (every frame, then the selection the timestamps say, then the same swscale
resize)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest

from ivvae.errors import InvalidInput, TooLarge
from ivvae.video import Preprocess, VideoLimits, open_video
from tests import media
from tests.media import make_video, sample_clip

Frames = npt.NDArray[np.uint8]


def _reference(path: Path) -> tuple[list[av.VideoFrame], list[float]]:
    """Every decoded frame of ``path`` and its time in seconds from the first frame."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    times = [float(f.time) for f in frames]
    return frames, [t - times[0] for t in times]


def _scaled(frame: av.VideoFrame, width: int, height: int) -> Frames:
    interpolation = "AREA" if width * height < frame.width * frame.height else "BICUBIC"
    out: Frames = frame.to_ndarray(format="rgb24", width=width, height=height,
                                   interpolation=interpolation)
    return out


def _read(source: Path | bytes, params: dict[str, str],
          limits: VideoLimits = VideoLimits()) -> tuple[Frames, object]:
    with open_video(source if isinstance(source, bytes) else str(source), limits=limits,
                    preprocess=Preprocess.parse(params)) as reader:
        return reader.read_all(), reader.plan


def test_bucket_on_a_720p_clip() -> None:
    path = sample_clip("bigbuckbunny")
    frames, _ = _read(path, {"bucket": "480x272x17,272x480x17"})
    assert frames.shape == (17, 272, 480, 3)
    ref, _ = _reference(path)
    # Cover: 1280x720 -> 484x272, then the middle 480 columns.
    expected = np.stack([_scaled(f, 484, 272)[:, 2:482] for f in ref[:17]])
    np.testing.assert_array_equal(frames, expected)


def test_window_and_target_fps_select_by_timestamp() -> None:
    path = sample_clip("bigbuckbunny")  # 25 fps
    frames, _ = _read(path, {"start_s": "1.02", "fps": "10", "num_frames": "9",
                             "resize": "128"})
    ref, times = _reference(path)
    picked = []
    for k in range(9):
        target = 1.02 + k / 10
        picked.append(max(i for i, t in enumerate(times) if t <= target + 1e-6))
    assert picked[:3] == [25, 28, 30]  # 1.00 s, 1.12 s, 1.20 s: on screen at 1.02, 1.12, 1.22
    expected = np.stack([_scaled(ref[i], 228, 128) for i in picked])
    np.testing.assert_array_equal(frames, expected)


def test_start_frame_stride_and_repeat_up() -> None:
    path = sample_clip("carphone_pristine")  # 176x144, 30000/1001 fps
    ref, times = _reference(path)
    frames, _ = _read(path, {"start_frame": "5", "stride": "4", "max_frames": "7"})
    np.testing.assert_array_equal(
        frames, np.stack([_scaled(ref[i], 176, 144) for i in range(5, 33, 4)]))
    frames, _ = _read(path, {"fps": "60", "num_frames": "10", "resize": "96x64",
                             "crop": "none"})
    # Each output time takes the frame on screen then, timestamps within rounding (a
    # millisecond) early: 29.97 fps frame 1 starts 0.03 ms after 2 / 60 s, so it is there.
    picked = [max(i for i, t in enumerate(times) if t <= k / 60 + 1e-3) for k in range(10)]
    assert picked[:4] == [0, 0, 1, 1]
    np.testing.assert_array_equal(frames, np.stack([_scaled(ref[i], 96, 64) for i in picked]))


def test_max_frames_takes_from_a_long_clip_instead_of_refusing() -> None:
    path = sample_clip("bikes")  # 250 frames
    limits = VideoLimits(max_frames=40)
    # Refused from the header, before a frame is used.
    with pytest.raises(TooLarge, match="declares 250 frames, over the limit of 40; max_frames"):
        _read(path, {"resize": "64"}, limits)
    frames, _ = _read(path, {"resize": "64", "max_frames": "33"}, limits)
    assert frames.shape == (33, 64, 151, 3)
    with pytest.raises(TooLarge, match="33 frames exceed the limit of 20"):
        _read(path, {"num_frames": "33"}, VideoLimits(max_frames=20))


def test_source_limits_are_apart_from_output_limits(tmp_path: Path) -> None:
    big = make_video(None, frames=3, width=640, height=480)
    small = VideoLimits(max_pixels=128 * 128)
    with pytest.raises(TooLarge, match="640x480"):
        _read(big, {}, small)
    frames, _ = _read(big, {"resize": "96"},
                      VideoLimits(max_pixels=128 * 128, max_source_pixels=640 * 480))
    assert frames.shape == (3, 96, 128, 3)
    with pytest.raises(TooLarge, match="declares"):
        _read(big, {}, VideoLimits(max_source_seconds=0.05))


def test_short_clips_and_empty_windows_are_refused_clearly() -> None:
    clip = make_video(None, frames=10, width=64, height=48)
    with pytest.raises(InvalidInput, match="fewer than the shortest bucket's 17"):
        _read(clip, {"bucket": "64x48x17"})
    with pytest.raises(InvalidInput, match="num_frames asks for 17"):
        _read(clip, {"num_frames": "17"})
    with pytest.raises(InvalidInput, match="window starts after the clip ends"):
        _read(clip, {"start_frame": "50"})
    frames, _ = _read(clip, {"bucket": "64x48x17,32x32x9"})
    assert frames.shape == (9, 32, 32, 3)


def test_an_edit_list_trimmed_clip_gets_the_bucket_it_fills() -> None:
    # 17 samples, 13 shown: the 17-frame bucket was picked, then refused as 13 came out.
    clip = media.trim_by_edit_list(make_video(None, frames=17, width=64, height=48), skip=4)
    frames, plan = _read(clip, {"bucket": "64x48x17,64x48x9"})
    assert frames.shape == (9, 48, 64, 3)
    assert str(plan.bucket) == "64x48x9"  # type: ignore[attr-defined]
    frames, _ = _read(clip, {"fps": "12"})
    assert len(frames) == 7  # 13 frames at 24 fps last 0.54 s: 12 fps shows 7


def test_rotated_clip_is_resized_upright() -> None:
    clip = make_video(None, frames=2, width=64, height=32, rotation=90)
    frames, _ = _read(clip, {"resize": "16"})
    assert frames.shape == (2, 32, 16, 3)
    plain, _ = _read(clip, {})
    assert plain.shape == (2, 64, 32, 3)


def test_frames_in_memory_take_the_same_path() -> None:
    from ivvae.video import open_frames
    from tests.media import make_frames

    frames = make_frames(10, 64, 48)
    with open_frames(frames, fps=10, preprocess=Preprocess.parse(
            {"fps": "5", "resize": "24"})) as reader:
        out = reader.read_all()
        assert (reader.plan.fps, reader.info.num_frames) == (5, 10)
    expected = np.stack([_scaled(av.VideoFrame.from_ndarray(frames[i], format="rgb24"),
                                 32, 24) for i in range(0, 10, 2)])
    np.testing.assert_array_equal(out, expected)
    with open_frames(frames) as reader:
        np.testing.assert_array_equal(reader.read_all(), frames)
    with pytest.raises(InvalidInput, match="uint8"):
        open_frames(frames.astype(np.float32))


@pytest.mark.parametrize(("fps", "rate"), [(24, "24"), (24000 / 1001, "24000/1001")])
def test_resampling_a_millisecond_timestamped_clip_at_its_own_rate_keeps_every_frame(
        fps: float, rate: str) -> None:
    # Matroska rounds timestamps to the millisecond: 24 fps frame 1 is "at 0.042 s", after
    # the output time 1/24 s, which took frame 0 twice and dropped frame 1 (and every
    # third one after it).
    data = make_video(None, frames=24, width=32, height=32, fps=fps, container="mkv")
    plain, _ = _read(data, {})
    resampled, _ = _read(data, {"fps": rate})
    assert resampled.shape == plain.shape == (24, 32, 32, 3)
    np.testing.assert_array_equal(resampled, plain)



def _gap_ts(gap_s: int) -> bytes:
    """An MPEG-TS of 10 small frames, the last ``gap_s`` seconds after the others."""
    import io
    from fractions import Fraction

    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        for i, pts in enumerate([*range(9), 9 + gap_s * 24]):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8),
                                               format="rgb24")
            frame.pts = pts
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_a_timestamp_gap_resampled_past_max_frames_is_refused_before_its_copies() -> None:
    # 10 minutes between two frames of a 3 KB file, at fps=24: 14,400 copies of one frame.
    # The cap fired only after 2048 had come out (and been encoded: 74 s of CPU for a
    # 17 KB upload with a 3-hour gap).
    data = _gap_ts(600)
    out = 0
    with pytest.raises(TooLarge, match="more than 2048 frames after preprocessing"), \
            open_video(data, preprocess=Preprocess.parse({"fps": "24"})) as reader:
        for chunk in reader.iter_frames(8):
            out += len(chunk)
    assert out <= 16  # the frames before the gap, at most
    with open_video(data) as reader:  # as it is: its ten frames
        assert len(reader.read_all()) == 10
