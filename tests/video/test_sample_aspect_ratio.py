"""Anamorphic clips (a sample aspect ratio other than 1:1, e.g. a 720x480 DVD picture of SAR
32:27 that players show as 16:9, 853x480): the reader reports the shape a player shows,
plans ``resize`` and ``bucket`` from it and gives square pixels then, keeps the stored
pixels otherwise; the MP4 writer carries a SAR it is given."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from ivvae.outputs import _Chunks
from ivvae.video import Bucket, Mp4Writer, Plan, Preprocess, open_video
from tests.media import make_frames, make_video

Frames = npt.NDArray[np.uint8]
DVD = Fraction(32, 27)


@pytest.fixture(scope="module")
def dvd() -> bytes:
    """720x480 H.264 in MP4, SAR 32:27: shown 16:9."""
    return make_video(None, frames=5, width=720, height=480, sample_aspect_ratio=DVD)


@pytest.fixture(scope="module")
def square() -> bytes:
    """The same pictures with square pixels: shown 3:2."""
    return make_video(None, frames=5, width=720, height=480)


def _read(data: bytes, params: dict[str, str] | None = None) -> tuple[Frames, Plan]:
    with open_video(data, preprocess=Preprocess.parse(params or {})) as reader:
        return reader.read_all(), reader.plan


def _stored(data: bytes, width: int, height: int) -> Frames:
    """The oracle: PyAV's own decode of every frame, scaled by swscale straight to
    ``width`` x ``height`` (the stored picture, whatever its SAR)."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24", width=width, height=height,
                                      interpolation="AREA")
                         for f in container.decode(video=0)])


def _sar_of(data: bytes) -> Fraction | None:
    with av.open(io.BytesIO(data)) as container:
        sar = container.streams.video[0].sample_aspect_ratio
    return None if sar is None else Fraction(sar)


def test_the_test_clip_is_anamorphic(dvd: bytes, square: bytes) -> None:
    with av.open(io.BytesIO(dvd)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (720, 480)
        assert stream.sample_aspect_ratio == stream.codec_context.sample_aspect_ratio == DVD
        assert stream.display_aspect_ratio == Fraction(16, 9)
    assert b"pasp" in dvd  # the MP4 says it too, not only the H.264 VUI
    assert _sar_of(square) is None


def test_the_reader_reports_the_sar_and_the_displayed_size(dvd: bytes, square: bytes) -> None:
    with open_video(dvd) as reader:
        info = reader.info
    assert (info.width, info.height, info.sample_aspect_ratio) == (720, 480, DVD)
    assert (info.display_width, info.display_height) == (853, 480)
    with open_video(square) as reader:
        info = reader.info
    assert (info.sample_aspect_ratio, info.display_width, info.display_height) == (1, 720, 480)


@pytest.mark.parametrize("params", [{}, {"start_frame": "1", "num_frames": "3"}])
def test_without_resize_the_stored_pixels_come_out(dvd: bytes, square: bytes,
                                                   params: dict[str, str]) -> None:
    frames, plan = _read(dvd, params)
    # No hidden resampling: the stored 720x480 pixels as PyAV decodes them, and the plan
    # says how they are shown.
    first = int(params.get("start_frame", "0"))
    np.testing.assert_array_equal(frames, _stored(dvd, 720, 480)[first:first + len(frames)])
    assert len(frames) == int(params.get("num_frames", "5"))
    assert plan.sample_aspect_ratio == DVD
    assert _read(square, params)[1].sample_aspect_ratio == 1


def test_a_bucket_is_chosen_by_the_displayed_aspect(dvd: bytes, square: bytes) -> None:
    buckets = {"bucket": "480x272x5,320x240x5"}
    frames, plan = _read(dvd, buckets)
    assert plan.bucket == Bucket(480, 272, 5) and plan.sample_aspect_ratio == 1
    # Cover: the 853.3x480 picture -> 484x272 (the stored 720x480 scaled straight there),
    # then the middle 480 columns: nothing squeezed, 2 columns cut each side.
    np.testing.assert_array_equal(frames, _stored(dvd, 484, 272)[:, :, 2:482])
    # The control: the same pixels shown square are 3:2, nearer 4:3.
    _, plan = _read(square, buckets)
    assert plan.bucket == Bucket(320, 240, 5)


def test_resize_plans_from_the_displayed_size(dvd: bytes) -> None:
    frames, plan = _read(dvd, {"resize": "240"})
    # 853.3 x 480 shown: the short side 240 makes it 426.7 -> 427 wide (stored: 360).
    assert (plan.width, plan.height, plan.sample_aspect_ratio) == (427, 240, 1)
    np.testing.assert_array_equal(frames, _stored(dvd, 427, 240))
    # An exact 16:9 size takes the whole picture: nothing to crop.
    frames, plan = _read(dvd, {"resize": "480x270"})
    assert not plan.geometry.crops
    np.testing.assert_array_equal(frames, _stored(dvd, 480, 270))


def test_a_turned_anamorphic_clip() -> None:
    # Stored 64x48 with pixels shown twice as wide (128x48), turned a quarter: 48x128,
    # so resize=24 makes it 24x64 (square pixels would give 24x32).
    data = make_video(None, frames=3, width=64, height=48, rotation=90,
                      sample_aspect_ratio=Fraction(2))
    with open_video(data) as reader:
        info = reader.info
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    assert info.sample_aspect_ratio == Fraction(1, 2)  # the upright picture's pixels
    assert (info.display_width, info.display_height) == (48, 128)
    frames, plan = _read(data, {"resize": "24"})
    assert frames.shape == (3, 64, 24, 3) and plan.sample_aspect_ratio == 1


def test_matroska_carries_it_too() -> None:
    data = make_video(None, frames=3, width=64, height=48, container="mkv",
                      sample_aspect_ratio=Fraction(4, 3))
    with open_video(data) as reader:
        assert reader.info.sample_aspect_ratio == Fraction(4, 3)
        assert (reader.info.display_width, reader.info.display_height) == (85, 48)


def test_an_unbelievable_sar_is_square() -> None:
    data = make_video(None, frames=3, width=64, height=48, sample_aspect_ratio=Fraction(5))
    assert _sar_of(data) == 5
    with open_video(data) as reader:
        assert reader.info.sample_aspect_ratio == 1


def test_a_still_images_pixel_density_is_no_shape() -> None:
    # FFmpeg reads a JPEG's JFIF density (144x72 dpi) as SAR 2; viewers show it square.
    buffer = io.BytesIO()
    Image.fromarray(make_frames(1, 64, 48)[0]).save(buffer, "JPEG", dpi=(144, 72))
    assert _sar_of(buffer.getvalue()) == 2
    with open_video(buffer.getvalue()) as reader:
        assert reader.info.sample_aspect_ratio == 1
        assert reader.read_all().shape == (1, 48, 64, 3)


@pytest.mark.parametrize("fragmented", [False, True])
def test_the_mp4_writer_carries_a_sar(fragmented: bool) -> None:
    frames = make_frames(5, 64, 48)
    outputs = []
    for sar in (Fraction(1), Fraction(128, 117)):
        # Non-seekable: the fragmented MP4 the service streams (outputs' own sink).
        sink: io.BytesIO | _Chunks = _Chunks() if fragmented else io.BytesIO()
        with Mp4Writer(sink, width=64, height=48, fps=24, sample_aspect_ratio=sar) as writer:
            writer.write(frames)
        outputs.append(sink.take() if isinstance(sink, _Chunks) else sink.getvalue())
    plain, anamorphic = outputs
    assert _sar_of(plain) is None  # square pixels: the file says nothing, as before
    assert _sar_of(anamorphic) == Fraction(128, 117)
    with open_video(anamorphic) as reader:
        assert reader.info.sample_aspect_ratio == Fraction(128, 117)
        assert (reader.info.display_width, reader.info.display_height) == (70, 48)
    with pytest.raises(ValueError, match="sample_aspect_ratio"):
        Mp4Writer(io.BytesIO(), width=8, height=8, fps=24, sample_aspect_ratio=Fraction(9))
