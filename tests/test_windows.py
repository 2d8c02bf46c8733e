"""``ivvae windows``: long clips cut into fixed-length windows that ``encode-dataset`` encodes
as a clip each. Real clips decoded by PyAV; the windows' frames are checked against the
whole clip's, read the same way; encoded locally and from a real S3 server (moto)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from fractions import Fraction
from pathlib import Path

import fsspec
import numpy as np
import pytest

from ivvae.cli import main
from ivvae.data import LatentDataset
from ivvae.dataset import Columns, EncoderSpec, encode_dataset
from ivvae.dataset.windows import count_frames, window_start, window_starts
from ivvae.video.preprocess import Preprocess
from ivvae.video.reader import VideoLimits, open_video
from tests import media
from tests.s3_server import S3Server, s3_server  # noqa: F401
from tests.service_fixtures import tiny_weights  # noqa: F401

LIMITS = VideoLimits(max_frames=100_000)


def test_window_starts_back_to_back_sliding_and_spread() -> None:
    assert window_starts(50, 17) == [0, 17]  # 34..50 would need 51 frames
    assert window_starts(51, 17) == [0, 17, 34]
    assert window_starts(30, 17, step=5) == [0, 5, 10]
    assert window_starts(16, 17) == [] and window_starts(17, 17, count=4) == [0]
    assert window_starts(100, 10, count=3) == [0, 45, 90]
    assert window_starts(12, 10, count=5) == [0, 1, 2]  # only three distinct ones
    assert window_start(5, None, None) == ("start_frame", 5)
    assert window_start(5, 3, None) == ("start_frame", 15)
    assert window_start(17, None, Fraction(12)) == ("start_s", "17/12")
    assert window_start(24, None, Fraction(24)) == ("start_s", "1")


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd")
    # Matroska timestamps are in milliseconds: an output time can land exactly on a
    # frame's rounded end. And a phone-style variable-rate MP4 (frames 1 to 3 ticks apart
    # at 60 ticks a second): its average rate does not place a time start exactly.
    media.make_video(folder / "ntsc.webm", frames=60, width=32, height=32, fps=29.97,
                     codec="libvpx-vp9", container="webm")
    ticks = [0]
    for i in range(79):
        ticks.append(ticks[-1] + (1, 1, 2, 3)[(i * 7) % 4])
    media.make_video(folder / "vfr.mp4", frames=80, width=32, height=32, fps=60,
                     timestamps=ticks)
    return {name: folder / name for name in ("ntsc.webm", "vfr.mp4")}


@pytest.mark.parametrize(("name", "stride", "fps", "step"), [
    ("bikes", None, Fraction(12), 23), ("bikes", 2, None, 23), ("bikes", None, None, 23),
    ("bikes", None, Fraction(30000, 1001), 23),
    ("ntsc.webm", None, Fraction(24), 1), ("vfr.mp4", None, Fraction(24), 1),
    ("vfr.mp4", None, Fraction(60), 7)])
def test_each_window_is_its_span_of_the_whole_clip(
        name: str, stride: int | None, fps: Fraction | None, step: int,
        odd_clips: dict[str, Path]) -> None:
    # A clip read whole under the job's time options, and each window read as
    # encode-dataset will read its row: the same frames, bit for bit (a real 25 fps camera
    # clip, and the odd ones above; each window of those at every start).
    clip = odd_clips.get(name) or media.sample_clip(name)
    job = [(k, str(v)) for k, v in (("stride", stride), ("fps", fps)) if v is not None]
    with open_video(clip, limits=LIMITS, preprocess=Preprocess.parse(job)) as reader:
        whole = reader.read_all()
    total = count_frames(clip, stride, fps)
    assert total == len(whole) > 30
    starts = window_starts(total, 9, step=step)
    assert len(starts) >= 3 and starts[-1] + 9 > total - step
    for first in starts:
        option, value = window_start(first, stride, fps)
        window = Preprocess.parse([*job, (option, str(value)), ("num_frames", "9")])
        with open_video(clip, limits=LIMITS, preprocess=window) as reader:
            frames = reader.read_all()
        np.testing.assert_array_equal(frames, whole[first:first + 9], err_msg=f"{option}={value}")


def _clips(folder: Path) -> None:
    folder.mkdir()
    media.make_video(folder / "long.mp4", frames=30, width=32, height=32, fps=10)
    (folder / "long.txt").write_text("a long caption")
    (folder / "long.json").write_text('{"scene": 3, "tags": ["a", "b"]}')
    media.make_video(folder / "short.mp4", frames=5, width=32, height=32, fps=10)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x01" * 500)


def test_a_folder_to_windows_to_latents(tmp_path: Path, tiny_weights: Path,  # noqa: F811
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _clips(tmp_path / "clips")
    table = tmp_path / "clips" / "windows.csv"
    # 30 frames at 10 fps read at 5 fps: 15 frames, windows of 5 every 4: 0, 4, 8.
    code = main(["windows", str(tmp_path / "clips"), str(table), "--num-frames", "5",
                 "--step", "4", "--fps", "5"])
    out, err = capsys.readouterr()
    assert code == 1 and "broken.mp4: not read" in err  # the rest is written
    summary = json.loads(out)
    assert (summary["clips"], summary["windows"], summary["too_short"], summary["failed"]) \
        == (3, 3, 1, 1)
    assert "--fps 5 --option-column start_s --option-column num_frames" in summary["encode"]
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    # The clip, its .json object's columns (a list as JSON), the window.
    assert rows == [{"path": "long.mp4", "scene": "3", "tags": '["a", "b"]', "start_s": s,
                     "num_frames": "5"} for s in ("0", "4/5", "8/5")]

    out_dir = tmp_path / "latents"
    result = asyncio.run(encode_dataset(
        table, out_dir, encoder=EncoderSpec(weights=str(tiny_weights), torch_threads=1),
        format="webdataset", options=_fps(5),
        columns=Columns(options=Columns.parse_options(["start_s", "num_frames"]))))
    assert (result.total, result.encoded, result.failed) == (3, 3, 0)
    ds = LatentDataset(out_dir)
    samples = sorted((ds[i][1] for i in range(len(ds))),
                     key=lambda m: int(m["preprocess_source_first_frame"]))
    # Each window starts at its own source frame (at 10 fps, 0.8 s is frame 8), and the
    # clip's caption beside it travels with every window.
    assert [int(m["preprocess_source_first_frame"]) for m in samples] \
        == [0, 8, 16]
    assert [m["num_frames"] for m in samples] == ["5"] * 3
    assert all(m["sidecars"][".txt"] == b"a long caption" for m in samples)
    # Its .json is the window's row: the clip's own object, and where the window is.
    assert [json.loads(m["sidecars"][".json"]) for m in samples][1] == {
        "path": "long.mp4", "scene": "3", "tags": '["a", "b"]', "start_s": "4/5",
        "num_frames": "5"}


def _fps(value: int) -> object:
    from ivvae.dataset import ClipOptions

    return ClipOptions(preprocess=Preprocess.parse([("fps", str(value))]).canonical())


def test_a_table_keeps_its_rows_and_refuses_a_column_it_would_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _clips(tmp_path / "clips")
    source = tmp_path / "clips" / "list.jsonl"
    source.write_text(json.dumps({"video_path": "long.mp4", "caption": "a dog", "score": 4.5})
                      + "\n" + json.dumps({"video_path": "short.mp4", "caption": "a cat"}) + "\n")
    table = tmp_path / "elsewhere" / "windows.jsonl"
    assert main(["windows", str(source), str(table), "--num-frames", "10",
                 "--count", "3", "--stride", "2"]) == 0
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    whole = str(tmp_path / "clips" / "long.mp4")  # not below the table's folder: whole
    # 30 frames at stride 2: 15; three windows of 10 spread over them: 0, 2 (round 2.5), 5.
    assert rows == [{"video_path": whole, "caption": "a dog", "score": 4.5,
                     "start_frame": 2 * first, "num_frames": 10} for first in (0, 2, 5)]
    assert list(rows[0]) == ["video_path", "caption", "score", "start_frame", "num_frames"]
    capsys.readouterr()
    # The command that reads it names what encode-dataset cannot guess, quoted.
    spaced = tmp_path / "with space" / "w.csv"
    source.write_text(json.dumps({"clip": "long.mp4"}) + "\n")
    assert main(["windows", str(source), str(spaced), "--num-frames", "10",
                 "--path-column", "clip"]) == 0
    encode = json.loads(capsys.readouterr().out)["encode"]
    assert f"encode-dataset '{spaced}' OUT --path-column clip --option-column start_frame" \
        in encode
    # The source table is not written over, however it is spelled.
    again = tmp_path / "clips" / ".." / "clips" / "list.jsonl"
    assert main(["windows", str(source), str(again), "--num-frames", "10",
                 "--path-column", "clip"]) == 2
    assert "is the source table" in capsys.readouterr().err
    assert json.loads(source.read_text()) == {"clip": "long.mp4"}

    source.write_text(json.dumps({"video_path": "long.mp4", "num_frames": 30}) + "\n")
    assert main(["windows", str(source), str(table), "--num-frames", "10"]) == 2
    assert "column 'num_frames'" in capsys.readouterr().err


def test_a_clip_past_the_encoder_s_source_limits_is_named_not_windowed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every window of it would be refused by encode-dataset's encoder, as the service's:
    # the limit is the clip's declared length, not the window's.
    _clips(tmp_path / "clips")
    monkeypatch.setenv("IVVAE_MAX_SOURCE_SECONDS", "2")
    assert main(["windows", str(tmp_path / "clips"), str(tmp_path / "w.csv"),
                 "--num-frames", "3"]) == 1  # short.mp4 (0.5 s) has one window
    out, err = capsys.readouterr()
    assert json.loads(out)["windows"] == 1
    assert "long.mp4: not read" in err and "IVVAE_MAX_SOURCE_SECONDS" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--num-frames", "0"], "--num-frames must be at least 1"),
    (["--num-frames", "5", "--step", "2", "--count", "2"], "give one"),
    (["--num-frames", "5", "--fps", "5", "--stride", "2"], "stride"),
    (["--num-frames", "500"], "no clip of"),
])
def test_refusals_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: list[str], message: str) -> None:
    _clips(tmp_path / "clips")
    table = tmp_path / "windows.csv"
    assert main(["windows", str(tmp_path / "clips"), str(table), *args]) == 2
    assert message in capsys.readouterr().err
    assert not table.exists()
    assert main(["windows", str(tmp_path / "clips"), str(tmp_path / "w.txt"),
                 "--num-frames", "5"]) == 2
    assert ".csv or .jsonl" in capsys.readouterr().err


def test_windows_of_clips_in_object_storage(s3_server: S3Server,  # noqa: F811
                                            tiny_weights: Path,  # noqa: F811
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_server.make_bucket("window-clips")
    fs = fsspec.filesystem("s3")
    fs.pipe_file("window-clips/raw/a.mp4",
                 media.make_video(None, frames=12, width=16, height=16, fps=10))
    fs.pipe_file("window-clips/raw/a.txt", b"caption a")
    table = f"{bucket}/windows.csv"
    assert main(["windows", f"{bucket}/raw/", table, "--num-frames", "5"]) == 0
    capsys.readouterr()
    # Below the table's folder: written relative to it, as a table a person writes.
    assert fs.cat_file("window-clips/windows.csv").decode().splitlines() == [
        "path,start_frame,num_frames", "raw/a.mp4,0,5", "raw/a.mp4,5,5"]
    out = s3_server.make_bucket("window-latents")
    result = asyncio.run(encode_dataset(
        table, out, encoder=EncoderSpec(weights=str(tiny_weights), torch_threads=1),
        format="parquet",
        columns=Columns(options=Columns.parse_options(["start_frame", "num_frames"]))))
    assert (result.total, result.encoded, result.failed) == (2, 2, 0)
    ds = LatentDataset(out)
    names = sorted(ds[i][1]["source"] for i in range(len(ds)))
    assert names == ["raw/a.mp4#start_frame=0,num_frames=5",
                     "raw/a.mp4#start_frame=5,num_frames=5"]
    assert all(ds[i][1]["sidecars"][".txt"] == b"caption a" for i in range(len(ds)))
