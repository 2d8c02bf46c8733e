"""``ivvae encode-dataset``: a folder of clips through a real gRPC server, with a manifest,
and resume after Ctrl-C or a kill without redoing or corrupting finished items."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivvae.client import LatentResult, RetryPolicy
from ivvae.dataset import (
    LATENT_SUFFIX,
    MANIFEST_NAME,
    DatasetError,
    _locked,
    collect,
    encode_dataset,
    read_manifest,
)
from tests import media
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import tiny_settings, tiny_weights  # noqa: F401

CLIPS = 20


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:  # noqa: F811
    with server_thread(tiny_settings(tiny_weights)) as srv:
        yield srv


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 distinct tiny clips in two subfolders, and a file that is not a video."""
    src = tmp_path_factory.mktemp("clips")
    for i in range(CLIPS):
        folder = src / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        media.make_video(folder / f"clip{i:02d}.mp4", frames=5, width=16, height=16,
                         fps=10 + i)
    (src / "notes.txt").write_text("not a video")
    return src


def _ok_records(out: Path) -> dict[str, dict[str, Any]]:
    return {s: r for s, r in read_manifest(out / MANIFEST_NAME).items() if r["status"] == "ok"}


def _file_ids(out: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.rglob(f"*{LATENT_SUFFIX}")}


def _check_outputs(src: Path, out: Path) -> None:
    """Every clip has an ok manifest record naming a valid latent that matches it."""
    records = _ok_records(out)
    assert sorted(records) == sorted(p.relative_to(src).as_posix()
                                     for p in src.rglob("*.mp4"))
    for source, record in records.items():
        latent = LatentResult.load(out / record["latent"])
        assert record["latent"] == source + LATENT_SUFFIX
        assert list(latent.latent_shape) == record["shape"] == [1, 4, 2, 2, 2]
        assert record["content_sha256"] == hashlib.sha256(
            (src / source).read_bytes()).hexdigest() == latent.info.content_sha256
        assert record["latent_sha256"] == hashlib.sha256(latent.data).hexdigest()
    assert not list(out.rglob("*.tmp"))


def _count_encodes(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
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


async def test_folder_concurrency_4_then_nothing_to_redo(
        server: ServerThread, clips: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    count = _count_encodes(server, monkeypatch)
    summary = await encode_dataset(clips, out, server=server.grpc_url, concurrency=4)
    assert (summary.total, summary.encoded, summary.skipped, summary.failed) == (20, 20, 0, 0)
    assert count[0] == 20
    assert len((out / MANIFEST_NAME).read_text().splitlines()) == 20
    _check_outputs(clips, out)

    before = _file_ids(out)
    again = await encode_dataset(clips, out, server=server.grpc_url, concurrency=4)
    assert (again.encoded, again.skipped) == (0, 20)
    assert count[0] == 20
    assert _file_ids(out) == before


def _start_cli(server: ServerThread, src: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(src), str(out),
         "--server", server.grpc_url, "--concurrency", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _interrupt_after(proc: subprocess.Popen[str], out: Path, lines: int,
                           sig: signal.Signals) -> None:
    manifest = out / MANIFEST_NAME
    deadline = time.monotonic() + 60
    while not (manifest.is_file() and len(manifest.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "encode-dataset made no progress"
        await asyncio.sleep(0.02)
    proc.send_signal(sig)
    await asyncio.to_thread(proc.wait, 30)


async def test_resume_after_ctrl_c_and_kill(server: ServerThread, clips: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    count = _count_encodes(server, monkeypatch, delay_s=0.25)  # >= 2.5 s for the whole set

    # Ctrl-C: a clean stop, finished items recorded, no temporary files.
    proc = _start_cli(server, clips, out)
    await _interrupt_after(proc, out, 4, signal.SIGINT)
    assert proc.returncode == 130, proc.communicate()
    assert not list(out.rglob("*.tmp"))
    after_sigint = _ok_records(out)
    assert 4 <= len(after_sigint) < CLIPS

    # A kill: no cleanup at all. A half-written latent of it is simulated too.
    proc = _start_cli(server, clips, out)
    await _interrupt_after(proc, out, len(after_sigint) + 4, signal.SIGKILL)
    stray = out / f"clip98.mp4{LATENT_SUFFIX}.4242-deadbeef.tmp"
    stray.write_bytes(b"half a latent")
    finished = _ok_records(out)
    assert set(after_sigint) < set(finished) and len(finished) < CLIPS
    finished_files = {k: v for k, v in _file_ids(out).items()
                      if k in {r["latent"] for r in finished.values()}}

    count[0] = 0
    summary = await encode_dataset(clips, out, server=server.grpc_url, concurrency=4)
    assert summary.skipped == len(finished)
    assert summary.encoded == count[0] == CLIPS - len(finished)
    _check_outputs(clips, out)
    ids = _file_ids(out)
    assert {k: ids[k] for k in finished_files} == finished_files  # not rewritten


async def test_list_file_and_failed_items(server: ServerThread, clips: Path,
                                          tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(3000))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two clips and a bad file\n\n{clips / 'a' / 'clip01.mp4'}\n"
                       "bad.mp4\nmissing.mp4\n")
    items = collect(listing)
    assert [i.source for i in items] == [str(clips / "a" / "clip01.mp4"), "bad.mp4",
                                         "missing.mp4"]
    assert items[1].latent == "bad.mp4" + LATENT_SUFFIX
    assert items[0].latent.endswith("a/clip01.mp4" + LATENT_SUFFIX)  # mirrored whole

    out = tmp_path / "out"
    summary = await encode_dataset(listing, out, server=server.grpc_url, concurrency=2)
    assert (summary.encoded, summary.failed) == (1, 2)
    records = read_manifest(out / MANIFEST_NAME)
    assert records["bad.mp4"]["status"] == "error"
    assert records["bad.mp4"]["error"] == "unsupported_media"
    assert records["missing.mp4"]["error"] == "io_error"
    again = await encode_dataset(listing, out, server=server.grpc_url, concurrency=2)
    assert (again.skipped, again.encoded, again.failed) == (1, 0, 2)  # failures retried


async def test_cli_exit_codes_and_lock(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with _locked(out), pytest.raises(DatasetError, match="another encode-dataset"):
        await encode_dataset(clips, out, server="grpc://127.0.0.1:9")
    with pytest.raises(DatasetError, match="unavailable"):
        await encode_dataset(clips, out, server="grpc://127.0.0.1:9",
                             retry=RetryPolicy(attempts=2, initial_backoff_s=0.01))
    done = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(tmp_path / "nope"),
         str(out), "--server", "grpc://127.0.0.1:9"], capture_output=True, text=True)
    assert done.returncode == 2 and "neither a folder nor a list" in done.stderr
    summary = json.loads(subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "encode-dataset", str(tmp_path / "out"),
         str(tmp_path / "out2"), "--server", "grpc://127.0.0.1:9"],
        capture_output=True, text=True).stdout)
    assert summary["total"] == 0  # a folder with no videos in it: nothing to do
