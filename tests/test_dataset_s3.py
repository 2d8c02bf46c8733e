"""``encode-dataset`` from and to a real S3-compatible server (moto, loopback), all three
formats, read back with ``ivvae.data`` byte for byte as each clip encoded alone."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from ivvae.data import IterableLatentDataset, LatentDataset, to_torch
from ivvae.dataset import FORMATS, MANIFEST_NAME, ClipOptions, EncoderSpec, encode_dataset
from ivvae.safetensors_io import loads
from tests import media
from tests.s3_server import S3Server, s3_server  # noqa: F401
from tests.service_fixtures import tiny_weights  # noqa: F401

CLIPS = 5


def in_process(weights: Path) -> EncoderSpec:
    # One torch thread: on a shared 2-core machine more threads run several times slower.
    return EncoderSpec(weights=str(weights), torch_threads=1)


def encode_alone(weights: Path, clips: dict[str, bytes], dtype: str) -> dict[str, bytes]:
    """Each clip through a fresh in-process encoder on its own: the raw latent tensor bytes."""

    async def run() -> dict[str, bytes]:
        encoder = in_process(weights).build()
        await encoder.start()
        try:
            out = {}
            for name, data in clips.items():
                encoded = await encoder.encode(data, ClipOptions(dtype=dtype), name)
                out[name] = loads(encoded.data)[0]["latent"].array.tobytes()
            return out
        finally:
            await encoder.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def bucket_clips(s3_server: S3Server) -> Iterator[tuple[str, dict[str, bytes]]]:  # noqa: F811
    """Clips (two folders, one with a caption sidecar) in a fresh bucket."""
    src = s3_server.make_bucket("raw-clips")
    fs = fsspec.filesystem("s3")
    clips = {}
    for i in range(CLIPS):
        name = f"{'a' if i % 2 else 'b'}/clip{i}.mp4"
        clips[name] = media.make_video(None, frames=5, width=16, height=16, fps=10 + i)
        fs.pipe_file(f"raw-clips/{name}", clips[name])
    fs.pipe_file("raw-clips/b/clip0.txt", b"a caption")
    fs.pipe_file("raw-clips/b/notes.md", b"not a clip")
    yield src, clips


@pytest.mark.parametrize("fmt", FORMATS)
def test_s3_to_s3_and_back(fmt: str, s3_server: S3Server,  # noqa: F811
                           bucket_clips: tuple[str, dict[str, bytes]],
                           tiny_weights: Path) -> None:  # noqa: F811
    src, clips = bucket_clips
    out = s3_server.make_bucket(f"latents-{fmt}") + "/v1"
    dtype = "bfloat16" if fmt == "parquet" else "float32"
    summary = asyncio.run(encode_dataset(
        src + "/", out, encoder=in_process(tiny_weights), format=fmt,
        options=ClipOptions(dtype=dtype), shard_clips=2))
    assert (summary.total, summary.encoded, summary.failed) == (CLIPS, CLIPS, 0)

    fs = fsspec.filesystem("s3")
    listed = fs.find(out.removeprefix("s3://"))
    if fmt == "files":
        assert sorted(p.rsplit("/v1/", 1)[1] for p in listed if p.endswith(".safetensors")) \
            == sorted(n + ".latent.safetensors" for n in clips)
    else:
        shards = [p for p in listed if "/shards/" in p]
        assert len(shards) == 3  # 5 clips, 2 per shard
    assert len(fs.cat_file(f"{out}/{MANIFEST_NAME}").splitlines()) == CLIPS

    expected = encode_alone(tiny_weights, clips, dtype)
    ds = LatentDataset(out)
    assert len(ds) == CLIPS
    seen = {}
    for i in range(len(ds)):
        latent, meta = ds[i]
        assert latent.dtype == getattr(torch, dtype) and tuple(latent.shape) == (1, 4, 2, 2, 2)
        seen[meta["source"]] = latent.view(torch.int16 if dtype == "bfloat16"
                                           else torch.int32).numpy().tobytes()
        if fmt != "files" and meta["source"] == "b/clip0.mp4":
            assert meta["sidecars"] == {".txt": b"a caption"}
    assert seen == expected

    streamed = list(IterableLatentDataset(out, shuffle=True, seed=3))
    assert sorted(m["source"] for _, m in streamed) == sorted(clips)


def test_webdataset_shards_read_by_the_webdataset_package(
        bucket_clips: tuple[str, dict[str, bytes]], tiny_weights: Path,  # noqa: F811
        tmp_path: Path) -> None:
    import webdataset as wds

    src, clips = bucket_clips
    summary = asyncio.run(encode_dataset(
        src, tmp_path / "out", encoder=in_process(tiny_weights),
        format="webdataset"))
    assert summary.encoded == CLIPS
    shards = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(n.replace(".", "_") for n in clips)
    caption = next(s for s in samples if s["__key__"] == "b/clip0_mp4")
    assert caption["txt"] == b"a caption"
    for s in samples:
        tensors, meta = loads(s["latent.safetensors"])
        assert meta["format"] == "ivvae.latent"
        assert to_torch(tensors["latent"]).shape == (1, 4, 2, 2, 2)
    with tarfile.open(fileobj=io.BytesIO(Path(shards[0]).read_bytes())) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())  # reproducible bytes


def test_dataloader_workers_read_their_own_shards(
        s3_server: S3Server, bucket_clips: tuple[str, dict[str, bytes]],  # noqa: F811
        tiny_weights: Path) -> None:  # noqa: F811
    src, clips = bucket_clips
    out = s3_server.make_bucket("latents-loader")
    asyncio.run(encode_dataset(src, out, encoder=in_process(tiny_weights),
                               format="parquet", shard_clips=1))
    ds = IterableLatentDataset(out, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    sources = [meta["source"] for _, meta in loader]
    assert sorted(sources) == sorted(clips)  # each clip once: the workers split the shards
    halves = [IterableLatentDataset(out, rank=r, world_size=2).parts() for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0] + halves[1]) == CLIPS
    assert np.all([isinstance(x, str) for x in sources])


def three_clips(s3_server: S3Server, bucket: str) -> tuple[str, Any]:  # noqa: F811
    """A new bucket holding clip0..2.mp4 (distinct), and its filesystem."""
    src = s3_server.make_bucket(bucket)
    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.pipe_file(f"{bucket}/clip{i}.mp4",
                     media.make_video(None, frames=5, width=16, height=16, fps=20 + i))
    return src, fs


def test_replaced_object_is_reencoded(s3_server: S3Server, tiny_weights: Path) -> None:  # noqa: F811
    src, fs = three_clips(s3_server, "replaced")
    out = src + "/out"
    spec = in_process(tiny_weights)
    asyncio.run(encode_dataset(src + "/", out, encoder=spec))
    before = {r["source"]: r for r in LatentDataset(out).records}
    assert all(r["identity"].startswith("etag:") for r in before.values())
    fs.pipe_file("replaced/clip1.mp4",
                 media.make_video(None, frames=9, width=16, height=16, fps=5))
    summary = asyncio.run(encode_dataset(src + "/", out, encoder=spec))
    assert (summary.encoded, summary.skipped) == (1, 2)
    after = {r["source"]: r for r in LatentDataset(out).records}
    assert after["clip1.mp4"]["identity"] != before["clip1.mp4"]["identity"]
    assert after["clip1.mp4"]["shape"] == [1, 4, 3, 2, 2]
    assert {k: after[k] for k in ("clip0.mp4", "clip2.mp4")} == {
        k: before[k] for k in ("clip0.mp4", "clip2.mp4")}


def test_a_key_that_names_a_parent_folder_stays_under_out(
        s3_server: S3Server, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    """S3 takes "clips/../../../x.mp4" as a plain key; its latent was written three
    folders above OUT (anyone who can add objects to the source bucket chose where)."""
    bucket = s3_server.make_bucket("dotted")
    fs = fsspec.filesystem("s3")
    clip = media.make_video(None, frames=5, width=16, height=16)
    fs.pipe_file("dotted/clips/ok.mp4", clip)
    fs.pipe_file("dotted/clips/../../../escaped.mp4", clip)
    fs.pipe_file("dotted/clips/a/../ok.mp4", clip)  # another key than clips/ok.mp4
    out = tmp_path / "a" / "b" / "out"
    summary = asyncio.run(encode_dataset(bucket + "/clips/", out, format="files",
                                         encoder=in_process(tiny_weights)))
    assert (summary.encoded, summary.failed) == (3, 0)
    written = sorted(p.relative_to(tmp_path).as_posix()
                     for p in tmp_path.rglob("*.latent.safetensors"))
    assert written == ["a/b/out/%2E%2E/%2E%2E/%2E%2E/escaped.mp4.latent.safetensors",
                       "a/b/out/a/%2E%2E/ok.mp4.latent.safetensors",
                       "a/b/out/ok.mp4.latent.safetensors"]
    records = LatentDataset(str(out)).records
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert sorted(r["source"] for r in records) == [
        "../../../escaped.mp4", "a/../ok.mp4", "ok.mp4"]
    again = asyncio.run(encode_dataset(bucket + "/clips/", out, format="files",
                                       encoder=in_process(tiny_weights)))
    assert (again.encoded, again.skipped) == (0, 3)


@contextlib.contextmanager
def http_folder(folder: Path, handler: Any = None) -> Iterator[str]:
    """``folder`` served over HTTP on a free loopback port (``handler``: a subclass of
    ``SimpleHTTPRequestHandler``) until the block ends; its base URL."""
    import functools
    import http.server
    import threading

    cls = handler or http.server.SimpleHTTPRequestHandler
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(cls, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()


def test_https_sources_from_a_list_file(tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    served = tmp_path / "www"
    served.mkdir()
    for i in range(2):
        media.make_video(served / f"c{i}.mp4", frames=5, width=16, height=16, fps=30 + i)
    with http_folder(served) as base:
        listing = tmp_path / "list.txt"
        listing.write_text(f"{base}/c0.mp4\n{base}/c1.mp4\n{base}/gone.mp4\n")
        out = tmp_path / "out"
        summary = asyncio.run(encode_dataset(listing, out,
                                             encoder=in_process(tiny_weights)))
        assert (summary.encoded, summary.failed) == (2, 1)
        records = {r["source"]: r for r in LatentDataset(str(out)).records}
        assert sorted(records) == [f"{base}/c0.mp4", f"{base}/c1.mp4"]
        assert records[f"{base}/c0.mp4"]["part"].startswith("127.0.0.1:")


def test_parts_published_by_another_process_are_seen(
        s3_server: S3Server, bucket_clips: tuple[str, dict[str, bytes]],  # noqa: F811
        tiny_weights: Path) -> None:  # noqa: F811
    import s3fs

    from ivvae.dataset.job import PARTS_DIR
    from ivvae.dataset.state import load_state
    from ivvae.storage import Location

    src, _ = bucket_clips
    out = s3_server.make_bucket("latents-others") + "/job"
    asyncio.run(encode_dataset(src, out, encoder=in_process(tiny_weights), shard_clips=2))
    loc = Location.of(out)
    before = load_state(loc, "files")  # fills this process's listing cache
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another worker's client
    record = {"source": "elsewhere.mp4", "key": "k", "status": "error", "error": "x"}
    other.pipe_file(f"{loc.path}/{PARTS_DIR}/w00001of00002-x-00000.jsonl",
                    (json.dumps(record) + "\n").encode())
    after = load_state(loc, "files")
    assert "elsewhere.mp4" not in before.records and "elsewhere.mp4" in after.records


def test_storage_that_fails_outside_oserror_is_exit_2_with_the_reason(
        s3_server: S3Server, bucket_clips: tuple[str, dict[str, bytes]],  # noqa: F811
        tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    # botocore's own errors (no credentials, no endpoint) are not OSError: they came out as
    # "internal error", exit 1, where a job that cannot start or go on exits 2.
    import os
    import socket
    import subprocess
    import sys

    src, _ = bucket_clips
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    no_keys = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_keys.update(AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=s3_server.endpoint,
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   AWS_CONFIG_FILE=str(tmp_path / "none"))
    for env, says in (({**os.environ, "AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"},
                       "Could not connect"),
                      (no_keys, "credentials")):
        done = subprocess.run(
            [sys.executable, "-m", "ivvae.cli", "encode-dataset", src, str(tmp_path / "out"),
             "--weights", str(tiny_weights), "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert says in done.stderr and "internal error" not in done.stderr, done.stderr


def test_a_glob_source_carries_the_sidecars_beside_its_clips(
        s3_server: S3Server, tiny_weights: Path) -> None:  # noqa: F811
    src = s3_server.make_bucket("globbed")
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{src}/a/c0.mp4", media.make_video(None, frames=5, width=16, height=16))
    fs.pipe_file(f"{src}/a/c0.txt", b"a caption")
    fs.pipe_file(f"{src}/a/other.txt", b"not a sidecar")
    out = s3_server.make_bucket("globbed-out") + "/v1"
    asyncio.run(encode_dataset(f"{src}/a/*.mp4", out, encoder=in_process(tiny_weights),
                               format="webdataset"))
    ds = LatentDataset(out)
    assert len(ds) == 1
    meta = ds[0][1]
    assert meta["source"] == "c0.mp4" and meta["sidecars"] == {".txt": b"a caption"}


def test_a_prefix_that_is_also_an_object_and_an_empty_object_are_named(
        s3_server: S3Server, tiny_weights: Path) -> None:  # noqa: F811
    from ivvae.dataset import collect

    src = s3_server.make_bucket("odd-keys")
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{src}/pfx", b"some text\n")  # an object with the folder's name
    fs.pipe_file(f"{src}/pfx/c0.mp4", media.make_video(None, frames=5, width=16, height=16))
    fs.pipe_file(f"{src}/pfx/empty.mp4", b"")
    assert [s.name for s in collect(f"{src}/pfx/")] == ["c0.mp4", "empty.mp4"]
    out = s3_server.make_bucket("odd-keys-out") + "/v1"
    summary = asyncio.run(encode_dataset(f"{src}/pfx/", out, encoder=in_process(tiny_weights)))
    assert (summary.encoded, summary.failed) == (1, 1)
    failed = [json.loads(line) for line in fs.cat_file(f"{out}/{MANIFEST_NAME}").splitlines()
              if json.loads(line)["status"] == "error"]
    assert f"{src}/pfx/empty.mp4" in failed[0]["detail"], failed  # not the temporary copy



def test_a_job_file_is_created_on_s3_only_where_none_is(s3_server: S3Server) -> None:  # noqa: F811
    # Two jobs racing into one new OUT (tests/test_dataset.py races them locally): the job
    # file is created with a conditional put (If-None-Match: *), which moto checks as S3
    # does, so the second creation fails instead of replacing the first.
    from ivvae.storage import Location, publish_bytes

    out = Location.of(s3_server.make_bucket("race") + "/out")
    path = out.join("job.json")
    publish_bytes(out, path, b"first", create=True)
    with pytest.raises(FileExistsError):
        publish_bytes(out, path, b"second", create=True)
    assert out.fs.cat_file(path) == b"first"
    publish_bytes(out, path, b"third")  # an ordinary publish replaces
    assert out.fs.cat_file(path) == b"third"


def test_compaction_on_s3_leaves_one_sample_per_clip_for_the_webdataset_package(
        s3_server: S3Server, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    import webdataset as wds

    from ivvae.compact import compact

    src, fs = three_clips(s3_server, "recut")
    out = src + "/out"
    spec = in_process(tiny_weights)
    asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    fs.pipe_file("recut/clip1.mp4", media.make_video(None, frames=9, width=16, height=16, fps=5))
    asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    before = {m["source"]: x.numpy().tobytes() for x, m in LatentDataset(out)}

    def plain_keys() -> list[str]:
        local = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        fs.invalidate_cache()
        fs.get(out.removeprefix("s3://") + "/shards/", str(local) + "/", recursive=True)
        shards = sorted(str(p) for p in local.rglob("*.tar"))
        return sorted(s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False))

    assert plain_keys() == ["clip0_mp4", "clip1_mp4", "clip1_mp4", "clip2_mp4"]
    result = compact(out)
    assert (result.shards_rewritten, result.samples_dropped) == (1, 1)
    assert plain_keys() == ["clip0_mp4", "clip1_mp4", "clip2_mp4"]
    assert {m["source"]: x.numpy().tobytes() for x, m in LatentDataset(out)} == before
    summary = asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    assert (summary.encoded, summary.skipped) == (0, 3)


def test_a_worker_refuses_an_s3_output_while_it_is_compacted(
        s3_server: S3Server, tiny_weights: Path) -> None:  # noqa: F811
    # S3 cannot lock: a worker beside a compaction would remove the new shards as orphans
    # before their record files are published.
    from ivvae.dataset import DatasetError

    src = s3_server.make_bucket("marked")
    fs = fsspec.filesystem("s3")
    fs.pipe_file("marked/clip0.mp4", media.make_video(None, frames=5, width=16, height=16))
    out = src + "/out"
    spec = in_process(tiny_weights)
    asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    fs.pipe_file("marked/out/.ivvae/compacting", b"")
    with pytest.raises(DatasetError, match="is being compacted"):
        asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    from ivvae.compact import compact

    compact(out)  # finishes (nothing to do) and takes its marker away
    assert not fs.exists("marked/out/.ivvae/compacting")
    summary = asyncio.run(encode_dataset(src + "/", out, encoder=spec, format="webdataset"))
    assert (summary.encoded, summary.skipped) == (0, 1)


def test_a_store_that_stops_answering_fails_a_call_in_bounded_time(
        s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # botocore's 60 s timeouts and its and s3fs's retries held encode-dataset about 7
    # minutes a call on a store that was stopped (SIGSTOP: it keeps its socket, answers
    # nothing), saying nothing. Here the bounds are shrunk to keep the test short.
    import os
    import signal
    import time

    import s3fs

    from ivvae import storage

    bucket = s3_server.make_bucket("stops-answering")
    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_RETRIES", 2)
    s3fs.S3FileSystem.clear_instance_cache()
    loc = storage.Location.of(bucket)
    assert loc.fs.retries == 2
    os.kill(s3_server.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(storage.storage_errors()):
            loc.fs.ls(loc.path, refresh=True)
        assert time.monotonic() - start < 20  # 2 tries of 1 s, and the backoff
    finally:
        os.kill(s3_server.pid, signal.SIGCONT)
        s3fs.S3FileSystem.clear_instance_cache()
    assert loc.fs.ls(loc.path, refresh=True) == []  # and it answers again


def test_the_user_s_own_s3_configuration_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae import storage

    assert storage._s3_options()["config_kwargs"]["read_timeout"] == storage.S3_READ_TIMEOUT_S
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert "retries" not in storage._s3_options()["config_kwargs"]
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 300}})
    assert storage._s3_options() == {}


def test_a_store_that_stops_answering_mid_run_gives_the_run_up(
        s3_server: S3Server, bucket_clips: tuple[str, dict[str, bytes]],  # noqa: F811
        tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # Each clip failed after the whole bounded wait, one by one, for as long as the job
    # lasted (at a million clips, days), recorded as the clip's io_error.
    import os
    import signal

    import s3fs

    from ivvae import storage
    from ivvae.dataset import DatasetError, Job, Summary, run_job
    from ivvae.dataset.encoders import LocalEncoder

    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_RETRIES", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    src, _ = bucket_clips

    calls = []

    class StopsTheStoreAfterOneClip(LocalEncoder):
        async def encode(self, source: Any, options: ClipOptions, name: str) -> Any:
            calls.append(name)
            if len(calls) == 2:  # the second clip read, not yet checked against its listing
                os.kill(s3_server.pid, signal.SIGSTOP)  # keeps its socket, answers nothing
            return await super().encode(source, options, name)

    out, summary = tmp_path / "out", Summary()
    encoder = StopsTheStoreAfterOneClip(in_process(tiny_weights).build().service.settings)
    try:
        with pytest.raises(DatasetError, match="its store does not answer a check either"):
            asyncio.run(run_job(Job(src + "/", str(out), concurrency=1), encoder,
                                summary=summary))
    finally:
        os.kill(s3_server.pid, signal.SIGCONT)
        s3fs.S3FileSystem.clear_instance_cache()
    # the clip encoded before is kept; the run did not go on failing clip after clip
    assert (summary.encoded, summary.failed) == (1, 0) and summary.interrupted
    assert len(list(out.rglob("*.latent.safetensors"))) == 1


def test_an_object_overwritten_while_read_is_retried(
        s3_server: S3Server, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    # The listing's ETag went into the record with the other bytes' latent: every rerun
    # skipped the clip, also once the object was back as listed.
    from ivvae.dataset import Job, Summary, run_job
    from ivvae.dataset.encoders import LocalEncoder

    src = s3_server.make_bucket("overwritten-mid-read")
    fs = fsspec.filesystem("s3")
    one, two = (media.make_video(None, frames=5, width=16, height=16, fps=f) for f in (9, 11))
    fs.pipe_file("overwritten-mid-read/one.mp4", one)
    fs.pipe_file("overwritten-mid-read/two.mp4", two)

    class OverwritesAfterItsRead(LocalEncoder):
        async def encode(self, source: Any, options: ClipOptions, name: str) -> Any:
            if name == "one.mp4":
                fs.pipe_file("overwritten-mid-read/one.mp4", two)
            return await super().encode(source, options, name)

    out, summary = tmp_path / "out", Summary()
    encoder = OverwritesAfterItsRead(in_process(tiny_weights).build().service.settings)
    asyncio.run(run_job(Job(src + "/", str(out), format="parquet"), encoder, summary=summary))
    assert (summary.encoded, summary.errors) == (1, {"source_changed": 1})
    fs.pipe_file("overwritten-mid-read/one.mp4", one)  # back as listed: the same ETag
    again = asyncio.run(encode_dataset(src + "/", str(out), encoder=in_process(tiny_weights),
                                       format="parquet"))
    assert (again.skipped, again.encoded) == (1, 1)
    alone = encode_alone(tiny_weights, {"one.mp4": one}, "float32")
    ds = LatentDataset(str(out))
    got = {meta["source"]: latent.numpy().tobytes() for latent, meta in
           (ds[i] for i in range(len(ds)))}
    assert got["one.mp4"] == alone["one.mp4"]


def test_share_listings_on_s3(s3_server: S3Server) -> None:  # noqa: F811
    # Each worker's share, read back as one; a run with another worker count replaces them.
    from ivvae.dataset.state import Listing, _shares, publish_share
    from ivvae.storage import Location

    out = Location.of(s3_server.make_bucket("shares") + "/out")
    publish_share(out, Listing("w00000of00002", (("a.mp4", "etag:1", "k1"),)), 2)
    publish_share(out, Listing("w00001of00002", (("b.mp4", "etag:2", "k2"),)), 2)
    seen: dict[str, Any] = {}
    assert _shares(out, 2, seen) == ({0, 1}, {"a.mp4": ("etag:1", "k1"),
                                              "b.mp4": ("etag:2", "k2")})
    publish_share(out, Listing("w00001of00002", (("b.mp4", "etag:3", "k3"),)), 2)
    assert _shares(out, 2, seen)[1]["b.mp4"] == ("etag:3", "k3")  # read again: it changed
    publish_share(out, Listing("w00000of00003", (("a.mp4", "etag:4", "k4"),)), 3)
    assert _shares(out, 2, {}) == (set(), {})
    assert _shares(out, 3, {}) == ({0}, {"a.mp4": ("etag:4", "k4")})
    publish_share(out, Listing("w00000of00001", (("a.mp4", "etag:5", "k5"),)), 1)
    out.fs.invalidate_cache()
    assert not out.fs.exists(out.join(".ivvae", "listings", "w00000of00003.jsonl"))


def test_windows_of_one_object_fetch_it_once(s3_server: S3Server, tiny_weights: Path,  # noqa: F811
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The captioned spans of one long video (--option-column): every window downloaded the
    # whole object again. Each latent is still that window alone.
    import os
    import tempfile

    import s3fs

    from ivvae.dataset import Columns
    from ivvae.dataset.clips import SPOOL_PREFIX

    src = s3_server.make_bucket("spans")
    fs = fsspec.filesystem("s3")
    long = media.make_video(None, frames=30, width=16, height=16, fps=10)
    fs.pipe_file("spans/v/long.mp4", long)
    fs.pipe_file("spans/v/other.mp4", media.make_video(None, frames=5, width=16, height=16))
    rows = [{"path": "v/long.mp4", "caption": f"span {i}", "start_s": i, "num_frames": 5}
            for i in range(3)] + [{"path": "v/other.mp4", "caption": "whole"}]
    fs.pipe_file("spans/spans.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "long.mp4").write_bytes(long)
    fs.get_file("spans/v/other.mp4", str(tmp_path / "v" / "other.mp4"))
    (tmp_path / "spans.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    fetched: list[str] = []
    real = s3fs.S3FileSystem._get_file

    async def counted(self: Any, rpath: str, lpath: str, **kw: Any) -> Any:
        fetched.append(rpath)
        return await real(self, rpath, lpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counted)
    # An instance made earlier (fsspec keeps them) bound its sync get_file to the old one.
    s3fs.S3FileSystem.clear_instance_cache()
    by = Columns(options=Columns.parse_options(["start_s", "num_frames"]))
    spec = in_process(tiny_weights)
    remote = asyncio.run(encode_dataset(f"{src}/spans.jsonl", tmp_path / "remote",
                                        encoder=spec, format="webdataset", columns=by,
                                        concurrency=3))
    assert (remote.encoded, remote.failed) == (4, 0)
    assert sorted(fetched) == ["spans/v/long.mp4", "spans/v/other.mp4"]
    assert not [f for f in os.listdir(tempfile.gettempdir())
                if f.startswith(f"{SPOOL_PREFIX}{os.getpid()}-")]
    local = asyncio.run(encode_dataset(tmp_path / "spans.jsonl", tmp_path / "local",
                                       encoder=spec, format="webdataset", columns=by))
    assert local.encoded == 4

    def read(out: Path) -> dict[str, tuple[bytes, bytes]]:
        return {meta["source"]: (latent.numpy().tobytes(), meta["sidecars"][".txt"])
                for latent, meta in LatentDataset(str(out))}

    assert read(tmp_path / "remote") == read(tmp_path / "local")


@pytest.mark.parametrize("status", [403, 503])
def test_an_https_source_that_answers_an_error_fails_alone(tiny_weights: Path,  # noqa: F811
                                                           tmp_path: Path, status: int) -> None:
    # fsspec's HTTP filesystem raises the status as aiohttp's ClientResponseError, no
    # OSError: the whole run stopped as "internal error", every clip left pending.
    import http.server

    served = tmp_path / "www"
    served.mkdir()
    for name in ("ok.mp4", "broken.mp4"):
        media.make_video(served / name, frames=5, width=16, height=16)

    class Failing(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/broken.mp4" and "Range" not in self.headers:
                self.send_error(status)
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    with http_folder(served, Failing) as base:
        listing = tmp_path / "list.txt"
        listing.write_text(f"{base}/ok.mp4\n{base}/broken.mp4\n")
        out = tmp_path / "out"
        summary = asyncio.run(encode_dataset(listing, out, encoder=in_process(tiny_weights)))
        assert (summary.encoded, summary.failed, summary.errors) == (1, 1, {"io_error": 1})
        lines = {json.loads(x)["source"]: json.loads(x)
                 for x in (out / MANIFEST_NAME).read_text().splitlines()}
        assert lines[f"{base}/broken.mp4"]["status"] == "error"
        assert str(status) in lines[f"{base}/broken.mp4"]["detail"]
