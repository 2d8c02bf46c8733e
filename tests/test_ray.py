"""``ivvae.ray``: the dataset job on a local 2-CPU Ray instance (one per module: Ray takes
a while to start) gives the same latents, manifest and resume as the plain path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivvae.dataset import MANIFEST_NAME, EncoderSpec, Job, encode_dataset
from tests.service_fixtures import tiny_weights  # noqa: F401
from tests.test_dataset import latents, make_clips, shard_samples

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_equals_plain_and_resumes(local_ray: None, tiny_weights: Path,  # noqa: F811
                                      tmp_path: Path) -> None:
    from ivvae.ray import run_on_ray

    src = make_clips(tmp_path / "src", count=6)
    spec = EncoderSpec(weights=str(tiny_weights), torch_threads=1)
    asyncio.run(encode_dataset(src, tmp_path / "plain", encoder=spec, format="webdataset",
                               shard_clips=2))

    job = Job(str(src), str(tmp_path / "ray"), format="webdataset", shard_clips=2)
    summary = run_on_ray(job, spec, workers=2)
    assert (summary.total, summary.encoded, summary.failed) == (6, 6, 0)
    assert latents(tmp_path / "ray") == latents(tmp_path / "plain")
    assert set(shard_samples(tmp_path / "ray").values()) == {1}
    lines = (tmp_path / "ray" / MANIFEST_NAME).read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["status"] == "ok" for x in lines)

    (src / "a" / "clip01.mp4").write_bytes((src / "a" / "clip03.mp4").read_bytes())
    again = run_on_ray(job, spec, workers=1)
    assert (again.encoded, again.skipped) == (1, 5)
    assert latents(tmp_path / "ray")["a/clip01.mp4"] == latents(tmp_path / "plain")[
        "a/clip03.mp4"]


@pytest.mark.slow
def test_cli_engine_ray(local_ray: None, tiny_weights: Path, tmp_path: Path,  # noqa: F811
                        capsys: pytest.CaptureFixture[str]) -> None:
    from ivvae.cli import main
    from ivvae.data import LatentDataset

    # A table of clips and captions: the captions travel through Ray's rows, and the clip
    # keys they enter are the plan's (a rerun skips every clip).
    src = make_clips(tmp_path / "src", count=2)
    (src / "clips.csv").write_text("media_path,caption\nb/clip00.mp4,zero\na/clip01.mp4,one\n")
    args = ["encode-dataset", str(src / "clips.csv"), str(tmp_path / "out"), "--engine", "ray",
            "--weights", str(tiny_weights), "--format", "parquet", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["total"], summary["encoded"]) == (2, 2)
    assert summary["manifest"].endswith(str(tmp_path / "out" / "manifest.jsonl"))
    captions = {meta["source"]: meta["sidecars"][".txt"]
                for _, meta in LatentDataset(str(tmp_path / "out"))}
    assert captions == {"b/clip00.mp4": b"zero", "a/clip01.mp4": b"one"}
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["encoded"], again["skipped"]) == (0, 2)


@pytest.mark.slow
def test_a_run_an_actor_gives_up_ends_as_given_up(local_ray: None,
                                                  tiny_weights: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    # Ray handed the driver the actor's DatasetError as text in a UserCodeException: the
    # CLI said "internal error" and exited 1 ("some clips failed", none had).
    from ivvae.dataset import DatasetError
    from ivvae.errors import BackendUnavailable
    from ivvae.ray import run_on_ray
    from tests.grpc_fixtures import server_thread
    from tests.service_fixtures import tiny_settings

    with server_thread(tiny_settings(tiny_weights)) as server:
        async def down(*args: object, **kw: object) -> None:
            raise BackendUnavailable("the backend went away (test)")

        server.service.pipeline.encode = down  # type: ignore[method-assign]
        job = Job(str(make_clips(tmp_path / "src", count=2)), str(tmp_path / "out"))
        with pytest.raises(DatasetError, match="unavailable: the backend went away"):
            run_on_ray(job, EncoderSpec(server=server.grpc_url, retries=0), workers=1)


@pytest.mark.slow
def test_an_interrupted_run_stops_its_actors_before_it_writes_the_manifest(
        local_ray: None, tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    # The driver wrote the manifest on Ctrl-C or SIGTERM while the pool's actors went on
    # publishing the batches they held: the manifest and the summary ("encoded": only the
    # batches whose rows had come back) missed clips that were done.
    import _thread
    import threading
    import time

    from ivvae.dataset import Summary
    from ivvae.dataset.state import load_state
    from ivvae.ray import run_on_ray
    from ivvae.storage import Location
    from tests.grpc_fixtures import server_thread
    from tests.service_fixtures import tiny_settings
    from tests.test_dataset import manifest

    with server_thread(tiny_settings(tiny_weights)) as server:
        real = server.service.pipeline.encode

        async def slow(*args: object, **kw: object) -> object:
            await asyncio.sleep(1.0)
            return await real(*args, **kw)

        server.service.pipeline.encode = slow  # type: ignore[method-assign]
        out = tmp_path / "out"
        job = Job(str(make_clips(tmp_path / "src", count=8)), str(out), format="webdataset",
                  shard_clips=1, concurrency=1)
        summary = Summary()

        def interrupt_after_the_first_clip() -> None:
            while summary.encoded < 1:
                time.sleep(0.05)
            _thread.interrupt_main()

        threading.Thread(target=interrupt_after_the_first_clip, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_on_ray(job, EncoderSpec(server=server.grpc_url), workers=2, summary=summary)
        time.sleep(5)  # what an actor that was not stopped publishes meanwhile
    state = load_state(Location.of(str(out)), "webdataset")
    done = {name for name, records in state.records.items()
            if any(r["status"] == "ok" for r in records)}
    assert 1 <= len(done) < 8
    assert {r["source"] for r in manifest(out) if r["status"] == "ok"} == done
    assert summary.encoded == len(done)


def test_a_recount_counts_this_run_s_record_files_whatever_the_clocks() -> None:
    # It kept the failures recorded after the driver's start time: an actor whose clock
    # was behind had its failure taken for an earlier run's and the count went to 0.
    import os
    import tempfile

    from ivvae.dataset import ClipOptions, Source, Summary
    from ivvae.dataset.job import PARTS_DIR, JobConfig, ModelIdentity, jsonl
    from ivvae.dataset.parts import error_record
    from ivvae.dataset.run import Plan
    from ivvae.dataset.sources import clip_key
    from ivvae.dataset.state import Listing
    from ivvae.ray import _recount
    from ivvae.storage import Location

    folder = tempfile.mkdtemp()
    out = Location.of(folder)
    config = JobConfig("webdataset", ClipOptions(), ModelIdentity("m", "0" * 64, "float32"))
    a, b = (Source(n, f"file:///{n}", "sha256:1", n) for n in ("a.mp4", "b.mp4"))
    earlier = {**error_record(a, clip_key(a, config), "decode_error", "old"), "at": 1.0}
    now = {**error_record(a, clip_key(a, config), "decode_error", "bad"), "at": 2.0}
    os.makedirs(os.path.join(folder, PARTS_DIR))
    for part, records in (("w-old-00000", [earlier]), ("w-new-00000", [now])):
        with open(os.path.join(folder, PARTS_DIR, part + ".jsonl"), "wb") as f:
            f.write(jsonl(records))
    plan = Plan(out, config, Listing.of([a, b], config, "w"), [a, b], [a, b],
                frozenset({"w-old-00000"}))
    summary = Summary()
    _recount(plan, summary)
    assert (summary.encoded, summary.failed, summary.errors) == (0, 1, {"decode_error": 1})
    assert summary.parts == 1
