"""``encode-dataset`` on a Ray cluster (Ray Data): ``pip install 'ivvae[ray]'``.

The same job as ``ivvae.dataset`` (same listing, job key, parts, manifest and resume), with
the clips spread over an actor pool. The pieces, for a pipeline of your own:

* ``source_dataset(sources)``: the clips as a Ray dataset, one row per clip;
* ``EncodeClips``: a ``map_batches``-ready callable class that encodes a batch of those rows
  with the in-process model on the actor's GPU or CPU, or by calling an ivvae service
  (``EncoderSpec``); with ``out`` set it also publishes each batch as one part (a shard, or
  latent files) and returns only the manifest records;
* ``write_part(out, job, encoded)``: the shard writer it uses.

``run_on_ray`` drives a whole job, as ``ivvae encode-dataset --engine ray --address ...``:

    ds = source_dataset(plan.todo).map_batches(
        EncodeClips, fn_constructor_kwargs={"spec": spec, "config": plan.config, "out": url},
        batch_size=job.shard_clips, compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1)

Only this module imports ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from .dataset.clips import Copies, encode_clip
from .dataset.encoders import Encoded, EncoderSpec
from .dataset.job import DatasetError, JobConfig
from .dataset.parts import PartWriter
from .dataset.run import Job, Plan, Summary, plan
from .dataset.sources import Source
from .dataset.state import load_state, write_manifest
from .storage import Location


def source_dataset(sources: Sequence[Source]) -> ray.data.Dataset:
    """One row per clip (``Source.as_row``: its name, url, identity, output, sidecars and
    the sidecars its list gave)."""
    return ray.data.from_items([s.as_row() for s in sources])


def _sources(batch: dict[str, np.ndarray]) -> list[Source]:
    return [Source.from_row({k: v[i] for k, v in batch.items()})
            for i in range(len(batch["name"]))]


def write_part(out: Location, job: Job, prefix: str,
               encoded: Sequence[tuple[Source, dict[str, Any], Encoded | None,
                                       dict[str, bytes]]]) -> list[dict[str, Any]]:
    """Publish finished clips as parts of ``job`` (one when they fit); their records."""
    writer = PartWriter(out, job.format, prefix, shard_clips=job.shard_clips,
                        shard_bytes=job.shard_bytes, row_group_clips=job.row_group_clips)
    records: list[dict[str, Any]] = []
    try:
        for source, record, result, sidecars in encoded:
            if result is None:
                writer.add_error(record)
            else:
                writer.add(source, record, result, sidecars)
            if writer.full:
                records += writer.publish()
        records += writer.publish()
    finally:
        writer.abandon()
    return records


class EncodeClips:
    """Encodes batches of ``source_dataset`` rows (see the module docstring).

    Output columns: ``record`` (the manifest record, JSON) and, without ``out``,
    ``latent`` (the latent file's bytes; empty for a failed clip).
    """

    def __init__(self, spec: EncoderSpec, config: JobConfig, job: Job | None = None,
                 out: str = "", prefix: str = "ray", concurrency: int = 2) -> None:
        self.loop = asyncio.new_event_loop()
        self.encoder = spec.build()
        model = self.loop.run_until_complete(self.encoder.start(config.options.model))
        if model.weights_sha256 != config.model.weights_sha256:
            raise RuntimeError(f"this worker's model {model.name} (weights "
                               f"{model.weights_sha256[:12]}) is not the job's "
                               f"{config.model.name} ({config.model.weights_sha256[:12]})")
        self.config, self.job, self.prefix = config, job, prefix
        self.out = Location.of(out) if out else None
        self.slots = asyncio.Semaphore(concurrency)

    async def _one(self, source: Source, copies: Copies
                   ) -> tuple[Source, dict[str, Any], Encoded | None, dict[str, bytes]]:
        async with self.slots:
            record, encoded, sidecars = await encode_clip(self.encoder, source, self.config,
                                                          copies)
        return source, record, encoded, sidecars

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        async def run() -> list[Any]:
            sources = _sources(batch)
            copies = Copies(sources)
            try:
                return await asyncio.gather(*(self._one(s, copies) for s in sources))
            finally:
                copies.close()

        done = self.loop.run_until_complete(run())
        if self.out is not None:
            assert self.job is not None
            records = write_part(self.out, self.job, self.prefix, done)
            return {"record": np.array([json.dumps(r) for r in records], dtype=object)}
        return {"record": np.array([json.dumps(r) for _, r, _, _ in done], dtype=object),
                "latent": np.array([e.data if e else b"" for _, _, e, _ in done],
                                   dtype=object)}

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.encoder.close())
            self.loop.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def _given_up(exc: BaseException) -> str | None:
    """The message of the ``DatasetError`` an actor gave the run up with (the service gone,
    a store that does not answer), if ``exc`` is Ray's report of one. Ray hands the driver
    the actor's traceback as text in a ``UserCodeException``, not the exception."""
    found = re.findall(r"(?m)^\S*DatasetError: (.+)$", str(exc))
    return found[-1] if found else None


def run_on_ray(job: Job, spec: EncoderSpec, *, address: str | None = "auto",
               workers: int = 1, cpus_per_worker: float = 1.0,
               gpus_per_worker: float = 0.0, summary: Summary | None = None) -> Summary:
    """Run ``job`` on the Ray cluster at ``address`` (``"local"``: start one on this
    machine), or on the one this process already joined. ``summary`` is filled as clips
    finish, so an interrupted run still says what it did."""
    if not (workers >= 1 and 0 < cpus_per_worker < math.inf and 0 <= gpus_per_worker < math.inf):
        raise DatasetError(f"--workers must be at least 1 (got {workers}), --cpus-per-worker "
                           f"above 0 (got {cpus_per_worker:g}), --gpus-per-worker at least 0 "
                           f"(got {gpus_per_worker:g})")
    if not ray.is_initialized():
        # ray.init makes SIGTERM exit at once (sys.exit(15)); the command's own handler
        # (an interrupt: the summary, then exit 130) is put back.
        before = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=None if address == "local" else address)
        except ConnectionError as exc:
            raise DatasetError(f"no Ray cluster at {address!r}: {exc}") from exc
        finally:
            if threading.current_thread() is threading.main_thread() and before is not None:
                signal.signal(signal.SIGTERM, before)
    summary = Summary() if summary is None else summary
    # The driver loads the model only to learn its identity (the job key): on its CPU.
    probe = replace(spec, device="cpu") if not spec.server else spec

    async def identify() -> Any:
        encoder = probe.build()
        try:
            return await encoder.start(job.options.model)
        finally:
            await encoder.close()

    with contextlib.ExitStack() as held:
        p = plan(job, asyncio.run(identify()), held)
        summary.total, summary.skipped = len(p.mine), len(p.mine) - len(p.todo)
        summary.output = p.out.url()
        start = time.perf_counter()
        try:
            if p.todo:
                ds = source_dataset(p.todo).map_batches(
                    EncodeClips, batch_size=min(job.shard_clips, 256),
                    fn_constructor_kwargs={"spec": spec, "config": p.config, "job": job,
                                           "out": p.out.url(), "prefix": job.prefix,
                                           "concurrency": job.concurrency},
                    compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                    num_gpus=gpus_per_worker or None, batch_format="numpy")
                parts: set[str] = set()
                try:
                    for row in ds.iter_rows():
                        record = json.loads(row["record"])
                        summary.count(record)
                        parts.add(str(record.get("part")))
                        summary.parts = len(parts)
                except Exception as exc:
                    given_up = _given_up(exc)
                    if given_up is None:
                        raise
                    raise DatasetError(given_up) from exc
        except BaseException:
            # Interrupted or given up: the rows of the batches the actors held never came
            # back, though the actors may have published them before they were stopped.
            with contextlib.suppress(Exception):
                _recount(p, summary)
            raise
        finally:
            summary.seconds = time.perf_counter() - start
            summary.manifest = write_manifest(p.out, p.listing, job.shard[1], p.config)
    return summary


def _recount(p: Plan, summary: Summary) -> None:
    """Count into ``summary`` what the run published, from the record files it wrote
    (those not there at its start): a clip's latest record in them, for each of its
    clips (Ray may have run a batch twice)."""
    state = load_state(p.out, p.config.format)
    todo = {s.name for s in p.todo}
    latest: dict[str, tuple[str, dict[str, Any]]] = {}
    for part, records in state.files.items():
        if part in p.parts:
            continue
        for record in records:
            name, earlier = record["source"], latest.get(record["source"])
            if name in todo and (earlier is None
                                 or record.get("at", 0) >= earlier[1].get("at", 0)):
                latest[name] = (part, record)
    counted = Summary()
    for _, record in latest.values():
        counted.count(record)
    summary.encoded, summary.failed = counted.encoded, counted.failed
    summary.frames, summary.bytes, summary.errors = counted.frames, counted.bytes, counted.errors
    summary.parts = len({part for part, _ in latest.values()})
