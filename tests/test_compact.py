"""``ivvae compact-dataset``: after re-encodes and a shrunk source list, a reader that globs
the shards itself (webdataset's tar reading, pyarrow over the folder) sees exactly the
manifest's samples; a compaction killed at any point leaves a whole output; it refuses
what it cannot do safely."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ivvae import compact as compaction
from ivvae.compact import compact
from ivvae.data import LatentDataset
from ivvae.dataset import (
    LATENT_SUFFIX,
    MANIFEST_NAME,
    RECORD_SUFFIX,
    DatasetError,
    EncoderSpec,
    encode_dataset,
)
from ivvae.dataset.job import PARTS_DIR
from ivvae.dataset.state import output_locks
from ivvae.storage import Location
from tests import media
from tests.service_fixtures import tiny_weights  # noqa: F401


def _encoder(weights: Path) -> EncoderSpec:
    return EncoderSpec(weights=str(weights), torch_threads=1)


def make_clips(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        media.make_video(folder / f"clip{i}.mp4", frames=5, width=16, height=16, fps=10 + i)
        (folder / f"clip{i}.txt").write_text(f"caption {i}")
    return folder


def tar_samples(out: Path) -> dict[str, list[dict[str, Any]]]:
    """What a plain webdataset reader sees: every sample of every shard, with its record."""
    seen: dict[str, list[dict[str, Any]]] = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(RECORD_SUFFIX):
                    reader = tar.extractfile(m)
                    assert reader is not None
                    record = json.loads(reader.read())
                    seen.setdefault(m.name.split(".", 1)[0], []).append(
                        {**record, "_shard": f"shards/{shard.name}"})
    return seen


def parquet_rows(out: Path) -> Counter[str]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(out / "shards"), format="parquet").to_table(columns=["source"])
    return Counter(table.column("source").to_pylist())


def read_all(out: Path) -> dict[str, tuple[bytes, dict[str, Any]]]:
    return {meta["source"]: (latent.numpy().tobytes(), meta.get("sidecars", {}))
            for latent, meta in LatentDataset(str(out))}


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


async def _stale_output(tmp_path: Path, weights: Path, fmt: str) -> tuple[Path, Path]:
    """An output with superseded samples: 4 clips in shards of 2, then one re-captioned,
    one re-cut, and one dropped from the list."""
    src = make_clips(tmp_path / "src", 4)
    out = tmp_path / "out"
    # One clip at a time: shards {clip0, clip1} and {clip2, clip3}.
    await encode_dataset(src, out, encoder=_encoder(weights), format=fmt, shard_clips=2,
                         concurrency=1)
    (src / "clip0.txt").write_text("a new caption")
    media.make_video(src / "clip1.mp4", frames=9, width=16, height=16, fps=7)
    (src / "clip3.mp4").unlink()
    (src / "clip3.txt").unlink()
    summary = await encode_dataset(src, out, encoder=_encoder(weights), format=fmt,
                                   shard_clips=2, concurrency=1)
    assert (summary.encoded, summary.skipped) == (2, 1)
    return src, out


async def test_webdataset_shards_hold_only_the_manifest_after_compaction(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    src, out = await _stale_output(tmp_path, tiny_weights, "webdataset")
    before = read_all(out)
    assert set(before) == {"clip0.mp4", "clip1.mp4", "clip2.mp4"}
    # What a plain reader saw: two samples of the changed clips, and the dropped clip.
    assert {k: len(v) for k, v in tar_samples(out).items()} == {
        "clip0_mp4": 2, "clip1_mp4": 2, "clip2_mp4": 1, "clip3_mp4": 1}

    # A shard whose record file a killed run never published: an orphan the run removes.
    orphan = out / "shards" / "w00000of00001-0000000000aaaaaa-00000.tar"
    current = {line["source"]: line for line in manifest(out)}["clip0.mp4"]["part"]
    orphan.write_bytes((out / current).read_bytes())  # a copy of clip0's current shard
    planned = compact(str(out), dry_run=True)
    assert (planned.shards_rewritten, planned.shards_removed, planned.samples_dropped,
            planned.leftovers_removed) == (1, 1, 3, 1)
    assert orphan.exists()  # a dry run changes nothing
    assert {k: len(v) for k, v in tar_samples(out).items()}["clip0_mp4"] == 3  # untouched

    done = compact(str(out))
    assert (done.shards_rewritten, done.shards_removed, done.samples_dropped,
            done.leftovers_removed) == (1, 1, 3, 1)
    assert not orphan.exists()
    seen = tar_samples(out)
    assert {k: len(v) for k, v in seen.items()} == {"clip0_mp4": 1, "clip1_mp4": 1,
                                                    "clip2_mp4": 1}
    # Byte for byte what the manifest reader read before, captions included; each sample's
    # own record names the shard it is in now.
    assert read_all(out) == before
    assert before["clip0.mp4"][1][".txt"] == b"a new caption"
    lines = {line["source"]: line for line in manifest(out)}
    for key, (record,) in seen.items():
        assert record["part"] == record["_shard"] == lines[key.replace("_", ".")]["part"]
    # Nothing is left to do, and a rerun of the job re-encodes nothing.
    again = compact(str(out))
    assert (again.shards_rewritten, again.shards_removed, again.samples_dropped) == (0, 0, 0)
    rerun = await encode_dataset(src, out, encoder=_encoder(tiny_weights),
                                 format="webdataset", shard_clips=2)
    assert (rerun.encoded, rerun.skipped) == (0, 3)
    assert read_all(out) == before


async def test_parquet_shards_hold_only_the_manifest_after_compaction(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    src, out = await _stale_output(tmp_path, tiny_weights, "parquet")
    before = read_all(out)
    assert parquet_rows(out) == {"clip0.mp4": 2, "clip1.mp4": 2, "clip2.mp4": 1,
                                 "clip3.mp4": 1}
    compact(str(out))
    assert parquet_rows(out) == {"clip0.mp4": 1, "clip1.mp4": 1, "clip2.mp4": 1}
    assert read_all(out) == before
    rerun = await encode_dataset(src, out, encoder=_encoder(tiny_weights), format="parquet",
                                 shard_clips=2)
    assert (rerun.encoded, rerun.skipped) == (0, 3)


async def test_files_of_clips_no_longer_named_are_removed(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    src = make_clips(tmp_path / "src", 3)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "mine.latent.safetensors").write_bytes(b"not the job's")
    await encode_dataset(src, out, encoder=_encoder(tiny_weights))
    (src / "clip2.mp4").unlink()
    await encode_dataset(src, out, encoder=_encoder(tiny_weights))
    before = read_all(out)
    assert (out / "clip2.mp4.latent.safetensors").exists()
    done = compact(str(out))
    assert done.files_removed == 1
    assert not (out / "clip2.mp4.latent.safetensors").exists()
    assert (out / "notes" / "mine.latent.safetensors").exists()  # not the job's: kept
    assert read_all(out) == before


@pytest.mark.parametrize("then", ["compact", "encode"])
@pytest.mark.parametrize("stop_at", ["shard", "records", "records, hard", "old records",
                                     "old shard"])
async def test_a_compaction_killed_anywhere_leaves_a_whole_output(
        stop_at: str, then: str, tmp_path: Path, tiny_weights: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = await _stale_output(tmp_path, tiny_weights, "webdataset")
    before = read_all(out)
    loc_rm = type(Location.of(str(out)).fs).rm
    real_publish_file, real_publish_bytes = compaction.publish_file, compaction.publish_bytes

    class Killed(Exception):
        pass

    def publish_file(*args: Any) -> None:
        real_publish_file(*args)
        if stop_at == "shard":
            raise Killed

    def publish_bytes(*args: Any, **kw: Any) -> None:
        real_publish_bytes(*args, **kw)
        if stop_at.startswith("records") and str(args[1]).endswith(".jsonl"):
            raise Killed

    def publish_manifest(*args: Any, **kw: Any) -> None:
        raise Killed  # SIGKILL: no clean-up publishes the manifest

    def rm(self: Any, path: Any, *args: Any, **kw: Any) -> None:
        paths = [str(p) for p in (path if isinstance(path, list) else [path])]
        loc_rm(self, path, *args, **kw)
        if (stop_at == "old records" and any(p.endswith(".jsonl") for p in paths)) or (
                stop_at == "old shard" and any(p.endswith(".tar") for p in paths)):
            raise Killed

    monkeypatch.setattr(compaction, "publish_file", publish_file)
    monkeypatch.setattr(compaction, "publish_bytes", publish_bytes)
    if stop_at.endswith("hard"):
        monkeypatch.setattr(compaction, "publish_manifest", publish_manifest)
    monkeypatch.setattr(type(Location.of(str(out)).fs), "rm", rm)
    with pytest.raises(Killed):
        compact(str(out))
    monkeypatch.undo()
    # Killed: readers through the manifest read what they read before. Then either a
    # second compaction finishes the work (its first one's record files are no sign of a
    # stale manifest), or a new run re-encodes nothing (and, after a compaction killed
    # before its manifest, names the new parts before it removes what they replace).
    assert read_all(out) == before
    for written in (out / PARTS_DIR).glob("compact-*.jsonl"):  # the rerun, a minute later
        os.utime(written, (written.stat().st_mtime + 60,) * 2)
    if then == "compact":
        compact(str(out))
        assert read_all(out) == before
    rerun = await encode_dataset(src, out, encoder=_encoder(tiny_weights),
                                 format="webdataset", shard_clips=2)
    assert (rerun.encoded, rerun.skipped) == (0, 3)
    assert read_all(out) == before
    # A compaction finishes the work: one sample of each clip, no leftovers.
    compact(str(out))
    assert {k: len(v) for k, v in tar_samples(out).items()} == {
        "clip0_mp4": 1, "clip1_mp4": 1, "clip2_mp4": 1}
    parts = {p.stem for p in (out / PARTS_DIR).glob("*.jsonl")}
    shards = {p.stem for p in (out / "shards").glob("*.tar")}
    assert shards <= parts
    assert read_all(out) == before


async def test_refused_while_a_worker_runs_over_a_stale_manifest_or_not_an_output(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    src, out = await _stale_output(tmp_path, tiny_weights, "webdataset")
    with output_locks(Location.of(str(out)), "w00000of00001"), \
            pytest.raises(DatasetError, match="encode-dataset run or another compaction"):
        compact(str(out))
    with output_locks(Location.of(str(out)), None), \
            pytest.raises(DatasetError, match=r"compaction .* is running"):
        await encode_dataset(src, out, encoder=_encoder(tiny_weights), format="webdataset")
    # A part published after the manifest (a worker killed before writing it).
    part = next((out / PARTS_DIR).glob("*.jsonl"))
    written = part.stat().st_mtime
    os.utime(part, (written + 60, written + 60))
    with pytest.raises(DatasetError, match="older than the newest published part"):
        compact(str(out))
    with pytest.raises(DatasetError, match="not an encode-dataset output"):
        compact(str(src))
    # Through the command: exit 2 and the reason; a dry run's JSON otherwise.
    proc = subprocess.run([sys.executable, "-m", "ivvae.cli", "compact-dataset", str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not an encode-dataset output" in proc.stderr
    os.utime(part, (written, written))
    proc = subprocess.run([sys.executable, "-m", "ivvae.cli", "compact-dataset", str(out),
                           "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples_dropped"] == 3


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
async def test_a_cut_shard_stops_the_compaction_named_and_the_output_whole(
        fmt: str, tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    _, out = await _stale_output(tmp_path, tiny_weights, fmt)
    before = read_all(out)
    # The shard of clip2 and clip3: the one rewritten (clip2 kept).
    shard = out / {line["source"]: line for line in manifest(out)}["clip2.mp4"]["part"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{shard.name} is damaged"):
        compact(str(out))
    # Stopped, not killed: no marker keeps workers away (they must re-encode its clips).
    assert not (out / ".ivvae" / "compacting").exists()
    # Stopped there: what readers read of the other clips is as before.
    others = {k: v for k, v in before.items() if k != "clip2.mp4"}
    assert {k: v for k, v in read_all_but(out, "clip2.mp4").items()} == others


def read_all_but(out: Path, skip: str) -> dict[str, tuple[bytes, dict[str, Any]]]:
    ds = LatentDataset(str(out))
    keep = [i for i, r in enumerate(ds.records) if r["source"] != skip]
    return {ds[i][1]["source"]: (ds[i][0].numpy().tobytes(), ds[i][1].get("sidecars", {}))
            for i in keep}


async def test_a_damaged_latent_stops_the_compaction_and_is_named(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    _, out = await _stale_output(tmp_path, tiny_weights, "webdataset")

    def holds(path: Path) -> bool:
        with tarfile.open(path) as tar:
            return "clip2_mp4" + LATENT_SUFFIX in tar.getnames()

    shard = next(p for p in (out / "shards").glob("*.tar") if holds(p))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            if m.name == "clip2_mp4" + LATENT_SUFFIX:
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(m, io.BytesIO(data))
    planned = pytest.raises(DatasetError, match=f"{shard.name} is damaged: the latent of "
                            "'clip2.mp4' is not the one its record names")
    with planned:  # a dry run reads what it would copy: it says so too
        compact(str(out), dry_run=True)
    with pytest.raises(DatasetError, match=r"remove its record file .*\.jsonl and run "
                       "encode-dataset"):
        compact(str(out))


async def test_a_part_holding_a_failed_clip_keeps_its_rows_right(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # The failure's record stays with the kept clips; rows are numbered among the latents.
    src = make_clips(tmp_path / "src", 2)
    (src / "a_broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    first = await encode_dataset(src, out, encoder=_encoder(tiny_weights), format="parquet",
                                 concurrency=1)
    assert (first.encoded, first.failed) == (2, 1)
    (src / "clip1.txt").write_text("a new caption")
    await encode_dataset(src, out, encoder=_encoder(tiny_weights), format="parquet",
                         concurrency=1)
    # As if that run was stopped before it retried the broken clip: its failure of the
    # first run is still its current line, in the part that is rewritten, listed before a
    # latent that is kept.
    newest = max((out / PARTS_DIR).glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    lines = newest.read_text().splitlines()
    newest.write_text("".join(line + "\n" for line in lines
                              if json.loads(line)["source"] != "a_broken.mp4"))
    os.utime(out / MANIFEST_NAME)
    before = read_all(out)
    compact(str(out))
    assert parquet_rows(out) == {"clip0.mp4": 1, "clip1.mp4": 1}
    assert read_all(out) == before
    assert {line["source"]: line["status"] for line in manifest(out)} == {
        "a_broken.mp4": "error", "clip0.mp4": "ok", "clip1.mp4": "ok"}
