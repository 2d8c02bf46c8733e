"""One worker's run of a job: plan it (list, open the output, clean up after killed runs),
encode its clips concurrently into parts, and write the manifest however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..media_types import MEDIA_SUFFIXES
from ..storage import (
    Location,
    storage_errors,
)
from .clips import Copies, encode_clip
from .encoders import ClipEncoder, Encoded, EncoderSpec, ServiceEncoder
from .job import (
    COMPACTING_NAME,
    FORMATS,
    SHARD_CLIPS,
    SHARD_MB,
    STATE_DIR,
    ClipOptions,
    DatasetError,
    Format,
    JobConfig,
    ModelIdentity,
)
from .parts import PartWriter
from .sources import Columns, Source, check_unique, collect, with_row_options
from .state import (
    Listing,
    load_state,
    open_output,
    output_locks,
    publish_share,
    remove_orphans,
    write_manifest,
)

if TYPE_CHECKING:
    from ..client import RetryPolicy


@dataclass
class Summary:
    total: int = 0  # clips of this worker
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    parts: int = 0
    output: str = ""
    manifest: str = ""  # OUT/manifest.jsonl once written; empty when it could not be
    interrupted: bool = False

    @property
    def clips_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "encoded": self.encoded, "skipped": self.skipped,
                "failed": self.failed, "frames": self.frames, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "clips_per_s": round(self.clips_per_s, 3),
                "frames_per_s": round(self.frames / self.seconds, 3) if self.seconds else 0.0,
                "bytes_per_clip": round(self.bytes / self.encoded) if self.encoded else 0,
                "errors": self.errors, "parts": self.parts, "output": self.output,
                "manifest": self.manifest or None, "interrupted": self.interrupted}

    def count(self, record: dict[str, Any]) -> None:
        if record["status"] == "ok":
            self.encoded += 1
            self.frames += int(record.get("frames", 0))
            self.bytes += int(record.get("bytes", 0))
        else:
            self.failed += 1
            self.errors[record["error"]] = self.errors.get(record["error"], 0) + 1


@dataclass(frozen=True)
class Job:
    """One worker's share of a dataset job."""

    src: str
    out: str
    format: Format = "files"
    options: ClipOptions = field(default_factory=ClipOptions)
    shard: tuple[int, int] = (0, 1)
    concurrency: int = 4
    shard_clips: int = SHARD_CLIPS
    shard_bytes: int = int(SHARD_MB * 2**20)
    row_group_clips: int = 64
    new_version: bool = False
    columns: Columns = field(default_factory=Columns)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DatasetError(f"--format must be one of {', '.join(FORMATS)}")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise DatasetError(f"--shard {i}/{n}: need 0 <= i < N")
        if self.concurrency < 1:
            raise DatasetError("concurrency must be at least 1")
        if self.shard_clips < 1 or self.shard_bytes < 1:
            raise DatasetError("shard sizes must be positive")

    @property
    def prefix(self) -> str:
        i, n = self.shard
        return f"w{i:05d}of{n:05d}"


@dataclass
class Plan:
    """What a worker will do: its output, key, all clips of the job (as it listed them),
    and its own to do."""

    out: Location
    config: JobConfig
    listing: Listing
    mine: list[Source]
    todo: list[Source]
    parts: frozenset[str] = frozenset()  # the record files published before this run


def plan(job: Job, model: ModelIdentity, held: contextlib.ExitStack) -> Plan:
    """List the sources, open (or refuse) the output, take its lock (held until ``held``
    closes), clean up after killed runs."""
    try:
        return _plan(job, model, held)
    except storage_errors() as exc:  # no such bucket, no access, no credentials, no driver
        raise DatasetError(f"cannot open the job's source or output: {exc}") from exc


def _plan(job: Job, model: ModelIdentity, held: contextlib.ExitStack) -> Plan:
    config = JobConfig(job.format, job.options, model)
    sources = collect(job.src, columns=job.columns)
    if not sources:
        raise DatasetError(f"{job.src} holds no video or image files (suffixes: "
                           f"{', '.join(sorted(MEDIA_SUFFIXES))})")
    if job.format != "files":
        check_unique(sources, ("sample_key",))
    for s in sources:  # a contradiction is the whole job's mistake: before any work
        if s.options:
            try:
                with_row_options(job.options.preprocess, s.options)
            except DatasetError as exc:
                raise DatasetError(f"{s.name}: {exc}") from None
    out = open_output(job.out, config, new_version=job.new_version)
    # Before the clean-up: a second run of the same worker must not remove the first
    # one's temporaries and unrecorded shards while it writes them.
    held.enter_context(output_locks(out, job.prefix))
    if not out.local and out.fs.exists(out.join(STATE_DIR, COMPACTING_NAME)):
        # Object stores cannot lock: the compaction's marker is what keeps a worker from
        # removing its new shards as orphans before their records are published.
        raise DatasetError(f"{out.url()} is being compacted, or a compaction of it was "
                           "killed: wait for it, or run ivvae compact-dataset on it again "
                           "to finish")
    i, n = job.shard
    mine = [s for s in sources if s.worker(n) == i]
    listing = Listing.of(sources, config, job.prefix)
    keys = {name: key for name, _, key in listing.clips}
    own = {s.name for s in mine}
    publish_share(out, Listing(job.prefix, tuple(c for c in listing.clips if c[0] in own)), n)
    state = load_state(out, job.format)
    if state.replaced:
        # A compaction stopped before its manifest: name its new parts before the shards
        # they replace are removed as orphans, so readers never meet a missing shard.
        write_manifest(out, listing, n, config)
    remove_orphans(out, job.format, state, None if n == 1 else job.prefix)
    todo = [s for s in mine if state.done(s, keys[s.name]) is None]
    return Plan(out, config, listing, mine, todo, frozenset(state.files))


class Progress:
    """A tqdm bar: clips done / total, clips/s, ETA; frames/s and failures as postfix."""

    def __init__(self, total: int, enabled: bool, summary: Summary) -> None:
        from tqdm import tqdm

        self.summary = summary
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc="encode-dataset", unit="clip", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)

    def advance(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(frames_s=f"{self.summary.frames / elapsed:.1f}",
                             failed=self.summary.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def run_job(job: Job, encoder: ClipEncoder, *, progress: bool = False,
                  summary: Summary | None = None) -> Summary:
    """Run ``job`` with ``encoder`` (see the module docstring); ``summary`` is filled in as
    it goes, so a caller that is interrupted still has the counts."""
    summary = summary if summary is not None else Summary()
    try:
        model = await encoder.start(job.options.model)
        with contextlib.ExitStack() as held:
            p = await asyncio.to_thread(plan, job, model, held)
            summary.total, summary.skipped = len(p.mine), len(p.mine) - len(p.todo)
            summary.output = p.out.url()
            writer = PartWriter(p.out, job.format, job.prefix, shard_clips=job.shard_clips,
                                shard_bytes=job.shard_bytes,
                                row_group_clips=job.row_group_clips)
            bar = Progress(len(p.todo), progress, summary)
            start = time.perf_counter()
            finished = False
            try:
                await _encode_all(p, job, encoder, writer, summary, bar)
                if await asyncio.to_thread(writer.publish):
                    summary.parts += 1
                finished = True
            except BaseException:
                summary.interrupted = True
                # What is staged is whole: publish it, so a Ctrl-C keeps finished work.
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(writer.publish))
                raise
            finally:
                writer.abandon()
                summary.seconds = time.perf_counter() - start
                bar.close()
                # A run that ends well and cannot write its manifest has failed (exit 2:
                # run it again); one that is already failing reports its own failure.
                with contextlib.suppress(*(() if finished else (Exception,))):
                    summary.manifest = await asyncio.shield(asyncio.to_thread(
                        write_manifest, p.out, p.listing, job.shard[1], p.config))
    finally:
        await encoder.close()
    return summary


async def _encode_all(p: Plan, job: Job, encoder: ClipEncoder, writer: PartWriter,
                      summary: Summary, bar: Progress) -> None:
    queue: asyncio.Queue[Source] = asyncio.Queue()
    for s in p.todo:
        queue.put_nowait(s)
    copies = Copies(p.todo)
    lock = asyncio.Lock()
    settling: set[asyncio.Future[None]] = set()

    async def settle(source: Source, record: dict[str, Any], encoded: Encoded | None,
                     extra: dict[str, bytes]) -> None:
        if encoded is None:
            writer.add_error(record)
        else:
            await asyncio.to_thread(writer.add, source, record, encoded, extra)
        summary.count(record)
        if writer.full:
            await asyncio.to_thread(writer.publish)
            summary.parts += 1

    async def worker() -> None:
        while not queue.empty():
            source = queue.get_nowait()
            record, encoded, extra = await encode_clip(encoder, source, p.config, copies)
            async with lock:
                # To its end even when the run is given up or interrupted meanwhile: the
                # caller then publishes the writer, which must not hold half a clip (a
                # cancelled await leaves its thread running).
                done = asyncio.ensure_future(settle(source, record, encoded, extra))
                settling.add(done)
                done.add_done_callback(settling.discard)
                await asyncio.shield(done)
            bar.advance()

    workers = [asyncio.create_task(worker())
               for _ in range(min(job.concurrency, len(p.todo)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        copies.close()
        if settling:
            ended, _ = await asyncio.wait(set(settling))
            for done in ended:  # the caller publishes again; nobody else is left to ask
                if not done.cancelled():
                    done.exception()


async def encode_dataset(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                         server: str = "", encoder: EncoderSpec | None = None,
                         progress: bool = False, retry: RetryPolicy | None = None,
                         **job: Any) -> Summary:
    """Encode ``src`` into ``out``: ``Job`` fields as keywords; through ``server`` when
    given, else with ``encoder`` (default: the bundled model in this process)."""
    spec = encoder or EncoderSpec()
    if server:
        spec = replace(spec, server=server,
                       retries=(retry.attempts - 1) if retry is not None else spec.retries)
    built = spec.build()
    if retry is not None and isinstance(built, ServiceEncoder):
        built.client.retry = retry
    return await run_job(Job(str(src), str(out), **job), built, progress=progress)
