"""``ivvae encode-dataset`` on local folders through a real gRPC server: exact resume after
Ctrl-C and repeated SIGKILLs, refusal of a different job, re-encoding of a changed source,
``--shard`` workers, failures, and the CLI's exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivvae.client import AsyncClient, LatentResult, RetryPolicy
from ivvae.data import LatentDataset
from ivvae.dataset import (
    LATENT_SUFFIX,
    MANIFEST_NAME,
    ClipOptions,
    Columns,
    DatasetError,
    EncoderSpec,
    collect,
    encode_dataset,
)
from ivvae.dataset.job import PARTS_DIR
from ivvae.dataset.state import output_locks
from ivvae.storage import TMP_MARK, Location
from tests import media
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import serve_child, tiny_settings, tiny_weights  # noqa: F401

CLIPS = 12


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:  # noqa: F811
    # batch_max_size 1: latents of a run equal those of any other run bit for bit
    with server_thread(tiny_settings(tiny_weights, batch_max_size=1)) as srv:
        yield srv


def make_clips(folder: Path, count: int = CLIPS, first_fps: int = 10) -> Path:
    """Distinct tiny clips in two subfolders, a caption for one, a file that is no video."""
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        media.make_video(sub / f"clip{i:02d}.mp4", frames=5, width=16, height=16,
                         fps=first_fps + i)
    (folder / "b" / "clip00.txt").write_text("a caption")
    (folder / "notes.txt").write_text("not a video")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips"))


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def shard_samples(out: Path) -> Counter[str]:
    """How often each sample key occurs across all published shards."""
    keys: Counter[str] = Counter()
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            keys.update(m.name.split(".", 1)[0] for m in tar.getmembers()
                        if m.name.endswith(LATENT_SUFFIX))
    return keys


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if TMP_MARK in p.name]


def latents(out: Path) -> dict[str, bytes]:
    ds = LatentDataset(str(out))
    return {meta["source"]: latent.numpy().tobytes() for latent, meta in
            (ds[i] for i in range(len(ds)))}


def count_encodes(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                  delay_s: float = 0.0) -> list[int]:
    """Count (and optionally slow down) the server's encodes."""
    pipeline = server.service.pipeline
    real = pipeline.encode
    count = [0]

    async def counted(*args: Any, **kw: Any) -> Any:
        count[0] += 1
        await asyncio.sleep(delay_s)
        return await real(*args, **kw)

    monkeypatch.setattr(pipeline, "encode", counted)
    return count


async def test_files_then_nothing_to_redo(server: ServerThread, clips: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    count = count_encodes(server, monkeypatch)
    summary = await encode_dataset(clips, out, server=server.grpc_url, concurrency=4)
    assert (summary.total, summary.encoded, summary.skipped, summary.failed) == (12, 12, 0, 0)
    assert count[0] == 12
    lines = manifest(out)
    assert [r["source"] for r in lines] == sorted(
        p.relative_to(clips).as_posix() for p in clips.rglob("*.mp4"))
    for r in lines:
        latent = LatentResult.load(out / r["part"])
        assert r["part"] == r["source"] + LATENT_SUFFIX and r["status"] == "ok"
        assert list(latent.latent_shape) == r["shape"] == [1, 4, 2, 2, 2]
        assert r["identity"] == "sha256:" + latent.info.content_sha256
    before = {p: p.stat().st_mtime_ns for p in out.rglob(f"*{LATENT_SUFFIX}")}

    again = await encode_dataset(clips, out, server=server.grpc_url, concurrency=4)
    assert (again.encoded, again.skipped) == (0, 12)
    assert count[0] == 12
    assert {p: p.stat().st_mtime_ns for p in out.rglob(f"*{LATENT_SUFFIX}")} == before
    assert manifest(out) == lines  # one line per clip, however many runs


def _start_cli(server: ServerThread, src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(src), str(out),
         "--server", server.grpc_url, "--concurrency", "2", "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _wait_for_parts(proc: subprocess.Popen[str], out: Path, parts: int) -> None:
    deadline = time.monotonic() + 60
    while len(list((out / PARTS_DIR).glob("*.jsonl"))) < parts:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "encode-dataset made no progress"
        await asyncio.sleep(0.02)


async def test_ctrl_c_and_repeated_sigkill_then_exactly_once(
        server: ServerThread, clips: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    count_encodes(server, monkeypatch, delay_s=0.2)
    args = ("--format", "webdataset", "--shard-clips", "2")

    # Ctrl-C: a clean stop with a summary; finished clips are published, staged ones too.
    proc = _start_cli(server, clips, out, *args)
    await _wait_for_parts(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 130
    assert json.loads(stdout)["interrupted"] is True
    assert not temporaries(out)
    done = [r for r in manifest(out) if r["status"] == "ok"]
    assert 2 <= len(done) < CLIPS and len(manifest(out)) == CLIPS

    # SIGKILL at random moments, three times: no cleanup of any kind.
    rng = random.Random(15)
    for _ in range(3):
        part_files = list((out / PARTS_DIR).glob("*.jsonl"))
        if sum(len(part.read_text().splitlines()) for part in part_files) == CLIPS:
            break  # a slow test loop let the runs finish everything: nothing left to kill
        parts = len(part_files)
        proc = _start_cli(server, clips, out, *args)
        await _wait_for_parts(proc, out, parts + 1)
        await asyncio.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)

    proc = _start_cli(server, clips, out, *args)
    stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 0, stderr
    lines = manifest(out)
    assert len(lines) == CLIPS and all(r["status"] == "ok" for r in lines)
    keys = shard_samples(out)
    assert set(keys) == {r["member"] for r in lines}
    assert set(keys.values()) == {1}  # every clip in exactly one shard
    assert not temporaries(out)


async def test_orphan_shard_of_a_kill_between_publishes_is_removed(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    await encode_dataset(clips, out, server=server.grpc_url, format="webdataset",
                         shard_clips=4)
    records = sorted((out / PARTS_DIR).glob("*.jsonl"))
    assert len(records) == 3
    lost = [json.loads(line)["member"] for line in records[0].read_text().splitlines()]
    records[0].unlink()  # as if killed after the shard was published, before its records
    stray = out / "shards" / f"x.tar{TMP_MARK}w00000of00001-dead"
    stray.write_bytes(b"half a shard")

    summary = await encode_dataset(clips, out, server=server.grpc_url, format="webdataset",
                                   shard_clips=4)
    assert (summary.encoded, summary.skipped) == (4, 8)
    keys = shard_samples(out)
    assert len(keys) == CLIPS and set(keys.values()) == {1}
    assert set(lost) <= set(keys) and not stray.exists()


async def test_other_options_refused_or_new_version(server: ServerThread, clips: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    await encode_dataset(clips, out, server=server.grpc_url, format="parquet")
    first = latents(out)
    with pytest.raises(DatasetError, match=r"options\.dtype: 'float32' -> 'bfloat16'"):
        await encode_dataset(clips, out, server=server.grpc_url, format="parquet",
                             options=ClipOptions(dtype="bfloat16"))
    with pytest.raises(DatasetError, match=r"format: 'parquet' -> 'webdataset'"):
        await encode_dataset(clips, out, server=server.grpc_url, format="webdataset")
    assert latents(out) == first  # untouched

    summary = await encode_dataset(clips, out, server=server.grpc_url, format="parquet",
                                   options=ClipOptions(dtype="bfloat16"), new_version=True)
    assert summary.encoded == CLIPS
    (version,) = (out / "versions").iterdir()
    ds = LatentDataset(str(version))
    assert {str(ds[i][0].dtype) for i in range(len(ds))} == {"torch.bfloat16"}
    assert latents(out) == first

    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(clips), str(out),
         "--server", server.grpc_url, "--format", "parquet", "--dtype", "float16"],
        capture_output=True, text=True)
    assert done.returncode == 2 and "holds another job" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(clips), str(out),
         "--server", server.grpc_url, "--resize", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "resize" in done.stderr


async def test_replaced_source_is_reencoded(server: ServerThread, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_clips(tmp_path / "src", count=4)
    out = tmp_path / "out"
    count = count_encodes(server, monkeypatch)
    await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    before = latents(out)
    media.make_video(src / "a" / "clip01.mp4", frames=9, width=24, height=16, fps=7)
    (src / "b" / "clip00.txt").write_text("a new caption")  # a sidecar counts too
    summary = await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    assert (summary.encoded, summary.skipped) == (2, 2)
    assert count[0] == 6
    after = latents(out)
    assert after["a/clip01.mp4"] != before["a/clip01.mp4"]
    assert {k: v for k, v in after.items() if k not in ("a/clip01.mp4", "b/clip00.mp4")} == {
        k: v for k, v in before.items() if k not in ("a/clip01.mp4", "b/clip00.mp4")}
    ds = LatentDataset(str(out))
    meta = next(ds[i][1] for i in range(len(ds)) if ds[i][1]["source"] == "b/clip00.mp4")
    assert meta["sidecars"] == {".txt": b"a new caption"}
    assert tuple(next(ds[i][0] for i in range(len(ds))
                      if ds[i][1]["source"] == "a/clip01.mp4").shape) == (1, 4, 3, 2, 3)
    assert len(manifest(out)) == 4


async def test_two_shards_concurrently_equal_one_unsharded_run(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    await encode_dataset(clips, tmp_path / "plain", server=server.grpc_url, format="parquet",
                         shard_clips=3)
    # Two processes at once, as two pods of an Indexed Job would be.
    procs = [_start_cli(server, clips, tmp_path / "sharded", "--format", "parquet",
                        "--shard", f"{i}/2", "--shard-clips", "3") for i in (0, 1)]
    outs = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s0, s1 = (json.loads(stdout) for stdout, _ in outs)
    assert s0["total"] + s1["total"] == CLIPS and s0["total"] and s1["total"]
    assert s0["encoded"] + s1["encoded"] == CLIPS
    named = str(tmp_path / "sharded" / MANIFEST_NAME)
    assert s0["manifest"].endswith(named) and s1["manifest"].endswith(named)
    assert latents(tmp_path / "sharded") == latents(tmp_path / "plain")
    lines = manifest(tmp_path / "sharded")
    assert len(lines) == CLIPS and all(r["status"] == "ok" for r in lines)


async def test_list_file_and_failed_items(server: ServerThread, clips: Path,
                                          tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(3000))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two clips and a bad file\n\n{clips / 'a' / 'clip01.mp4'}\n"
                       "bad.mp4\nmissing.mp4\n")
    items = collect(listing)
    assert [i.name for i in items] == [str(clips / "a" / "clip01.mp4"), "bad.mp4",
                                       "missing.mp4"]
    assert items[1].output == "bad.mp4" + LATENT_SUFFIX
    assert items[0].output.endswith("a/clip01.mp4" + LATENT_SUFFIX)  # mirrored whole

    out = tmp_path / "out"
    summary = await encode_dataset(listing, out, server=server.grpc_url, concurrency=2)
    assert (summary.encoded, summary.failed) == (1, 2)
    records = {r["source"]: r for r in manifest(out)}
    assert records["bad.mp4"]["error"] == "unsupported_media"
    assert records["missing.mp4"]["error"] == "io_error"
    again = await encode_dataset(listing, out, server=server.grpc_url, concurrency=2)
    assert (again.skipped, again.encoded, again.failed) == (1, 0, 2)  # failures retried
    assert len(manifest(out)) == 3  # still one line per clip

    # One file under two spellings was merged into one clip named after the last one.
    for second in ("bad.mp4", "./bad.mp4", str(tmp_path / "bad.mp4"), "sub/../bad.mp4"):
        listing.write_text(f"bad.mp4\n# a comment\n\n{second}\n")
        with pytest.raises(DatasetError, match=r"listed twice \(.*, lines 1 and 4\)"):
            collect(listing)


async def test_lock_unavailable_service_and_cli_exit_codes(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with output_locks(Location.of(str(out)), "w00000of00001"), \
            pytest.raises(DatasetError, match="another encode-dataset"):
        await encode_dataset(clips, out, server=server.grpc_url)
    with pytest.raises(DatasetError, match="unavailable"):
        await encode_dataset(clips, tmp_path / "out2", server="grpc://127.0.0.1:9",
                             retry=RetryPolicy(attempts=2, initial_backoff_s=0.01))
    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(tmp_path / "nope"),
         str(out), "--server", server.grpc_url], capture_output=True, text=True)
    assert done.returncode == 2 and "neither a folder nor a list" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    # An empty source is a mistyped prefix or a folder of what is not listed, not a job.
    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(empty), str(tmp_path / "o3"),
         "--server", server.grpc_url, "--shard", "1/2"], capture_output=True, text=True)
    assert done.returncode == 2 and "holds no video or image files" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(empty), str(out),
         "--shard", "2/2"], capture_output=True, text=True)
    assert done.returncode == 2 and "--shard" in done.stderr


async def test_unknown_protocol_and_unreadable_output_are_clear_errors(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nosuch://x"):
        await encode_dataset("nosuch://x", tmp_path / "o", server=server.grpc_url)
    blocked = tmp_path / "file"
    blocked.write_text("a file where OUT's folder should be")
    with pytest.raises(DatasetError, match="cannot open"):
        await encode_dataset(clips, blocked / "out", server=server.grpc_url)


def test_a_list_file_names_clips_as_written_spaces_included(clips: Path,
                                                              tmp_path: Path) -> None:
    import shutil

    for name in (" lead.mp4", "trail.mp4 "):
        shutil.copy(clips / "a" / "clip01.mp4", tmp_path / name)
    listing = tmp_path / "list.txt"
    listing.write_text("# clips\n lead.mp4\n\n   \ntrail.mp4 \r\n")
    sources = collect(listing)
    assert [s.name for s in sources] == [" lead.mp4", "trail.mp4 "]
    assert all(s.identity for s in sources)


def test_a_single_clip_or_a_binary_file_is_no_list(clips: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="one clip, not a dataset"):
        collect(clips / "a" / "clip01.mp4")
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not a list file"):
        collect(binary)
    assert [s.name for s in collect(f"{clips}/*/clip0[12].mp4")] == ["a/clip01.mp4",
                                                                     "b/clip02.mp4"]


async def test_preprocessing_in_process_is_applied_and_keyed(
        server: ServerThread, clips: Path, tiny_weights: Path,  # noqa: F811
        tmp_path: Path) -> None:
    from ivvae.dataset import EncoderSpec

    spec = EncoderSpec(weights=str(tiny_weights), torch_threads=1)
    out = tmp_path / "out"
    summary = await encode_dataset(f"{clips}/a/clip0[13].mp4", out, encoder=spec,
                                   options=ClipOptions(preprocess="resize=24"))
    assert summary.encoded == 2
    assert {tuple(r["shape"]) for r in manifest(out)} == {(1, 4, 2, 3, 3)}  # 16 px -> 24
    with pytest.raises(DatasetError, match="preprocess: 'resize=24' -> ''"):
        await encode_dataset(f"{clips}/a/clip0[13].mp4", out, encoder=spec)
    await encode_dataset(f"{clips}/a/clip0[13].mp4", tmp_path / "served",
                         server=server.grpc_url, options=ClipOptions(preprocess="resize=24"))
    assert latents(tmp_path / "served") == latents(out)  # the service applies them alike


async def test_an_unknown_model_is_refused_before_anything_is_written(
        server: ServerThread, clips: Path, tiny_weights: Path,  # noqa: F811
        tmp_path: Path) -> None:
    from ivvae.dataset import EncoderSpec

    with pytest.raises(DatasetError, match="unknown model 'nope'"):
        await encode_dataset(clips, tmp_path / "a", options=ClipOptions(model="nope"),
                             encoder=EncoderSpec(weights=str(tiny_weights), torch_threads=1))
    with pytest.raises(DatasetError, match="serves no model 'nope'"):
        await encode_dataset(clips, tmp_path / "b", server=server.grpc_url,
                             options=ClipOptions(model="nope"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


async def test_a_files_reader_open_across_a_finished_rerun_says_to_open_it_again(
        server: ServerThread, tmp_path: Path) -> None:
    # It said the later run "did not finish" and to run the job again, which skipped
    # everything: only a new reader helps.
    from ivvae.data import LatentDataset

    src = make_clips(tmp_path / "src", count=2)
    out = tmp_path / "out"
    await encode_dataset(src, out, server=server.grpc_url)
    held = LatentDataset(out)  # a path, as the encoder takes one
    media.make_video(src / "b" / "clip00.mp4", frames=9, width=24, height=16, fps=7)
    summary = await encode_dataset(src, out, server=server.grpc_url)
    assert (summary.encoded, summary.skipped) == (1, 1)
    changed = next(i for i, r in enumerate(held.records) if r["source"] == "b/clip00.mp4")
    with pytest.raises(ValueError, match="the manifest now names the new latent: open the "
                                         "dataset again"):
        held[changed]
    fresh = LatentDataset(str(out))
    assert [fresh[i][1]["source"] for i in range(len(fresh))] == [
        r["source"] for r in fresh.records]


async def test_a_latent_file_rewritten_since_its_record_is_not_reused(
        server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A latent file is rewritten in place when its clip changes. After a change and a change
    # back, the first record matched the clip's key again and was skipped as done, while
    # the file held the second version's latent.
    src = make_clips(tmp_path / "src", count=2)
    out = tmp_path / "out"
    clip = src / "b" / "clip00.mp4"
    first = clip.read_bytes()
    count = count_encodes(server, monkeypatch)
    await encode_dataset(src, out, server=server.grpc_url)
    v1 = latents(out)["b/clip00.mp4"]
    media.make_video(clip, frames=9, width=24, height=16, fps=7)
    await encode_dataset(src, out, server=server.grpc_url)
    clip.write_bytes(first)
    summary = await encode_dataset(src, out, server=server.grpc_url)
    assert (summary.encoded, summary.skipped, count[0]) == (1, 1, 4)
    assert latents(out)["b/clip00.mp4"] == v1

    # A run killed after rewriting the file, before its record: the manifest still names
    # the old latent. The reader refuses the file, and the next run encodes it again.
    written = out / ("b/clip00.mp4" + LATENT_SUFFIX)
    other = out / ("a/clip01.mp4" + LATENT_SUFFIX)
    written.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=r"no longer holds the latent.*did not finish"):
        latents(out)
    summary = await encode_dataset(src, out, server=server.grpc_url)
    assert (summary.encoded, summary.skipped, count[0]) == (1, 1, 5)
    assert latents(out)["b/clip00.mp4"] == v1

    # Records of an older version name no file identity: the file's hash decides.
    for part in (out / PARTS_DIR).glob("*.jsonl"):
        lines = [json.loads(line) for line in part.read_text().splitlines()]
        part.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "file"}) + "\n"
                                for r in lines))
    summary = await encode_dataset(src, out, server=server.grpc_url)
    assert (summary.encoded, summary.skipped, count[0]) == (0, 2, 5)
    written.write_bytes(other.read_bytes())
    summary = await encode_dataset(src, out, server=server.grpc_url)
    assert (summary.encoded, summary.skipped, count[0]) == (1, 1, 6)
    assert latents(out)["b/clip00.mp4"] == v1


async def test_symbolic_links_are_followed(server: ServerThread, clips: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # A folder of links is a common way to assemble a dataset; fsspec lists a link as
    # neither a file nor a folder, so they were all dropped, and the job exited 0.
    farm = tmp_path / "farm"
    farm.mkdir()
    (farm / "one.mp4").symlink_to(clips / "a" / "clip01.mp4")
    (farm / "sub").symlink_to(clips / "b", target_is_directory=True)
    (farm / "loop").symlink_to(farm, target_is_directory=True)  # searched once
    (farm / "gone.mp4").symlink_to(tmp_path / "nothing.mp4")
    (farm / "real").mkdir()
    (farm / "real" / "two.mp4").write_bytes((clips / "a" / "clip03.mp4").read_bytes())
    (farm / "alias").symlink_to(farm / "real", target_is_directory=True)  # one file, once
    found = [s.name for s in collect(farm)]
    assert found == ["one.mp4", "real/two.mp4",
                     *sorted(f"sub/{p.name}" for p in (clips / "b").glob("*.mp4"))]
    # A glob takes what it matches: a linked file, not a linked folder's contents.
    assert [s.name for s in collect(str(farm / "*"))] == ["one.mp4"]
    assert "gone.mp4: a broken symbolic link" in caplog.text
    summary = await encode_dataset(farm, tmp_path / "out", server=server.grpc_url)
    assert summary.encoded == len(found) and summary.failed == 0


async def test_a_second_run_leaves_the_first_ones_files_alone(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    # The clean-up of killed runs once came before the lock: a second run of the same job
    # removed the running one's temporaries and unrecorded shards, and then stopped.
    out = tmp_path / "out"
    await encode_dataset(clips, out, server=server.grpc_url, format="webdataset")
    staged = out / "shards" / f"w00000of00001-run-00001.tar{TMP_MARK}w00000of00001-live"
    staged.write_bytes(b"a shard being written")
    with output_locks(Location.of(str(out)), "w00000of00001"), \
            pytest.raises(DatasetError, match="another encode-dataset"):
        await encode_dataset(clips, out, server=server.grpc_url, format="webdataset")
    assert staged.exists()


async def test_fewer_shards_than_readers_is_warned(server: ServerThread, clips: Path,
                                                   tmp_path: Path) -> None:
    from ivvae.data import IterableLatentDataset

    out = tmp_path / "out"
    await encode_dataset(clips, out, server=server.grpc_url, format="webdataset",
                         shard_clips=4)  # 3 shards
    with pytest.warns(UserWarning, match="3 shards for 4 readers"):
        assert IterableLatentDataset(str(out), rank=3, world_size=4).parts() == []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spread = [IterableLatentDataset(str(out), rank=r, world_size=3).parts()
                  for r in range(3)]
    assert sorted(p for parts in spread for p in parts) == sorted(
        {r["part"] for r in manifest(out)})


def test_an_output_that_fails_mid_run_exits_2_with_the_summary(
        server: ServerThread, clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from ivvae.dataset import command, parts

    records = [0]
    real = parts.publish_bytes

    def filling(loc: Any, path: str, *args: Any, **kw: Any) -> None:
        if records[0] and path.endswith(LATENT_SUFFIX):  # full after a part of 4 clips
            raise OSError(28, "No space left on device")
        real(loc, path, *args, **kw)
        records[0] += f"/{PARTS_DIR}/" in path

    monkeypatch.setattr(parts, "publish_bytes", filling)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(clips), str(out), "--server", server.grpc_url,
                              "--no-progress", "--concurrency", "1", "--shard-clips", "4"])
    assert command.main(args) == 2
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "run it again" in captured.err
    summary = json.loads(captured.out)
    assert summary["total"] == CLIPS and summary["output"]
    monkeypatch.setattr(parts, "publish_bytes", real)
    assert command.main(args) == 0
    # The first part was kept.
    assert json.loads(capsys.readouterr().out)["encoded"] == CLIPS - 4


async def test_a_damaged_shard_is_an_error_naming_it_never_a_latent(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from ivvae.data import DamagedPart

    for fmt in ("webdataset", "parquet"):
        out = tmp_path / fmt
        await encode_dataset(clips, out, server=server.grpc_url, format=fmt, shard_clips=6)
        first = manifest(out)[0]
        shard = out / first["part"]
        data = bytearray(shard.read_bytes())
        if fmt == "webdataset":  # one byte of the first latent's tensor data
            with tarfile.open(shard) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(LATENT_SUFFIX))
            at = member.offset_data + member.size - 3
        else:  # the last byte of the first row group's latent column (its page data)
            chunk = pq.ParquetFile(shard).metadata.row_group(0).column(3)
            assert chunk.path_in_schema == "latent"
            start = (chunk.dictionary_page_offset if chunk.has_dictionary_page
                     else chunk.data_page_offset)
            at = start + chunk.total_compressed_size - 1
        data[at] ^= 0x40
        shard.write_bytes(bytes(data))
        with pytest.raises(DamagedPart, match=f"{first['part']}.*(damaged|sha256)"):
            latents(out)
        shard.unlink()
        with pytest.raises(FileNotFoundError, match=f"{first['part']}: the manifest names"):
            latents(out)
    text = (out / MANIFEST_NAME).read_text()
    (out / MANIFEST_NAME).write_text(text[:-10])  # a torn last line
    with pytest.raises(ValueError, match=r"manifest\.jsonl: line .* is not JSON"):
        LatentDataset(str(out))


async def test_reading_parquet_shards_does_not_abort_the_process_at_exit(
        server: ServerThread, clips: Path, tmp_path: Path) -> None:
    # pyarrow's pools finishing a read's last tasks as the interpreter exits aborted about
    # half of such runs on a busy machine (apache/arrow#34314); eight clean exits of runs
    # two at a time would come by chance well under 1% of the time.
    out = tmp_path / "out"
    await encode_dataset(clips, out, server=server.grpc_url, format="parquet", shard_clips=6)
    script = ("import pyarrow, torch\nfrom ivvae.data import LatentDataset\n"
              f"ds = LatentDataset({str(out)!r})\nassert ds[0][0].dim() == 5\n")
    for _ in range(4):
        runs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
        for run in runs:
            _, err = run.communicate(timeout=120)
            assert run.returncode == 0, err[-2000:]


def test_an_engine_stopped_mid_run_reports_what_it_did(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    # The Ray engine returned its summary only at the end, so Ctrl-C printed zeros. The
    # engine now fills the caller's (the real Ray runs are in tests/test_ray.py).
    import argparse

    from ivvae.dataset import Summary
    from ivvae.dataset.command import add_arguments
    from ivvae.dataset.command import main as dataset_main

    def engine(job: Any, spec: Any, *, summary: Summary, **kw: Any) -> Summary:
        summary.total, summary.encoded, summary.parts = 6, 4, 2
        summary.output = str(tmp_path / "out")
        raise KeyboardInterrupt

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    src = make_clips(tmp_path / "src", count=2)
    args = parser.parse_args([str(src), str(tmp_path / "out"), "--engine", "ray"])
    assert dataset_main(args, engine) == 130
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["encoded"], report["parts"]) == (6, 4, 2)
    assert report["interrupted"] and report["output"] == str(tmp_path / "out")


def test_copies_of_clips_left_by_killed_runs_are_removed(tmp_path: Path) -> None:
    from ivvae.dataset.clips import SPOOL_PREFIX, _remove_orphaned_copies

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f"{SPOOL_PREFIX}{gone}-abc.mp4"
    mine = tmp_path / f"{SPOOL_PREFIX}{os.getpid()}-def.mp4"
    alive = tmp_path / f"{SPOOL_PREFIX}1-ghi.mp4"  # init never exits
    other = tmp_path / "unrelated.mp4"
    for path in (orphan, mine, alive, other):
        path.write_bytes(b"x")
    _remove_orphaned_copies(str(tmp_path))
    assert not orphan.exists() and mine.exists() and alive.exists() and other.exists()


def test_two_jobs_opening_one_new_output_together_cannot_both_own_it(tmp_path: Path) -> None:
    from tests.dataset_race import race

    results = race([str(tmp_path / f"out{i}") for i in range(40)])
    assert all(r == ["owner", "refused"] for r in results), Counter(map(tuple, results))


@pytest.mark.parametrize(("extra", "named"), [
    (["--server", "127.0.0.1:1", "--weights", "w.safetensors"], "--weights applies only to"),
    (["--server", "127.0.0.1:1", "--device", "cuda:3", "--encode-precision", "bfloat16"],
     "--device, --encode-precision apply only to the in-process model"),
    (["--api-key", "k"], "--api-key applies only with --server"),
    (["--workers", "8"], "--workers applies only with --engine ray"),
    (["--address", "local", "--gpus-per-worker", "1"], "apply only with --engine ray"),
])
def test_options_that_would_be_ignored_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], named: str,
) -> None:
    # With --server the server's model encodes: --weights used to be dropped without a
    # word, and the run recorded the server's weights as if that had been asked for.
    import argparse

    from ivvae.dataset.command import add_arguments
    from ivvae.dataset.command import main as dataset_main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    src = make_clips(tmp_path / "src", count=1)
    out = tmp_path / "out"
    assert dataset_main(parser.parse_args([str(src), str(out), *extra])) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_ray_worker_counts_out_of_range_are_refused_by_name() -> None:
    pytest.importorskip("ray")
    from ivvae.dataset import Job
    from ivvae.ray import run_on_ray

    with pytest.raises(DatasetError, match="--workers must be at least 1"):
        run_on_ray(Job("src", "out"), EncoderSpec(), workers=0)
    with pytest.raises(DatasetError, match="got nan"):
        run_on_ray(Job("src", "out"), EncoderSpec(), cpus_per_worker=float("nan"))


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
async def test_moments_stored_with_moments_are_read_back(
        fmt: str, clips: Path, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    # --moments stored mu and logvar in every format, and ivvae.data dropped them.
    import torch

    out = tmp_path / "out"
    summary = await encode_dataset(
        clips, out, encoder=EncoderSpec(weights=str(tiny_weights), torch_threads=1),
        format=fmt, options=ClipOptions(moments=True))
    assert summary.encoded == CLIPS
    for latent, meta in LatentDataset(str(out)):
        mu, logvar = meta["moments"]["mu"], meta["moments"]["logvar"]
        assert mu.shape == logvar.shape == latent.shape and mu.dtype == torch.float32
        # The stored latent is the scaled mean (no --sample): mu is its unscaled moment.
        scale, shift = float(meta["scale_factor"]), float(meta["shift_factor"])
        torch.testing.assert_close(latent, scale * (mu - shift))
        assert not torch.equal(logvar, torch.zeros_like(logvar))
    plain = tmp_path / "plain"
    await encode_dataset(clips, plain, encoder=EncoderSpec(weights=str(tiny_weights),
                                                           torch_threads=1), format=fmt)
    assert all("moments" not in meta for _, meta in LatentDataset(str(plain)))


def _encoder(weights: Path) -> EncoderSpec:
    return EncoderSpec(weights=str(weights), torch_threads=1)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
async def test_a_csv_of_paths_and_captions_gives_each_clip_its_caption(
        fmt: str, tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # As LTX-2's process_dataset.py reads a dataset: media_path and caption columns; the
    # caption travels as the sample's .txt (what webdataset loaders read), the row as .json.
    import csv

    src = make_clips(tmp_path / "src", count=3)
    table = src / "dataset.csv"
    rows = [{"media_path": "b/clip00.mp4", "caption": "a red ball, rolling", "score": "4.5"},
            {"media_path": "a/clip01.mp4", "caption": "two lines\nof \"caption\"", "score": ""}]
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["media_path", "caption", "score"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    summary = await encode_dataset(table, out, encoder=_encoder(tiny_weights), format=fmt)
    assert (summary.total, summary.encoded) == (2, 2)  # the table's rows, not the folder
    got = {meta["source"]: meta["sidecars"] for _, meta in LatentDataset(str(out))}
    for row in rows:
        sidecars = got[row["media_path"]]
        assert sidecars[".txt"].decode() == row["caption"]  # over b/clip00.txt beside it
        assert json.loads(sidecars[".json"]) == row
    # A caption edited in the table makes that clip's sample new; the other is skipped.
    rows[1]["caption"] = "an edited caption"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["media_path", "caption", "score"])
        writer.writeheader()
        writer.writerows(rows)
    again = await encode_dataset(table, out, encoder=_encoder(tiny_weights), format=fmt)
    assert (again.encoded, again.skipped) == (1, 1)
    got = {meta["source"]: meta["sidecars"] for _, meta in LatentDataset(str(out))}
    assert got["a/clip01.mp4"][".txt"] == b"an edited caption"


def test_jsonl_and_json_tables_and_their_columns(tmp_path: Path) -> None:
    src = make_clips(tmp_path / "src", count=2)
    (src / "m.jsonl").write_text(
        '{"video_path": "a/clip01.mp4", "caption": "one"}\n\n'
        '{"video_path": "b/clip00.mp4", "caption": "zero", "fps": 10}\n')
    by_name = {s.name: dict(s.given) for s in collect(src / "m.jsonl")}
    assert by_name["a/clip01.mp4"][".txt"] == b"one"
    assert json.loads(by_name["b/clip00.mp4"][".json"])["fps"] == 10
    # FastVideo's shape: a JSON array, captions as a list (kept in the row, no .txt).
    (src / "v.json").write_text(json.dumps([{"path": "a/clip01.mp4", "cap": ["x", "y"]}]))
    [source] = collect(src / "v.json")
    assert ".txt" not in dict(source.given)
    assert json.loads(dict(source.given)[".json"])["cap"] == ["x", "y"]
    # Columns by name.
    (src / "c.csv").write_text("clip,description\na/clip01.mp4,hello\n")
    [source] = collect(src / "c.csv", columns=Columns("clip", "description"))
    assert dict(source.given)[".txt"] == b"hello"
    with pytest.raises(DatasetError, match=r"no column names the clips.*columns: clip, "
                       r"description.*--path-column"):
        collect(src / "c.csv")
    with pytest.raises(DatasetError, match=r"no column 'clip_path'.*its columns: clip"):
        collect(src / "c.csv", columns=Columns("clip_path"))
    (src / "gap.csv").write_text("path,caption\na/clip01.mp4,x\n,y\n")
    with pytest.raises(DatasetError, match="row 2 has no 'path'"):
        collect(src / "gap.csv")
    # The column most rows have wins: one row's extra "text" takes no one's "prompt".
    (src / "mixed.jsonl").write_text('{"path": "a/clip01.mp4", "prompt": "one"}\n'
                                     '{"path": "b/clip00.mp4", "prompt": "zero", "text": "x"}\n')
    by_name = {s.name: dict(s.given) for s in collect(src / "mixed.jsonl")}
    assert (by_name["a/clip01.mp4"][".txt"], by_name["b/clip00.mp4"][".txt"]) == (b"one",
                                                                                 b"zero")
    # The columns of every row count (the first may lack the caption).
    (src / "later.jsonl").write_text('{"path": "a/clip01.mp4"}\n'
                                     '{"path": "b/clip00.mp4", "caption": "zero"}\n')
    by_name = {s.name: dict(s.given) for s in collect(src / "later.jsonl")}
    assert ".txt" not in by_name["a/clip01.mp4"] and by_name["b/clip00.mp4"][".txt"] == b"zero"
    for name, text, message in [
            ("extra.csv", "path,caption\na/clip01.mp4,hi,EXTRA\n", "row 1 has more fields"),
            ("twice.csv", "path,path\na/clip01.mp4,b/clip00.mp4\n", "names path twice"),
            ("empty.csv", "path,caption\n", "holds no clips"),
            ("number.jsonl", '{"path": 5}\n', "row 1's 'path' is not a path: 5")]:
        (src / name).write_text(text)
        with pytest.raises(DatasetError, match=re.escape(message)):
            collect(src / name)
    (src / "bad.jsonl").write_text('{"path": "a/clip01.mp4"}\n[1, 2]\n')
    with pytest.raises(DatasetError, match="objects"):
        collect(src / "bad.jsonl")
    (src / "torn.json").write_text('[{"path": "a/clip01.mp4"')
    with pytest.raises(DatasetError, match="not a readable json table"):
        collect(src / "torn.json")
    (src / "deep.jsonl").write_text('{"path": ' + "[" * 100_000 + "\n")  # RecursionError
    with pytest.raises(DatasetError, match="not a readable jsonl table"):
        collect(src / "deep.jsonl")
    with pytest.raises(DatasetError, match=r"apply to a \.csv/\.jsonl/\.json list"):
        collect(src, columns=Columns(caption="text"))


def test_a_job_file_is_created_once_where_the_filesystem_has_no_hard_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some FUSE and SMB mounts refuse link(); the exclusive create then opens with O_EXCL.
    from ivvae.storage import publish_bytes

    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = Location.of(str(tmp_path / "out"))
    path = out.join("job.json")
    publish_bytes(out, path, b"first", create=True)
    with pytest.raises(FileExistsError):
        publish_bytes(out, path, b"second", create=True)
    assert Path(path).read_bytes() == b"first"
    assert [p.name for p in Path(out.path).iterdir()] == ["job.json"]  # no temporaries left


def test_a_torn_job_file_is_named_not_a_json_error(tmp_path: Path) -> None:
    from ivvae.dataset.job import JOB_NAME, STATE_DIR, JobConfig, ModelIdentity
    from ivvae.dataset.state import open_output

    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / JOB_NAME).write_text('{"key": "ab')
    config = JobConfig("parquet", ClipOptions(), ModelIdentity("tiny", "0" * 64, "float32"))
    with pytest.raises(DatasetError, match=r"not a whole job file.*remove it"):
        open_output(str(out), config)


async def test_a_service_that_stops_answering_gives_up_the_run_a_slow_clip_does_not(
        clips: Path, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    from ivvae.dataset import Job, Summary, run_job
    from ivvae.dataset.encoders import ServiceEncoder

    # Every encode runs out of the service's own time (504 / DEADLINE_EXCEEDED) while the
    # service stays healthy: each clip's failure, the run goes on.
    with serve_child(tiny_weights, IVVAE_REQUEST_TIMEOUT_S="0.001") as served:
        for url in (served.url, served.grpc_url):
            out = tmp_path / f"slow-{url.split(':')[0]}"
            summary = await encode_dataset(clips, out, server=url, concurrency=2)
            assert (summary.encoded, summary.failed) == (0, CLIPS)
            assert summary.errors == {"deadline_exceeded": CLIPS}

        class StoppedAfterStart(ServiceEncoder):
            async def start(self, model: str = "") -> Any:
                identity = await super().start(model)
                os.kill(served.pid, signal.SIGSTOP)  # keeps its sockets, answers nothing
                return identity

        for url in (served.url, served.grpc_url):
            os.kill(served.pid, signal.SIGCONT)
            encoder = StoppedAfterStart(EncoderSpec(server=url, timeout=2.0, retries=0))
            summary = Summary()
            with pytest.raises(DatasetError, match="does not answer a liveness check either"):
                await run_job(Job(str(clips), str(tmp_path / "hung"), concurrency=2), encoder,
                              summary=summary)
            # given up at the first clip out of time, not recorded as a failure clip by clip
            assert summary.interrupted and summary.failed == 0
            # A service stopped before the run is refused at the start, not clip by clip.
            with pytest.raises(DatasetError, match="unavailable"):
                await encode_dataset(clips, tmp_path / "hung2", server=url,
                                     encoder=EncoderSpec(timeout=2.0),
                                     retry=RetryPolicy(attempts=1))


async def test_a_service_that_changes_model_under_the_run_gives_it_up_unmixed(
        server: ServerThread, clips: Path, tiny_weights: Path,  # noqa: F811
        tmp_path: Path) -> None:
    from ivvae.dataset import Job, Summary, run_job
    from ivvae.dataset.encoders import ServiceEncoder
    from tests.service_fixtures import write_tiny_weights

    other = write_tiny_weights(tmp_path / "other.safetensors", seed=1)  # the same name
    # other weights; the same weights computed in another precision
    for weights, precision, change in ((other, "float32", r"weights \w+, float32\), not"),
                                       (tiny_weights, "bfloat16", r", bfloat16\), not")):
        with server_thread(tiny_settings(weights, encode_precision=precision)) as changed:

            class Restarted(ServiceEncoder):
                """The job's model at the start, then the address serves another (a restart
                with a fine-tuned file or another precision, replicas mid-rollout)."""

                async def start(self, model: str = "") -> Any:
                    identity = await super().start(model)
                    await self.client.close()
                    self.client = AsyncClient(changed.grpc_url)
                    return identity

            out = tmp_path / f"out-{precision}"
            summary = Summary()
            with pytest.raises(DatasetError, match=change):
                await run_job(Job(str(clips), str(out)),
                              Restarted(EncoderSpec(server=server.grpc_url)), summary=summary)
            assert summary.encoded == 0 and not latents(out)

            if precision == "bfloat16":
                # Its encode precision keys the job too (it decides the latents' last bits).
                job = await encode_dataset(clips, tmp_path / "a", server=server.grpc_url)
                assert job.encoded == CLIPS
                config = json.loads((tmp_path / "a" / ".ivvae" / "job.json").read_text())
                assert config["config"]["model"]["encode_precision"] == "float32"
                with pytest.raises(DatasetError, match="holds another job") as refused:
                    await encode_dataset(clips, tmp_path / "a", server=changed.grpc_url)
                assert "encode_precision: 'float32' -> 'bfloat16'" in str(refused.value)


def test_only_a_store_that_gives_no_answer_gives_the_run_up() -> None:
    # A 503 SlowDown after the retries is an answer: a long job must not end for it.
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from ivvae.dataset.clips import _no_answer

    def caused(exc: BaseException) -> OSError:
        wrapped = OSError("s3fs: the call failed")
        wrapped.__cause__ = exc
        return wrapped

    for silent in (TimeoutError(), ConnectionResetError(), caused(TimeoutError()),
                   caused(ReadTimeoutError(endpoint_url="http://s3")),
                   EndpointConnectionError(endpoint_url="http://s3")):
        assert _no_answer(silent), silent
    for answered in (OSError("503 SlowDown"), PermissionError("403"), FileNotFoundError(),
                     caused(ValueError("500 InternalError"))):
        assert not _no_answer(answered), answered


async def test_a_source_changed_while_read_is_retried_not_kept_under_its_listing(
        server: ServerThread, tmp_path: Path) -> None:
    # Overwritten after the listing and put back after the run: its record held the listed
    # identity with the other bytes' latent, and every rerun skipped it for good.
    import shutil

    from ivvae.dataset import Job, Summary, run_job
    from ivvae.dataset.encoders import ServiceEncoder

    src = make_clips(tmp_path / "clips", count=4)
    victim, other = src / "b" / "clip02.mp4", src / "a" / "clip01.mp4"
    listed = victim.read_bytes()

    class OverwritesOneClip(ServiceEncoder):
        async def encode(self, source: Any, options: ClipOptions, name: str) -> Any:
            if name == "b/clip02.mp4":
                shutil.copy(other, victim)  # after the listing, before the read
            return await super().encode(source, options, name)

    out, summary = tmp_path / "out", Summary()
    await run_job(Job(str(src), str(out), format="webdataset"),
                  OverwritesOneClip(EncoderSpec(server=server.grpc_url)), summary=summary)
    assert (summary.encoded, summary.errors) == (3, {"source_changed": 1})
    victim.write_bytes(listed)  # back as it was listed
    again = await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    assert (again.skipped, again.encoded) == (3, 1)
    clean = await encode_dataset(src, tmp_path / "clean", server=server.grpc_url,
                                 format="webdataset")
    assert clean.encoded == 4
    assert latents(out) == latents(tmp_path / "clean")


async def test_a_clip_being_added_when_the_run_gives_up_is_published_whole(
        server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The give-up cancelled the worker awaiting its writer.add thread, and the run
    # published the writer while that thread still wrote the clip into it.
    from ivvae.dataset import Job, Summary, run_job
    from ivvae.dataset.encoders import ServiceEncoder
    from ivvae.dataset.parts import PartWriter

    src = make_clips(tmp_path / "clips", count=2)
    real_add = PartWriter.add

    def slow_add(self: PartWriter, *args: Any) -> None:
        time.sleep(1.5)
        real_add(self, *args)

    monkeypatch.setattr(PartWriter, "add", slow_add)

    class GivesUpOnOne(ServiceEncoder):
        async def encode(self, source: Any, options: ClipOptions, name: str) -> Any:
            if name == "a/clip01.mp4":
                await asyncio.sleep(0.5)  # while b/clip00 is being added
                raise DatasetError("the service went away (test)")
            return await super().encode(source, options, name)

    out, summary = tmp_path / "out", Summary()
    with pytest.raises(DatasetError, match="went away"):
        await run_job(Job(str(src), str(out), format="webdataset", concurrency=2),
                      GivesUpOnOne(EncoderSpec(server=server.grpc_url)), summary=summary)
    assert summary.encoded == 1
    assert list(latents(out)) == ["b/clip00.mp4"]


class _Gated:
    """An encoder that holds its first clip until ``gate`` is set; ``listed`` is set when
    that clip is asked for, so the worker has listed the sources and planned by then."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.gate, self.listed = inner, asyncio.Event(), asyncio.Event()

    async def start(self, model: str = "") -> Any:
        return await self.inner.start(model)

    async def encode(self, source: Any, options: ClipOptions, name: str) -> Any:
        self.listed.set()
        await self.gate.wait()
        return await self.inner.encode(source, options, name)

    async def close(self) -> None:
        await self.inner.close()


async def test_the_last_worker_to_stop_names_a_clip_as_its_own_worker_listed_it(
        server: ServerThread, tmp_path: Path) -> None:
    # Worker 0 listed the sources, then a clip of worker 1 changed, and worker 1 encoded
    # the new version; worker 0, stopping last, wrote the manifest from its older listing:
    # the clip's old latent, which compaction then kept and the new one's shard lost.
    from ivvae.compact import compact
    from ivvae.dataset import Job, run_job

    src = make_clips(tmp_path / "src", count=6)
    out = tmp_path / "out"
    await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    sources = collect(src)
    theirs = next(s for s in sources if s.worker(2) == 1)
    ours = next(s for s in sources if s.worker(2) == 0)
    media.make_video(src / ours.name, frames=9, width=24, height=16, fps=5)  # work for 0
    first = _Gated(EncoderSpec(server=server.grpc_url).build())
    running = asyncio.create_task(run_job(Job(str(src), str(out), format="webdataset",
                                              shard=(0, 2)), first))
    await asyncio.wait_for(first.listed.wait(), 60)
    media.make_video(src / theirs.name, frames=9, width=16, height=24, fps=6)
    second = await encode_dataset(src, out, server=server.grpc_url, format="webdataset",
                                  shard=(1, 2))
    assert (second.encoded, second.failed) == (1, 0)
    first.gate.set()
    assert (await running).encoded == 1  # and it wrote the manifest last

    fresh = await encode_dataset(src, tmp_path / "fresh", server=server.grpc_url,
                                 format="webdataset")
    assert fresh.encoded == 6
    assert {r["source"]: r["key"] for r in manifest(out)} == {
        r["source"]: r["key"] for r in manifest(tmp_path / "fresh")}
    assert all(r["status"] == "ok" for r in manifest(out))
    assert latents(out) == latents(tmp_path / "fresh")
    compact(str(out))
    assert latents(out) == latents(tmp_path / "fresh")
    assert set(shard_samples(out).values()) == {1}


async def test_a_worker_whose_listing_began_first_but_saw_a_change_is_not_overruled(
        server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Listings overlap: worker 0 began listing first but reached its clip X after X
    # changed; worker 1 began later, saw X before the change, and stopped. Ordered by when
    # they began, worker 1's listing was "newest" and the manifest named X's old latent,
    # which worker 0 had just replaced.
    from ivvae.dataset import run

    src = make_clips(tmp_path / "src", count=6)
    out = tmp_path / "out"
    await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    ours = next(s for s in collect(src) if s.worker(2) == 0)
    real, calls = run.collect, [0]

    def slow_listing(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:  # worker 0's listing has begun; worker 1 runs whole meanwhile
            other = asyncio.run(encode_dataset(src, out, server=server.grpc_url,
                                               format="webdataset", shard=(1, 2)))
            assert other.encoded == 0
            media.make_video(src / ours.name, frames=9, width=24, height=16, fps=5)
        return real(*args, **kw)

    monkeypatch.setattr(run, "collect", slow_listing)
    first = await encode_dataset(src, out, server=server.grpc_url, format="webdataset",
                                 shard=(0, 2))
    monkeypatch.undo()
    assert first.encoded == 1
    fresh = await encode_dataset(src, tmp_path / "fresh", server=server.grpc_url,
                                 format="webdataset")
    assert fresh.encoded == 6
    assert {r["source"]: r["key"] for r in manifest(out)} == {
        r["source"]: r["key"] for r in manifest(tmp_path / "fresh")}
    assert latents(out) == latents(tmp_path / "fresh")


async def test_a_rerun_with_another_worker_count_is_not_overruled_by_the_old_split(
        server: ServerThread, tmp_path: Path) -> None:
    # Two workers, then a change and one unsharded rerun, then worker 0 of 2 again: the
    # old worker 1's listing of its share (before the change) must not name the clip.
    src = make_clips(tmp_path / "src", count=6)
    out = tmp_path / "out"
    for i in (0, 1):
        await encode_dataset(src, out, server=server.grpc_url, format="webdataset",
                             shard=(i, 2))
    theirs = next(s for s in collect(src) if s.worker(2) == 1)
    media.make_video(src / theirs.name, frames=9, width=24, height=16, fps=5)
    whole = await encode_dataset(src, out, server=server.grpc_url, format="webdataset")
    assert whole.encoded == 1
    again = await encode_dataset(src, out, server=server.grpc_url, format="webdataset",
                                 shard=(0, 2))
    assert (again.encoded, again.skipped) == (0, again.total)
    fresh = await encode_dataset(src, tmp_path / "fresh", server=server.grpc_url,
                                 format="webdataset")
    assert fresh.encoded == 6
    assert {r["source"]: r["key"] for r in manifest(out)} == {
        r["source"]: r["key"] for r in manifest(tmp_path / "fresh")}
    assert sorted(p.name for p in (out / ".ivvae" / "listings").iterdir()) == [
        "w00000of00002.jsonl"]


def test_a_run_given_up_mid_way_exits_2_with_the_summary(
        server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A give-up (here: the service changed its model under the run) printed only the
    # error, so a script could not tell what had been done before it.
    import argparse

    from ivvae.dataset import command, encoders

    src = make_clips(tmp_path / "src", count=4)
    real = encoders.ServiceEncoder.encode
    calls = [0]

    async def changes_after_two(self: Any, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] > 2:
            raise DatasetError("the service now serves another model (test)")
        return await real(self, *args)

    monkeypatch.setattr(encoders.ServiceEncoder, "encode", changes_after_two)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(src), str(tmp_path / "out"), "--server", server.grpc_url,
                              "--no-progress", "--concurrency", "1"])
    assert command.main(args) == 2
    captured = capsys.readouterr()
    assert "another model (test)" in captured.err
    summary = json.loads(captured.out)
    assert (summary["total"], summary["encoded"]) == (4, 2)
    assert summary["output"].endswith(str(tmp_path / "out"))


async def test_rows_that_set_their_own_window_make_a_clip_each(tmp_path: Path,
                                                                tiny_weights: Path  # noqa: F811
                                                                ) -> None:
    # Scene-cut or captioned-span tables (one long video, a row per span with its own
    # caption): --option-column takes each row's start and length, and every row is its
    # own clip, encoded exactly as that window alone.
    import csv

    from ivvae.video.preprocess import Preprocess

    src = tmp_path / "src"
    src.mkdir()
    media.make_video(src / "long.mp4", frames=30, width=16, height=16, fps=10)
    media.make_video(src / "short.mp4", frames=5, width=16, height=16, fps=10)
    rows = [{"path": "long.mp4", "caption": "the start", "begin": "0", "n": "5"},
            {"path": "long.mp4", "caption": "later", "begin": "1.2", "n": "9"},
            {"path": "long.mp4", "caption": "the end", "begin": "2.5", "n": ""},
            {"path": "short.mp4", "caption": "whole", "begin": "", "n": ""}]
    table = src / "spans.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = Columns(options=Columns.parse_options(["start_s=begin", "num_frames=n"]))
    options = ClipOptions(preprocess=Preprocess.parse({"max_frames": "17"}).canonical())
    out = tmp_path / "out"
    summary = await encode_dataset(table, out, encoder=_encoder(tiny_weights),
                                   format="webdataset", columns=columns, options=options)
    assert (summary.total, summary.encoded, summary.failed) == (4, 4, 0)
    got = {meta["source"]: (latent, meta) for latent, meta in LatentDataset(str(out))}
    windows = {"long.mp4#start_s=0,num_frames=5": ({"start_s": "0", "num_frames": "5"}, 5),
               "long.mp4#start_s=6%2F5,num_frames=9": ({"start_s": "1.2", "num_frames": "9"}, 9),
               "long.mp4#start_s=5%2F2": ({"start_s": "2.5", "max_frames": "17"}, 5),
               "short.mp4": ({"max_frames": "17"}, 5)}
    assert set(got) == set(windows)  # a rate's "/" would make a folder of a files output
    for name, (window, frames) in windows.items():
        latent, meta = got[name]
        assert meta["sidecars"][".txt"].decode() == next(
            r["caption"] for r in rows if name.startswith(r["path"]) and (
                r["begin"] == window.get("start_s", "")))
        alone = tmp_path / "alone" / name.replace("#", "_")
        (src / "one.txt").write_text(name.split("#")[0] + "\n")
        one = await encode_dataset(
            src / "one.txt", alone, encoder=_encoder(tiny_weights),
            options=ClipOptions(preprocess=Preprocess.parse(window).canonical()))
        assert one.encoded == 1
        [(alone_latent, _)] = list(LatentDataset(str(alone)))
        assert latent.numpy().tobytes() == alone_latent.numpy().tobytes(), name
        assert int(meta["num_frames"]) == frames
    # A rerun skips every window; a row's new window is a new clip, the others stay.
    rows[1]["begin"] = "1.5"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    again = await encode_dataset(table, out, encoder=_encoder(tiny_weights),
                                 format="webdataset", columns=columns, options=options)
    assert (again.encoded, again.skipped) == (1, 3)
    assert "long.mp4#start_s=3%2F2,num_frames=9" in {r["source"] for r in manifest(out)}
    assert len(manifest(out)) == 4


def test_row_options_that_are_wrong_are_named_before_any_work(tmp_path: Path) -> None:
    from ivvae.dataset import Job
    from ivvae.dataset.job import ModelIdentity
    from ivvae.dataset.run import plan

    src = make_clips(tmp_path / "src", count=2)
    by = Columns(options=Columns.parse_options(["start_s", "num_frames=frames"]))
    for text, message in [
            ("path,start_s,frames\na/clip01.mp4,-1,5\n", "row 1: option 'start_s'"),
            ("path,start_s,frames\na/clip01.mp4,0,five\n", "row 1: option 'num_frames'"),
            ("path,start_s\na/clip01.mp4,0\n", "no column 'frames'"),
            ("path,start_s,frames\na/clip01.mp4,0,5\nb/clip00.mp4,0,5\na/clip01.mp4,0,5\n",
             "listed twice with the options start_s=0,num_frames=5 ("),
            ("path,start_s,frames\na/clip01.mp4,0,5\nb/clip00.mp4,0,5\na/clip01.mp4,0,5\n",
             "t.csv, rows 1 and 3)")]:
        (src / "t.csv").write_text(text)
        with pytest.raises(DatasetError, match=re.escape(message)):
            collect(src / "t.csv", columns=by)
    with pytest.raises(DatasetError, match="not a preprocessing option"):
        Columns(options=(("begin", "begin"),))
    # A row's start_s takes the place of the job's start_frame, but a row's num_frames
    # cannot undo the job's bucket: refused at the start, naming the clip.
    from ivvae.dataset.sources import with_row_options

    assert with_row_options("start_frame=2;max_frames=9;stride=2", "start_s=1/2;fps=5") == (
        "start_s=1/2;max_frames=9;fps=5")
    (src / "t.csv").write_text("path,start_s,frames\na/clip01.mp4,0.5,5\n")
    job = Job(str(src / "t.csv"), str(tmp_path / "out"), columns=by,
              options=ClipOptions(preprocess="bucket=16x16x5"))
    import contextlib

    with contextlib.ExitStack() as held, pytest.raises(
            DatasetError, match=r"a/clip01.mp4#start_s=1%2F2,num_frames=5: .*'bucket' "
                                r"and 'num_frames' contradict"):
        plan(job, ModelIdentity("m", "0" * 64, "float32"), held)
    assert not (tmp_path / "out").exists()
    # A row's crop under the job's exact size; pandas' "9.0" counts, blank cells and a
    # header with a space after the comma, as tables come.
    assert with_row_options("resize=16x16", "crop=none") == "resize=16x16;crop=none"
    (src / "p.csv").write_text("path, crop,frames\na/clip01.mp4,none,9.0\nb/clip00.mp4, ,\n")
    spaced = Columns(options=Columns.parse_options(["crop= crop", "num_frames=frames"]))
    assert {s.name: s.options for s in collect(src / "p.csv", columns=spaced)} == {
        "a/clip01.mp4#crop=none,num_frames=9": "crop=none;num_frames=9", "b/clip00.mp4": ""}
    # The command line's spelling.
    import argparse

    from ivvae.dataset.command import add_arguments, job_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    job, _ = job_from_args(parser.parse_args(
        [str(src / "t.csv"), "out", "--option-column", "start_s", "--option-column",
         "num_frames=frames"]))
    assert job.columns == by
    # Ray's rows carry them.
    from ivvae.dataset import Source

    [source] = collect(src / "t.csv", columns=by)
    assert Source.from_row(source.as_row()) == source and source.options


async def test_a_shared_copy_is_fetched_again_after_a_failure_and_removed_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae.dataset import Source, clips
    from ivvae.dataset.clips import Copies

    calls: list[str] = []

    def fetch(source: Source, spool: str | None = None) -> tuple[Path, bool]:
        calls.append(source.name)
        if len(calls) == 1:
            raise OSError("the store hung up (test)")
        copy = tmp_path / f"copy{len(calls)}"
        copy.write_bytes(b"clip")
        return copy, True

    monkeypatch.setattr(clips, "fetch_clip", fetch)
    windows = [Source(f"v.mp4#start_s={i}", "s3://b/v.mp4", "etag:1", f"v{i}") for i in range(3)]
    copies = Copies(windows)
    assert all(copies.shares(w) for w in windows)
    with pytest.raises(OSError, match="hung up"):
        await copies.fetch(windows[0])
    copies.done(windows[0])
    (first, temporary), (again, _) = await asyncio.gather(copies.fetch(windows[1]),
                                                          copies.fetch(windows[2]))
    assert first == again and temporary and len(calls) == 2  # the two waited for one fetch
    copies.done(windows[1])
    assert first.exists()
    copies.done(windows[2])  # the last reader
    assert not first.exists()
    # Stopped before every reader was done: close removes what is held.
    copies = Copies(windows)
    held, _ = await copies.fetch(windows[0])
    copies.close()
    assert not held.exists()


def test_a_clip_its_worker_no_longer_lists_is_not_named_by_another_s_older_view(
        tmp_path: Path) -> None:
    # Worker 1 listed everything, then a clip of worker 0's share was deleted and worker 0
    # ran again; worker 1, stopping last, named the deleted clip from its own older view
    # (and compaction kept its sample).
    from ivvae.dataset import ClipOptions
    from ivvae.dataset.job import JobConfig, ModelIdentity
    from ivvae.dataset.sources import worker_of
    from ivvae.dataset.state import Listing, publish_share, write_manifest

    config = JobConfig("webdataset", ClipOptions(), ModelIdentity("m", "0" * 64, "float32"))
    everything = tuple((f"c{i}.mp4", f"sha256:{i}", f"k{i}") for i in range(8))
    gone = next(c for c in everything if worker_of(c[0], 2) == 0)
    out = Location.of(str(tmp_path / "out"))
    publish_share(out, Listing("w00000of00002", tuple(
        c for c in everything if worker_of(c[0], 2) == 0 and c != gone)), 2)
    write_manifest(out, Listing("w00001of00002", everything), 2, config)
    named = {r["source"] for r in manifest(tmp_path / "out")}
    assert named == {c[0] for c in everything} - {gone[0]}
    # Until worker 1 publishes its share, its clips are named from the writer's view.
    assert all(r["status"] == "pending" for r in manifest(tmp_path / "out"))


def test_one_file_under_two_spellings_with_other_options_is_two_clips(tmp_path: Path) -> None:
    src = make_clips(tmp_path / "src", count=2)
    (src / "t.csv").write_text("path,start_s\na/clip01.mp4,0\n./a/clip01.mp4,0.2\n")
    by = Columns(options=Columns.parse_options(["start_s"]))
    sources = collect(src / "t.csv", columns=by)
    assert [s.name for s in sources] == ["./a/clip01.mp4#start_s=1%2F5",
                                         "a/clip01.mp4#start_s=0"]
    assert len({s.url for s in sources}) == 1 and len({s.output for s in sources}) == 2


def test_a_run_that_cannot_write_its_manifest_at_the_end_exits_2(
        server: ServerThread, clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its failure was swallowed: exit 0, and no manifest naming what it had done.
    import argparse

    from ivvae.dataset import command, run

    def no_manifest(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_manifest", no_manifest)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(clips), str(tmp_path / "out"), "--server", server.grpc_url,
                              "--no-progress"])
    assert command.main(args) == 2
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "run it again" in captured.err
    summary = json.loads(captured.out)
    # The summary named a manifest that was never written.
    assert summary["encoded"] == CLIPS and summary["manifest"] is None


async def test_a_copy_still_downloading_when_the_run_stops_is_removed_once_it_lands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C mid-download: the thread finished the copy after the clip was given up, and
    # nobody removed it (one file in the spool folder per interrupted run).
    import threading

    from ivvae.dataset import Source, clips
    from ivvae.dataset.clips import Copies

    landed, returned = tmp_path / "copy.mp4", threading.Event()

    def slow_fetch(source: Source, spool: str | None = None) -> tuple[Path, bool]:
        time.sleep(0.5)
        landed.write_bytes(b"clip")
        returned.set()
        return landed, True

    monkeypatch.setattr(clips, "fetch_clip", slow_fetch)
    one = Source("v.mp4", "s3://b/v.mp4", "etag:1", "v")  # read by one clip only
    copies = Copies([one])
    reading = asyncio.ensure_future(copies.fetch(one))
    await asyncio.sleep(0.1)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    copies.done(one)
    copies.close()
    assert await asyncio.to_thread(returned.wait, 30)
    for _ in range(3):  # the thread's result, then its done callback
        await asyncio.sleep(0.05)
    assert not landed.exists()
