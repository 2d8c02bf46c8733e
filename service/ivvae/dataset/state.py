"""What earlier runs left in OUT and who may write there: the published records
(``State``), orphans of killed runs, each worker's listing of its share, the manifest, the
job file and the locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..storage import (
    TMP_MARK,
    Location,
    file_identity,
    modified_time,
    publish_bytes,
)
from .job import (
    COMPACT_PREFIX,
    JOB_NAME,
    LATENT_SUFFIX,
    LISTINGS_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    PARTS_DIR,
    REPLACES,
    SHARDS_DIR,
    STATE_DIR,
    VERSIONS_DIR,
    DatasetError,
    Format,
    JobConfig,
    differences,
    jsonl,
)
from .sources import Source, clip_key, worker_of

if TYPE_CHECKING:
    pass


@dataclass
class State:
    """What earlier runs published: every record, and which outputs exist."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)  # parts named by records
    # Each record file's records, by part name; and the parts a compaction replaced (their
    # record files are read as empty, so their shards are orphans: ``ivvae.compact``).
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    # Outputs present, relative to OUT, with their file identity (``file_identity``).
    outputs: dict[str, str] = field(default_factory=dict)
    # The sha256 of an output file, read when its identity cannot tell (files format).
    read_sha256: Callable[[str], str] | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.records.setdefault(record["source"], []).append(record)
        if record.get("part"):
            self.referenced.add(record["part"])

    def done(self, source: Source, key: str) -> dict[str, Any] | None:
        return self.done_named(source.name, key)

    def done_named(self, name: str, key: str) -> dict[str, Any] | None:
        """The record of the published output of clip ``name`` at ``key``, if any."""
        best = None
        for r in self.records.get(name, ()):
            if (r["status"] == "ok" and r["key"] == key and r.get("part") in self.outputs
                    and self._holds(r) and (best is None or r.get("at", 0) > best.get("at", 0))):
                best = r
        return best

    def _holds(self, record: dict[str, Any]) -> bool:
        """Whether the output still is the file ``record`` published. A latent file is
        rewritten in place when its clip changes: after a change and a change back (or a
        run killed between the file and its record), an older record matches the clip's
        key again while the file holds another latent. Shards are never rewritten."""
        if self.read_sha256 is None:
            return True
        written = record.get("file")
        if written and not written.startswith("size:"):
            return self.outputs[record["part"]] == written
        # A record of an older version, or a store that lists only sizes: read the file.
        return bool(self.read_sha256(record["part"]) == record.get("latent_sha256"))

    def line(self, source: Source, key: str) -> dict[str, Any]:
        return self.line_named(source.name, source.identity, key)

    def line_named(self, name: str, identity: str, key: str) -> dict[str, Any]:
        """The manifest line of clip ``name``: ok, else its latest failure, else pending."""
        done = self.done_named(name, key)
        if done is not None:
            return done
        failed = [r for r in self.records.get(name, ())
                  if r["status"] == "error" and r["key"] == key]
        if failed:
            return max(failed, key=lambda r: r.get("at", 0))
        return {"source": name, "key": key, "identity": identity, "status": "pending"}


def load_state(out: Location, fmt: Format) -> State:
    state = State()
    fs = out.fs
    # Object-store filesystems cache listings for the life of the instance (s3fs drops a
    # path's entry and its parents', not its children's); other workers publish parts
    # meanwhile, and they must be seen.
    fs.invalidate_cache()
    parts_dir = out.join(PARTS_DIR)
    names = fs.glob(parts_dir + "/*.jsonl") if fs.exists(parts_dir) else []
    blobs = fs.cat([n for n in names if TMP_MARK not in n]) if names else {}
    for path, blob in blobs.items():
        part = posixpath.basename(path)[:-len(".jsonl")]
        records = state.files.setdefault(part, [])
        for line in blob.decode("utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cannot happen for a published file; do not trust it either
            if not isinstance(record, dict):
                continue
            if isinstance(record.get(REPLACES), str):
                state.replaced.add(record[REPLACES])
            elif isinstance(record.get("source"), str):
                records.append(record)
    for part, records in state.files.items():
        for record in records if part not in state.replaced else ():
            state.add(record)
    if fmt == "files":
        found = fs.find(out.path, detail=True) if fs.exists(out.path) else {}
        state.outputs = {out.relative(p): file_identity(info) for p, info in found.items()
                         if p.endswith(LATENT_SUFFIX)}

        def read_sha256(rel: str) -> str:
            return hashlib.sha256(fs.cat_file(out.join(rel))).hexdigest()

        state.read_sha256 = read_sha256
    else:
        shards = out.join(SHARDS_DIR)
        found = fs.ls(shards, detail=False) if fs.exists(shards) else []
        state.outputs = {out.relative(p): "" for p in found if TMP_MARK not in p}
    return state


def remove_orphans(out: Location, fmt: Format, state: State, prefix: str | None, *,
                   dry_run: bool = False) -> int:
    """Remove shards no record file names (a run killed between the two publishes) and
    temporaries, of ``prefix``'s worker (None: of every worker); ``dry_run``: only count
    them."""
    fs = out.fs
    doomed: list[str] = []
    if fmt != "files":
        for rel in sorted(set(state.outputs) - state.referenced):
            # Every worker sweeps a stopped compaction's shards too: none runs beside one.
            if prefix is None or posixpath.basename(rel).startswith(
                    (prefix + "-", COMPACT_PREFIX + "-")):
                doomed.append(out.join(rel))
                if not dry_run:
                    state.outputs.pop(rel, None)
    if out.local and fs.exists(out.path):
        mark = TMP_MARK if prefix is None else f"{TMP_MARK}{prefix}-"
        versions = out.join(VERSIONS_DIR) + "/"  # other jobs' outputs
        doomed += [p for p in fs.find(out.path) if mark in posixpath.basename(p)
                   and not p.startswith(versions)]
    if doomed and not dry_run:
        fs.rm(sorted(set(doomed)))
    return len(set(doomed))


@dataclass(frozen=True)
class Listing:
    """Clips as one worker listed them, ``(name, identity, key)`` each: all of the job's
    (the worker's own view), or its share's as it published it (``publish_share``)."""

    by: str  # the worker's prefix, ``Job.prefix``
    clips: tuple[tuple[str, str, str], ...]

    @classmethod
    def of(cls, sources: Sequence[Source], config: JobConfig, by: str) -> Listing:
        return cls(by, tuple((s.name, s.identity, clip_key(s, config)) for s in sources))

    def render(self) -> bytes:
        return jsonl([{"by": self.by, "clips": len(self.clips)},
                      *({"source": n, "identity": i, "key": k} for n, i, k in self.clips)])

    @classmethod
    def parse(cls, blob: bytes) -> Listing | None:
        """The listing in ``blob``, None for anything else (a file this version did not
        write whole)."""
        try:
            head, *rows = (json.loads(line) for line in blob.decode("utf-8").splitlines())
            clips = tuple((str(r["source"]), str(r["identity"]), str(r["key"])) for r in rows)
            if head["clips"] != len(clips):
                return None
            return cls(str(head["by"]), clips)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _shares_suffix(count: int) -> str:
    return f"of{count:05d}.jsonl"  # ``Job.prefix`` ends so


def publish_share(out: Location, share: Listing, count: int) -> None:
    """Publish the listing of one worker's share (``OUT/.ivvae/listings/<prefix>.jsonl``),
    and remove those of other worker counts: the job's earlier runs, whose shares are
    another split of the clips. (Runs with two worker counts at once are not supported.)"""
    folder = out.join(LISTINGS_DIR)
    out.fs.invalidate_cache()
    if out.fs.exists(folder):
        stale = [p for p in out.fs.ls(folder, detail=False)
                 if p.endswith(".jsonl") and not p.endswith(_shares_suffix(count))]
        if stale:
            out.fs.rm(stale)
    if count > 1:  # one worker's own listing is its share's: nobody else reads it
        publish_bytes(out, out.join(LISTINGS_DIR, share.by + ".jsonl"), share.render())


def _shares(out: Location, count: int, seen: dict[str, tuple[Any, Listing | None]]
            ) -> tuple[set[int], dict[str, tuple[str, str]]]:
    """Which of ``count`` workers published the listing of their share, and every clip of
    those: its identity and key as the worker that encodes it listed it. ``seen`` keeps
    each file read (by its size and time), so a caller that asks again reads only those
    written meanwhile."""
    out.fs.invalidate_cache()
    folder = out.join(LISTINGS_DIR)
    listed = out.fs.ls(folder, detail=True) if out.fs.exists(folder) else []
    published: set[int] = set()
    clips: dict[str, tuple[str, str]] = {}
    for info in listed:
        path = info["name"]
        if not path.endswith(_shares_suffix(count)) or TMP_MARK in path:
            continue
        stamp = (info.get("size"), modified_time(out.fs, path, info), info.get("ETag"))
        if path not in seen or seen[path][0] != stamp:
            try:
                seen[path] = (stamp, Listing.parse(out.fs.cat_file(path)))
            except FileNotFoundError:  # replaced meanwhile: read at the next render
                continue
        share = seen[path][1]
        if share is None:
            continue
        with contextlib.suppress(ValueError):
            published.add(int(share.by[1:6]))
        for name, ident, key in share.clips:
            clips[name] = (ident, key)
    return published, clips


def write_manifest(out: Location, listing: Listing, count: int, config: JobConfig) -> str:
    """``OUT/manifest.jsonl``, written: one line per clip, from what is published right now.
    Returns its URL.

    Workers list the sources at different times, and a clip may change between two
    listings: each clip is named as the worker that encodes it listed it (its share's
    published listing, of this run's ``count`` workers), whoever writes the manifest
    last, so the manifest never names a version of a clip other than the one its worker
    encoded (a clip its worker no longer lists is not named); clips whose worker has not
    published yet are named as ``listing`` (this worker's view of all) has them. One
    worker publishes no share: its own listing is all. A change after a worker's listing
    is the next run's work, as on one machine. One that read the parts just before
    another published its last could overwrite the other's newer manifest, so it reads
    them again after writing, and writes again until nothing changed in between.
    """

    seen: dict[str, tuple[Any, Listing | None]] = {}
    workers = [worker_of(name, count) for name, _, _ in listing.clips]

    def render() -> bytes:
        state = load_state(out, config.format)
        published, clips = _shares(out, count, seen) if count > 1 else (set(), {})
        # A clip of a published share is named by it alone: one its worker no longer
        # lists (deleted from the source) is not named from this worker's older view.
        clips.update((name, (ident, key)) for (name, ident, key), worker
                     in zip(listing.clips, workers, strict=True)
                     if worker not in published and name not in clips)
        return jsonl(state.line_named(name, *clips[name]) for name in sorted(clips))

    publish_manifest(out, render)
    return out.url(out.join(MANIFEST_NAME))


def publish_manifest(out: Location, render: Callable[[], bytes]) -> None:
    """Publish ``render()`` as ``OUT/manifest.jsonl`` until two renders agree."""
    text = render()
    for _ in range(10):
        publish_bytes(out, out.join(MANIFEST_NAME), text)
        again = render()
        if again == text:
            return
        text = again


def open_output(out_url: str, config: JobConfig, *, new_version: bool = False) -> Location:
    """The output location of ``config``'s job under ``out_url``: ``out_url`` itself when
    it is new or holds the same job, ``out_url/versions/<key>`` with ``new_version``."""
    out = Location.of(out_url)
    path = out.join(STATE_DIR, JOB_NAME)
    if not out.fs.exists(path):
        body = {"key": config.key, "config": config.as_dict()}
        try:
            # Workers that start together into a new OUT: exactly one creates the job file
            # (written over, a loser of another job could go on writing its latents beside
            # the winner's), and the others read it as an existing job: their own, or not.
            publish_bytes(out, path, json.dumps(body, indent=1, sort_keys=True).encode(),
                          create=True)
        except OSError:
            # Taken (FileExistsError; S3 may say so as a 409 or a bare 412, which s3fs
            # raises as other OSErrors): read what is there. Anything else stays an error.
            if not out.fs.exists(path):
                raise
    held = read_job(out, path)
    if held.get("key") == config.key:
        return out
    if not new_version:
        changes = "; ".join(differences(held.get("config", {}), config.as_dict()))
        raise DatasetError(
            f"{out_url} holds another job (key {str(held.get('key'))[:12]}): {changes}. "
            "Use another OUT, or --new-version to write this one to "
            f"{VERSIONS_DIR}/{config.key[:16]}/ under it")
    return open_output(out.url(out.join(VERSIONS_DIR, config.key[:16])), config)


def read_job(out: Location, path: str) -> dict[str, Any]:
    """The job file, waiting a moment for one being written (where a filesystem has no
    hard links it is created empty, then written)."""
    for _ in range(20):
        try:
            held = json.loads(out.fs.cat_file(path))
            if isinstance(held, dict) and "key" in held:
                return held
        except ValueError:
            pass
        time.sleep(0.1)
    raise DatasetError(f"{out.url(path)} is not a whole job file (a run was killed while it "
                       "created it?): remove it, and run again")


@contextlib.contextmanager
def output_locks(out: Location, prefix: str | None) -> Iterator[None]:
    """Hold ``OUT``'s locks: a worker shares the job's lock and owns its ``prefix``'s; a
    compaction (``prefix`` None) owns the job's, so it runs alone. Local outputs only: object
    stores cannot lock."""
    if not out.local:
        yield
        return
    import fcntl

    os.makedirs(out.join(STATE_DIR), exist_ok=True)

    def lock(name: str, mode: int, busy: str) -> None:
        file = held.enter_context(open(out.join(STATE_DIR, name), "a"))  # noqa: SIM115
        try:
            fcntl.flock(file, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(busy) from None

    with contextlib.ExitStack() as held:
        if prefix:
            lock(LOCK_NAME, fcntl.LOCK_SH, f"a compaction of {out.path} is running")
            lock(f"{LOCK_NAME}-{prefix}", fcntl.LOCK_EX,
                 f"another encode-dataset run ({prefix}) is writing to {out.path}")
        else:
            lock(LOCK_NAME, fcntl.LOCK_EX, f"an encode-dataset run or another compaction "
                 f"is using {out.path}: compact when none is")
        yield
