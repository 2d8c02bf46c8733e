"""``ivvae compact-dataset``: make an ``encode-dataset`` output hold exactly what its manifest
names, for readers that glob the shards themselves.

    ivvae compact-dataset latents/ --dry-run      # what it would rewrite and remove
    ivvae compact-dataset s3://lat/v1/

``ivvae.data`` reads the manifest and never sees a superseded sample. A plain webdataset or
parquet reader globs ``OUT/shards/`` and sees every sample ever published: after a clip was
re-encoded (its video, caption or sidecar changed) both its old and its new sample, and the
samples of clips dropped from the source list. Shards are never rewritten while workers
run; this rewrites, once they are done, each shard that holds anything the manifest does
not name, keeping the rest byte for byte (a latent whose sha256 is not its record's, a
parquet row whose source is not its record's, or a cut shard stops it, naming the shard:
damage is never copied). With ``--format files``, latent files that the
job wrote and the manifest no longer names are removed (a clip whose current version
failed, or that left the list).

Crash safety. In three phases: each rewritten shard is published under a new part name,
then its record file, whose first line names the part it replaces (``dataset.REPLACES``);
from then on every run reads the old part's records as gone. Then the manifest, naming
the new parts. Only then are the old record files and shards removed. So the published
manifest names only shards that exist, wherever the compaction stops (a kill, a damaged
shard, a storage error), and the output is whole; a second compaction finishes the work,
and an ``encode-dataset`` start rewrites the manifest first and removes the leftovers.

It runs alone: locally it takes the job's lock, so it refuses while a worker writes and
workers refuse while it runs; on object stores, which cannot lock, it leaves
``OUT/.ivvae/compacting`` while it works, and workers refuse to start while that is there
(a compaction that was killed leaves it: run it again to finish; one that stopped on an
error takes it away). It refuses a manifest
older than the newest record file (a worker was stopped before it wrote the manifest): run
``encode-dataset`` once more, which only rewrites the manifest when all is done. A
training job that holds the old manifest loses the shards it names: compact between jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import posixpath
import secrets
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .dataset.job import (
    COMPACT_PREFIX,
    COMPACTING_NAME,
    JOB_NAME,
    LATENT_SUFFIX,
    MANIFEST_NAME,
    PARTS_DIR,
    RECORD_SUFFIX,
    REPLACES,
    SHARD_SUFFIX,
    SHARDS_DIR,
    STATE_DIR,
    VERSIONS_DIR,
    DatasetError,
    Format,
    jsonl,
)
from .dataset.state import (
    State,
    load_state,
    output_locks,
    publish_manifest,
    read_job,
    remove_orphans,
)
from .storage import (
    Location,
    modified_time,
    publish_bytes,
    publish_file,
    storage_errors,
    temp_file_for,
)

# The store's times, of the manifest and of the record files (S3: whole seconds).
CLOCK_SLACK_S = 2.0


@dataclass
class Compaction:
    output: str = ""
    format: str = ""
    dry_run: bool = False
    shards_rewritten: int = 0
    shards_removed: int = 0  # every sample stale
    samples_dropped: int = 0
    files_removed: int = 0  # --format files: latent files no longer named
    leftovers_removed: int = 0  # of killed runs and compactions
    bytes_freed: int = 0


def compact(url: str, *, dry_run: bool = False, spool: str | None = None) -> Compaction:
    """Compact the ``encode-dataset`` output at ``url`` (see the module docstring)."""
    try:
        return _compact(url, dry_run, spool or tempfile.gettempdir())
    except storage_errors() as exc:
        raise DatasetError(f"cannot compact {url}: {exc}") from exc


def _compact(url: str, dry_run: bool, spool: str) -> Compaction:
    out = Location.of(url)
    job_path = out.join(STATE_DIR, JOB_NAME)
    if not out.fs.exists(job_path):
        raise DatasetError(f"{url} is not an encode-dataset output (no {STATE_DIR}/{JOB_NAME})")
    fmt: Format = read_job(out, job_path).get("config", {}).get("format", "files")
    result = Compaction(output=out.url(), format=fmt, dry_run=dry_run)
    with output_locks(out, None):
        state = load_state(out, fmt)
        lines = _manifest(out)
        current = {id(_current(state, line)) for line in lines}

        def render() -> bytes:
            now = load_state(out, fmt)
            return jsonl(_current(now, line) for line in lines)

        if dry_run:  # counts what the run would, and reads what it would copy
            result.leftovers_removed += remove_orphans(out, fmt, state, None, dry_run=True)
            if fmt == "files":
                _remove_stale_files(out, state, current, result, dry_run=True)
            else:
                _rewrite_shards(out, fmt, state, current, result, True, spool)
            return result
        marker = out.join(STATE_DIR, COMPACTING_NAME)
        publish_bytes(out, marker, b"")  # object stores: workers refuse to start meanwhile
        try:
            _compact_locked(out, fmt, state, current, result, spool, render)
        finally:
            # Whatever stopped it short of a kill (a damaged shard, a storage error) left
            # the output whole, and a worker's start finishes any removal: let them run.
            out.fs.rm(marker)
    return result


def _compact_locked(out: Location, fmt: Format, state: State, current: set[int],
                    result: Compaction, spool: str, render: Callable[[], bytes]) -> None:
    if state.replaced:  # a stopped compaction's: name its new parts before any removal
        publish_manifest(out, render)
    result.leftovers_removed += remove_orphans(out, fmt, state, None)
    if fmt == "files":
        _remove_stale_files(out, state, current, result, dry_run=False)
        publish_manifest(out, render)
        return
    # Three phases, so that the published manifest names only shards that exist whenever
    # the compaction stops: the new shards and their record files (which replace the old
    # parts for every run from then on), the manifest that names them, and only then the
    # removal of what they replace.
    try:
        records, shards = _rewrite_shards(out, fmt, state, current, result, False, spool)
    finally:
        publish_manifest(out, render)
    # Record files first, in their own call (a bulk delete has no order): a shard without
    # its records is an orphan, never a duplicate.
    for batch in (records, shards):
        if batch:
            out.fs.rm(batch)


def _current(state: State, line: dict[str, Any]) -> dict[str, Any]:
    """What ``state`` holds for a manifest ``line``'s clip at its key: its record, or a
    pending line."""
    return state.line_named(line["source"], str(line.get("identity", "")), line["key"])


def _manifest(out: Location) -> list[dict[str, Any]]:
    """The manifest's lines; refused when a record is newer than it (then it does not list
    every clip a worker published, and compacting by it would drop that work)."""
    path = out.join(MANIFEST_NAME)
    if not out.fs.exists(path):
        raise DatasetError(f"{out.url()} has no {MANIFEST_NAME}: no encode-dataset run has "
                           "finished there yet")
    lines = []
    for number, text in enumerate(out.fs.cat_file(path).decode("utf-8").splitlines(), 1):
        try:
            line = json.loads(text)
            if isinstance(line, dict) and all(isinstance(line.get(k), str)
                                              for k in ("source", "key")):
                lines.append(line)
                continue
        except ValueError:
            pass
        raise DatasetError(f"{out.url(path)}: line {number} is not a manifest line")
    written = _modified(out, path, out.fs.info(path))  # the store's clock, as for the parts
    parts = out.join(PARTS_DIR)
    listed = out.fs.ls(parts, detail=True) if out.fs.exists(parts) else []
    # A compaction's own record files hold copies of what a manifest named: not new work.
    newest = max((_modified(out, info["name"], info) for info in listed
                  if info["name"].endswith(".jsonl")
                  and not posixpath.basename(info["name"]).startswith(COMPACT_PREFIX + "-")),
                 default=0.0)
    if newest > written + CLOCK_SLACK_S:
        raise DatasetError(
            f"{out.url(path)} is older than the newest published part (a worker was stopped "
            "before it wrote the manifest): run encode-dataset once more with the same "
            "options (it rewrites the manifest), then compact")
    return lines


def _modified(out: Location, path: str, info: dict[str, Any]) -> float:
    stamp = modified_time(out.fs, path, info)
    if stamp is None:
        raise DatasetError(f"{out.url(path)}: this store does not say when its files were "
                           "written, which compaction needs")
    return stamp


def _remove_stale_files(out: Location, state: State, current: set[int], result: Compaction,
                        dry_run: bool) -> None:
    named = {r["part"] for records in state.records.values() for r in records
             if r["status"] == "ok" and r.get("part")}
    kept = {r["part"] for records in state.records.values() for r in records
            if id(r) in current and r["status"] == "ok"}
    versions = VERSIONS_DIR + "/"
    doomed = sorted(rel for rel in state.outputs
                    if rel in named and rel not in kept and not rel.startswith(versions))
    for rel in doomed:
        result.bytes_freed += int(out.fs.size(out.join(rel)) or 0)
    result.files_removed = len(doomed)
    if doomed and not dry_run:
        out.fs.rm([out.join(rel) for rel in doomed])


def _rewrite_shards(out: Location, fmt: Format, state: State, current: set[int],
                    result: Compaction, dry_run: bool, spool: str
                    ) -> tuple[list[str], list[str]]:
    """Publish a shard and record file for the current samples of every part that holds
    stale ones; returns what they replace (record files, shards), for the caller to remove
    once the manifest names the new parts."""
    # The record files of parts a killed compaction replaced are among them (their shards
    # went with the orphans): while the file replacing one exists, they are read as gone.
    replaced = sorted(state.replaced & set(state.files))
    result.leftovers_removed += len(replaced)
    old_records = [out.join(PARTS_DIR, part + ".jsonl") for part in replaced]
    old_shards: list[str] = []
    run = f"{int(time.time()):010x}{secrets.token_hex(3)}"
    seq = 0
    for part, records in sorted(state.files.items()):
        if part in state.replaced:
            continue
        shard = out.join(SHARDS_DIR, part + SHARD_SUFFIX[fmt])
        stale = [r for r in records if r["status"] == "ok" and id(r) not in current]
        if not stale or not out.fs.exists(shard):  # stale failures have no sample
            continue
        keep = [r for r in records if id(r) in current]
        keep_ok = [r for r in keep if r["status"] == "ok"]
        result.samples_dropped += len(stale)
        result.bytes_freed += sum(int(r.get("bytes", 0)) for r in stale)
        if keep_ok:
            result.shards_rewritten += 1
        else:
            result.shards_removed += 1
        if keep:
            new_part = f"{COMPACT_PREFIX}-{run}-{seq:05d}"
            seq += 1
            new_shard = out.join(SHARDS_DIR, new_part + SHARD_SUFFIX[fmt])
            rel = posixpath.relpath(new_shard, out.path)
            row = {id(r): i for i, r in enumerate(keep_ok)}  # parquet: the new shard's rows
            moved = [{**r, "part": rel, "member": _member(r, row[id(r)], fmt)}
                     if r["status"] == "ok" else r for r in keep]
            if keep_ok:
                tmp = temp_file_for(out, new_shard, spool, COMPACT_PREFIX + "-")
                try:
                    if fmt == "webdataset":
                        _copy_tar(out, shard, tmp, keep_ok, rel)
                    else:
                        _copy_parquet(out, shard, tmp, keep_ok)
                except _Damaged as exc:
                    _unlink(tmp)
                    record_file = out.url(out.join(PARTS_DIR, part + ".jsonl"))
                    raise DatasetError(
                        f"{out.url(shard)} is damaged: {exc}. The compaction stopped there, "
                        "the output whole. To encode its clips again, remove its record "
                        f"file {record_file} and run encode-dataset (it removes the shard), "
                        "then compact") from exc
                except BaseException:
                    _unlink(tmp)
                    raise
                if dry_run:
                    _unlink(tmp)
                    continue
                publish_file(out, tmp, new_shard)
            if dry_run:
                continue
            publish_bytes(out, out.join(PARTS_DIR, new_part + ".jsonl"),
                          jsonl([{REPLACES: part}, *moved]))
        if not dry_run:
            old_records.append(out.join(PARTS_DIR, part + ".jsonl"))
            old_shards.append(shard)
    return old_records, old_shards


def _member(record: dict[str, Any], index: int, fmt: Format) -> Any:
    """A kept sample's member in its new shard: the same tar key, or its new row."""
    return record["member"] if fmt == "webdataset" else index


class _Damaged(Exception):
    """A shard is not what its records say (``_rewrite_shards`` names the remedy)."""


def _copy_tar(out: Location, shard: str, tmp: str, keep: list[dict[str, Any]],
              part: str) -> None:
    try:
        _copy_tar_members(out, shard, tmp, keep, part)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise _Damaged(str(exc) or type(exc).__name__) from exc


def _copy_tar_members(out: Location, shard: str, tmp: str, keep: list[dict[str, Any]],
                      part: str) -> None:
    wanted = {r["member"]: r for r in keep}
    seen: set[str] = set()
    with out.fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as old, \
            tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as new:
        for entry in old:
            key, _, suffix = entry.name.partition(".")
            record = wanted.get(key)
            if record is None or not entry.isfile():
                continue
            reader = old.extractfile(entry)
            assert reader is not None
            data = reader.read()
            if "." + suffix == LATENT_SUFFIX:
                if hashlib.sha256(data).hexdigest() != record.get("latent_sha256"):
                    raise _Damaged(f"the latent of {record['source']!r} is not the one its "
                                   "record names")
                seen.add(key)
            elif "." + suffix == RECORD_SUFFIX:  # it names its part: the new one now
                data = json.dumps({**json.loads(data), "part": part}, sort_keys=True).encode()
            copy = tarfile.TarInfo(entry.name)
            copy.size, copy.mode, copy.mtime = len(data), entry.mode, entry.mtime
            new.addfile(copy, io.BytesIO(data))
    missing = sorted(set(wanted) - seen)
    if missing:
        raise _Damaged(f"it has no latent of sample {missing[0]!r}: it is cut short")


def _copy_parquet(out: Location, shard: str, tmp: str, keep: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = out.fs.cat_file(shard)
    try:
        meta = pq.ParquetFile(pa.BufferReader(data)).metadata
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True,
                              use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise _Damaged(str(exc)) from exc
    rows = meta.row_group(0).num_rows if meta.num_row_groups else 64
    wanted = [int(r["member"]) for r in keep]
    if max(wanted) >= table.num_rows:
        raise _Damaged(f"it has {table.num_rows} rows, and its records name row "
                       f"{max(wanted)}: it is cut short")
    taken = table.take(wanted)
    # A row holds no latent file to hash: its source and clip key must be the record's.
    for record, source, key in zip(keep, taken.column("source").to_pylist(),
                                   taken.column("clip_key").to_pylist(), strict=True):
        if (source, key) != (record["source"], record["key"]):
            raise _Damaged(f"row {record['member']} holds {source!r}, and its record names "
                           f"{record['source']!r}")
    pq.write_table(taken, tmp, row_group_size=max(1, rows), write_page_checksum=True)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="an encode-dataset output: a folder or URL prefix")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be rewritten and removed; change nothing")


def main(args: argparse.Namespace) -> int:
    """The ``compact-dataset`` subcommand: 0 when done, 2 when refused."""
    try:
        result = compact(args.out, dry_run=args.dry_run)
    except DatasetError as exc:
        print(f"compact-dataset: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0
