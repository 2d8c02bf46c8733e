"""Preprocessing options: parsing, contradictions, canonical strings, per-clip decisions."""

from __future__ import annotations

from fractions import Fraction

import pytest

from ivvae.errors import InvalidInput
from ivvae.video.preprocess import PREPROCESS_KEYS, Bucket, Geometry, Preprocess, Resize


def test_parse_and_canonical_round_trip() -> None:
    p = Preprocess.parse([("bucket", "480x272x17, 256X256x17"), ("bucket", "272x480x33"),
                          ("fps", "12.50"), ("start_s", "1.5")])
    assert p.buckets == (Bucket(256, 256, 17), Bucket(272, 480, 33), Bucket(480, 272, 17))
    assert p.fps == Fraction(25, 2) and p.start_s == Fraction(3, 2)
    assert p.canonical() == "bucket=256x256x17,272x480x33,480x272x17;start_s=3/2;fps=25/2"
    assert Preprocess.from_canonical(p.canonical()) == p
    assert Preprocess.parse(p.to_params()) == p


def test_spellings_of_the_same_options_share_one_canonical_string() -> None:
    a = Preprocess.parse({"fps": "12.5", "resize": "64x48", "crop": "center"})
    b = Preprocess.parse([("crop", "CENTER"), ("resize", "64X48"), ("fps", "25/2")])
    assert a.canonical() == b.canonical()
    assert Preprocess().canonical() == "" and Preprocess().is_identity
    assert Preprocess.parse({"resize": "64"}).canonical() != Preprocess.parse(
        {"resize": "65"}).canonical()


@pytest.mark.parametrize(("params", "named"), [
    ({"resize": "64", "bucket": "8x8x1"}, "'bucket' and 'resize'"),
    ({"start_frame": "1", "start_s": "1"}, "'start_frame' and 'start_s'"),
    ({"stride": "2", "fps": "12"}, "'stride' and 'fps'"),
    ({"num_frames": "5", "max_frames": "9"}, "'num_frames' and 'max_frames'"),
    ({"bucket": "8x8x1", "num_frames": "9"}, "'bucket' and 'num_frames'"),
    ({"crop": "center"}, "'crop'"),
    ({"crop": "middle", "resize": "8x8"}, "'crop'"),
    ({"resize": "0"}, "'resize'"),
    ({"resize": "abc"}, "'resize'"),
    ({"resize": "99999"}, "'resize'"),
    ({"bucket": "480x272"}, "'bucket'"),
    ({"bucket": ""}, "'bucket'"),
    ({"bucket": "0x8x8"}, "'bucket'"),
    ({"stride": "0"}, "'stride'"),
    ({"stride": "-1"}, "'stride'"),
    ({"num_frames": "1.5"}, "'num_frames'"),
    ({"fps": "0"}, "'fps'"),
    ({"fps": "nan"}, "'fps'"),
    ({"fps": "1/0"}, "'fps'"),
    ({"start_s": "-1"}, "'start_s' must be >= 0"),  # not "must be a number": it is one
    ({"fps": "-5"}, "'fps' must be > 0"),
    ({"size": "64"}, "'size'"),
])
def test_bad_options_name_the_problem(params: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidInput, match=named):
        Preprocess.parse(params)


def test_repeated_option_and_caller_keys() -> None:
    with pytest.raises(InvalidInput, match="more than once"):
        Preprocess.parse([("fps", "12"), ("fps", "24")])
    p = Preprocess.parse({"model": "x", "fps": "12"}, other_keys={"model"})
    assert p.fps == 12
    with pytest.raises(InvalidInput, match="other options here: model"):
        Preprocess.parse({"modle": "x"}, other_keys={"model"})
    assert set(Preprocess().to_params()) <= set(PREPROCESS_KEYS)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidInput):
        Preprocess(resize=Resize(short_side=8, width=8, height=8))
    with pytest.raises(InvalidInput):
        Preprocess(resize=Resize())


def test_geometry() -> None:
    assert Preprocess.parse({"resize": "256"}).geometry(3840, 2160) == Geometry(
        455, 256, 0, 0, 455, 256)
    assert Preprocess.parse({"resize": "256"}).geometry(720, 1280) == Geometry(
        256, 455, 0, 0, 256, 455)
    cover = Preprocess.parse({"resize": "480x272"}).geometry(1280, 720)
    assert (cover.width, cover.height) == (480, 272) and cover.scaled_height == 272
    assert cover.scaled_width == 484 and cover.left == 2
    stretch = Preprocess.parse({"resize": "480x272", "crop": "none"}).geometry(1280, 720)
    assert stretch == Geometry(480, 272, 0, 0, 480, 272)
    assert Preprocess().geometry(33, 17) == Geometry(33, 17, 0, 0, 33, 17)


def test_bucket_choice() -> None:
    p = Preprocess.parse({"bucket": "480x272x17,480x272x33,272x480x17,256x256x9"})
    assert p.choose_bucket(1280, 720, 100) == Bucket(480, 272, 33)
    assert p.choose_bucket(1280, 720, 20) == Bucket(480, 272, 17)
    assert p.choose_bucket(720, 1280, 100) == Bucket(272, 480, 17)
    assert p.choose_bucket(500, 520, 100) == Bucket(256, 256, 9)
    # Shorter than every wide bucket: the closest aspect ratio it fills.
    assert p.choose_bucket(1280, 720, 10) == Bucket(256, 256, 9)
    with pytest.raises(InvalidInput, match="fewer than the shortest bucket's 9"):
        p.choose_bucket(1280, 720, 5)
    assert p.choose_bucket(1280, 720, None) == Bucket(480, 272, 33)
    assert Preprocess().choose_bucket(8, 8, 1) is None


def test_an_anamorphic_picture_is_planned_from_its_displayed_shape() -> None:
    dvd = Fraction(32, 27)  # 720x480 shown 853.3x480 (16:9)
    buckets = Preprocess.parse({"bucket": "480x272x5,320x240x5"})
    assert buckets.choose_bucket(720, 480, 5) == Bucket(320, 240, 5)  # read as 3:2
    assert buckets.choose_bucket(720, 480, 5, dvd) == Bucket(480, 272, 5)
    plan = buckets.plan(720, 480, 5, 24.0, dvd)
    assert plan.geometry == Geometry(484, 272, 2, 0, 480, 272)
    assert plan.sample_aspect_ratio == 1  # resampled: square pixels
    short = Preprocess.parse({"resize": "240"})
    # Exactly 426.67 wide, not 853 (the rounded width) * 240 / 480 = 426.5 -> 426.
    assert short.geometry(720, 480, None, dvd) == Geometry(427, 240, 0, 0, 427, 240)
    assert short.geometry(480, 720, None, 1 / dvd) == Geometry(240, 427, 0, 0, 240, 427)
    assert short.geometry(720, 480) == Geometry(360, 240, 0, 0, 360, 240)
    # Without resize or bucket the stored pixels stay, and the plan says how they are shown.
    assert Preprocess().geometry(720, 480, None, dvd) == Geometry(720, 480, 0, 0, 720, 480)
    assert Preprocess.parse({"max_frames": "3"}).plan(720, 480, 5, 24.0, dvd) \
        .sample_aspect_ratio == dvd
    assert Preprocess.parse({"resize": "9x9"}).resamples
    assert not Preprocess.parse({"fps": "12", "num_frames": "3"}).resamples


def test_available_frames() -> None:
    assert Preprocess().available_frames(100, 25.0) == 100
    assert Preprocess.parse({"start_frame": "10", "stride": "3"}).available_frames(
        100, 25.0) == 30
    assert Preprocess.parse({"fps": "12.5"}).available_frames(100, 25.0) == 50
    assert Preprocess.parse({"fps": "50", "start_s": "2"}).available_frames(100, 25.0) == 100
    assert Preprocess.parse({"start_frame": "200"}).available_frames(100, 25.0) == 0
    assert Preprocess().available_frames(None, 25.0) is None


def _select(params: dict[str, str], times: list[float], fps: float) -> list[int]:
    """Indices of the source frames a selector emits, repeats included."""
    selector = Preprocess.parse(params).plan(64, 64, None, fps).selector(fps)
    out: list[int] = []
    for i, t in enumerate(times):
        out += [i - 1] * selector.push(t)
    out += [len(times) - 1] * selector.finish()
    return out


def test_selector_by_index_and_time() -> None:
    times = [i / 10 for i in range(10)]
    assert _select({}, times, 10) == list(range(10))
    assert _select({"start_frame": "3", "stride": "3"}, times, 10) == [3, 6, 9]
    # start_s: the frame on screen at that time, then every frame.
    assert _select({"start_s": "0.25"}, times, 10) == list(range(2, 10))
    assert _select({"start_s": "0.3"}, times, 10) == list(range(3, 10))
    # fps: drop (5 fps from 10) and repeat (20 fps from 10), by timestamp.
    assert _select({"fps": "5"}, times, 10) == [0, 2, 4, 6, 8]
    assert _select({"fps": "20"}, times, 10) == [i // 2 for i in range(20)]
    assert _select({"fps": "4", "start_s": "0.1"}, times, 10) == [1, 3, 6, 8]
    # Variable frame rate: a frame held for a long time is repeated.
    assert _select({"fps": "10"}, [0.0, 0.1, 0.5], 10) == [0, 1, 1, 1, 1, 2]
    # start_frame with fps: the targets run from that frame's time (it was ignored).
    assert _select({"fps": "5", "start_frame": "3"}, times, 10) == [3, 5, 7, 9]
    assert _select({"fps": "5", "start_frame": "3"}, times, 10) == _select(
        {"fps": "5", "start_s": "0.3"}, times, 10)


def test_a_start_at_an_output_time_rounds_as_the_whole_clip() -> None:
    # Matroska's millisecond timestamps: 29.97 fps frames end at 0.501 s, 0.534 s, ...; at
    # 24 fps the output time 0.5 s is within the millisecond tolerance of frame 14's start
    # (0.501 - 0.001). Read from the start or from output frame 12 (start_s = 12/24), the
    # frames from there on are the same ones.
    times = [round(i / 29.97, 3) for i in range(60)]
    whole = _select({"fps": "24"}, times, 29.97)
    for first in range(len(whole) - 5):
        window = _select({"fps": "24", "start_s": f"{first}/24"}, times, 29.97)
        assert window[:5] == whole[first:first + 5], first
    # A start frame starts at its time, as start_s at that time (its millisecond fraction)
    # does, on the tolerance's edge too (23.976 fps read at 12).
    times = [round(i / (24000 / 1001), 3) for i in range(60)]
    for first in range(50):
        by_frame = _select({"fps": "12", "start_frame": str(first)}, times, 24000 / 1001)
        by_time = _select({"fps": "12", "start_s": f"{round(times[first] * 1000)}/1000"},
                          times, 24000 / 1001)
        assert by_frame == by_time and by_frame[0] == first, first


def test_a_variable_rate_clip_is_not_refused_early_for_a_rough_count() -> None:
    # Its average rate places a time start only roughly: a few frames short is not known to
    # be short before decoding (the reader refuses one that ends short).
    options = Preprocess.parse({"fps": "24", "start_s": "55/24", "num_frames": "5"})
    with pytest.raises(InvalidInput, match=r"the clip has 4 frames .* asks for 5"):
        options.plan(8, 8, 80, 960 / 29)
    assert options.plan(8, 8, 80, 960 / 29, variable_rate=True).frame_limit == 5
    # Far short: refused, saying the count it has (not the count plus the slack).
    with pytest.raises(InvalidInput, match=r"the clip has 0 frames .* asks for 5"):
        Preprocess.parse({"fps": "24", "start_s": "80/24", "num_frames": "5"}).plan(
            8, 8, 80, 960 / 29, variable_rate=True)


def test_the_last_frame_lasts_until_the_declared_end_unless_that_is_rounding() -> None:
    def count(fps: str, times: list[float], rate: float, end: float | None) -> int:
        selector = Preprocess.parse({"fps": fps}).plan(8, 8, len(times), rate).selector(rate)
        return sum(selector.push(t) for t in times) + selector.finish(end)

    # Variable rate, declaring its end (28 frames over 40/24 s, average 16.8 fps): 40
    # frames at 24 fps, as the plan counts (28 / 16.8 * 24), not 41 (1 / 16.8 for the last).
    times = [t / 24 for t in [0, 1, 2, 5, 6, 7, 12, 13, 20, 21, *range(22, 40)]]
    assert count("24", times, 16.8, 40 / 24) == 40
    assert count("24", times, 16.8, None) == 41
    # A stream-copied trim of a 24000/1001 clip declares 1.21 s for 29 frames (1.2095 s):
    # that is rounding, not a longer last frame; resampled at its own rate it keeps 29.
    rate = 24000 / 1001
    trim = [i / rate for i in range(29)]
    assert count(f"{24000}/{1001}", trim, rate, 1.21) == count(f"{24000}/{1001}", trim, rate,
                                                               None) == 29


def test_plan() -> None:
    plan = Preprocess.parse({"bucket": "480x272x17"}).plan(1280, 720, 100, 25.0)
    assert (plan.width, plan.height, plan.frame_limit, plan.exact) == (480, 272, 17, True)
    assert Preprocess.parse({"stride": "2"}).plan(8, 8, 10, 30.0).fps == 15
    assert Preprocess.parse({"fps": "30000/1001"}).plan(8, 8, 10, 25.0).fps == Fraction(
        30000, 1001)
    with pytest.raises(InvalidInput, match="num_frames asks for 17"):
        Preprocess.parse({"num_frames": "17"}).plan(8, 8, 10, 25.0)
    assert Preprocess.parse({"max_frames": "17"}).plan(8, 8, 10, 25.0).frame_limit == 17


def test_every_option_has_its_one_line_of_help_and_the_dataset_cli_shows_it() -> None:
    import argparse

    from ivvae.dataset.command import add_arguments
    from ivvae.video.preprocess import OPTION_HELP, PREPROCESS_KEYS

    assert set(OPTION_HELP) == set(PREPROCESS_KEYS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["src", "out", "--bucket", "64x64x9", "--bucket", "32x64x5",
                              "--fps", "12"])
    assert args.bucket == ["64x64x9", "32x64x5"] and args.fps == "12"
    assert OPTION_HELP["num_frames"] in " ".join(parser.format_help().split())
