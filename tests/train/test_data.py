"""ivvae.train.data: still images as training clips (a virtual camera over the picture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ivvae.train.data import STILL_CLIP_FRAMES, ClipDataset, camera_clip, expand_sources
from tests import media


def _picture(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)


def test_camera_clip_pans_across_the_picture() -> None:
    image = _picture(96, 128)
    clip = camera_clip(image, 9, seed=3)
    assert clip.shape == (9, 72, 96, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, camera_clip(image, 9, seed=3))  # deterministic
    assert not np.array_equal(clip, camera_clip(image, 9, seed=4))
    # consecutive frames differ (the camera moves) but only a little (it moves smoothly)
    steps = np.abs(np.diff(clip.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0.05).all() and (steps < 20).all()
    # every frame is an exact crop of the picture (no resampling: as sharp as the still)
    for frame in clip:
        hits = [(y, x) for y in range(97 - 72) for x in range(129 - 96)
                if np.array_equal(image[y : y + 72, x : x + 96], frame)]
        assert len(hits) == 1


def test_camera_clip_of_a_flat_picture_is_flat() -> None:
    image = np.full((40, 56, 3), (200, 30, 90), np.uint8)
    clip = camera_clip(image, 5, seed=0)
    assert clip.shape == (5, 30, 42, 3)
    assert (np.abs(clip.astype(int) - [200, 30, 90]) <= 1).all()


def test_camera_clip_of_a_picture_under_8_px_keeps_what_there_is() -> None:
    image = _picture(6, 10)
    clip = camera_clip(image, 3, seed=0)
    assert clip.shape == (3, 6, 8, 3)  # 8 px wide where it can be; all 6 rows where not
    for frame in clip:
        assert any(np.array_equal(image[:, x : x + 8], frame) for x in range(3))


def test_folders_give_videos_and_images_and_images_become_clips(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    media.make_video(tmp_path / "sub" / "clip.mp4", frames=6, width=64, height=48)
    (tmp_path / "photo.jpg").write_bytes(
        media.add_jpeg_icc_profile(media.make_image("jpeg", 80, 64)))
    (tmp_path / "drawing.png").write_bytes(media.make_image("png", 64, 64))
    media.make_video(tmp_path / "one_frame.webm", frames=1, width=40, height=32,
                     codec="libvpx-vp9", container="webm")  # a still, whatever its format
    (tmp_path / "notes.txt.bak").write_text("not media")
    paths = expand_sources([tmp_path])
    assert [p.name for p in paths] == ["drawing.png", "one_frame.webm", "photo.jpg",
                                       "clip.mp4"]
    ds = ClipDataset.from_paths(paths, max_side=256, extra_scales=(32,))
    assert [n.split("/")[-1] for n in ds.names] == [
        "drawing.png", "drawing.png@32", "one_frame.webm", "photo.jpg", "photo.jpg@32",
        "clip.mp4", "clip.mp4@32"]
    assert ds.names[0] == str(tmp_path / "drawing.png")  # messages name the file
    shapes = [c.shape for c in ds.clips]
    assert shapes[0] == (STILL_CLIP_FRAMES, 48, 48, 3)
    assert shapes[2] == (STILL_CLIP_FRAMES, 24, 30, 3)
    assert shapes[3] == (STILL_CLIP_FRAMES, 48, 60, 3)
    assert shapes[5] == (6, 48, 64, 3)
    batch = ds.batch(seed=0, rank=0, step=0, batch_size=4, frames=5, crop=24)
    assert batch.shape == (4, 3, 5, 24, 24) and batch.min() >= -1 and batch.max() <= 1


def test_a_missing_source_is_an_error_and_other_files_are_counted(tmp_path: Path) -> None:
    import pytest

    media.make_video(tmp_path / "a.mp4", frames=3, width=16, height=16)
    for name in ("b.m2ts", "b.y4m", "c.mxf", "d.mxf", "notes.md", "README"):
        (tmp_path / name).write_bytes(b"x")
    skipped: list[str] = []
    paths = expand_sources([tmp_path], skipped)
    # camera MPEG-TS and raw Y4M are video ivvae.video opens; MXF is not
    assert [p.name for p in paths] == ["a.mp4", "b.m2ts", "b.y4m"]
    assert skipped == [f"4 file(s) in {tmp_path} without a media suffix ((none), .mxf, "
                       ".md); a .txt list of paths names files of any suffix"]
    with pytest.raises(ValueError, match=r"--data .*my_footgae: there is no such file"):
        expand_sources([tmp_path / "a.mp4", tmp_path / "my_footgae"])
