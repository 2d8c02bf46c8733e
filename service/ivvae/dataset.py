"""``ivvae encode-dataset``: encode a folder (or a list) of videos through a running service.

    ivvae encode-dataset clips/ latents/ --server grpc://encoder:50051 --concurrency 8

* Sources: every video or image file under ``SRC_DIR`` (recursively, by file suffix), or
  the paths in a list file (one per line; relative ones are relative to the list's folder;
  blank lines and ``#`` comments are skipped).
* Outputs: ``OUT_DIR/<source path>.latent.safetensors`` (the source's path relative to
  ``SRC_DIR`` or to the list's folder; a path outside it is mirrored whole), so distinct
  sources never share an output.
* Manifest: ``OUT_DIR/manifest.jsonl``, one JSON object per finished item, appended as it
  finishes: ``source``, ``latent`` (relative to ``OUT_DIR``), ``status`` (``ok`` or
  ``error``), and for ``ok`` the latent ``shape``, the source's ``content_sha256``, the
  file's ``latent_sha256`` and ``bytes``, ``model``, ``seconds``; for ``error`` the service's
  ``error`` code and ``detail``. A later line for the same source supersedes earlier ones.
* Resume: a rerun skips every source whose last manifest line is ``ok`` and whose latent file
  is still there with the recorded size; everything else (never started, interrupted,
  failed) is encoded again. Latents are written to a temporary name and renamed, and the
  manifest line is written after the rename, so a crash or Ctrl-C at any moment leaves only
  whole latent files; stray temporary files of a killed run are removed at the next start.
  A lock file keeps two runs from writing into one ``OUT_DIR`` at once.

Exit status: 0 when every item is done, 1 when some failed (see the manifest), 2 when the
run could not start or the service stayed unreachable, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .client import AsyncClient, RetryPolicy, atomic_write
from .client._result import TMP_SUFFIX
from .core.names import PRECISIONS
from .errors import BackendUnavailable, IVVAEError, Overloaded
from .media_types import MEDIA_SUFFIXES

LATENT_SUFFIX = ".latent.safetensors"
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".encode-dataset.lock"


class DatasetError(Exception):
    """The run cannot start or go on (bad arguments, locked output, service unreachable)."""


@dataclass(frozen=True)
class Item:
    source: str  # as the manifest names it: relative to SRC_DIR, or as the list wrote it
    path: Path  # where to read it
    latent: str  # output path relative to OUT_DIR


@dataclass
class Summary:
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def clips_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "encoded": self.encoded, "skipped": self.skipped,
                "failed": self.failed, "seconds": round(self.seconds, 3),
                "clips_per_s": round(self.clips_per_s, 3), "errors": self.errors}


def _output_name(resolved: Path, base: Path) -> str:
    try:
        rel = resolved.relative_to(base)
    except ValueError:
        rel = resolved.relative_to(resolved.anchor)
    return rel.as_posix() + LATENT_SUFFIX


def collect(src: Path) -> list[Item]:
    """The items of ``src``, a folder or a list file, sorted by source."""
    if src.is_dir():
        base = src.resolve()
        items = [Item(p.relative_to(base).as_posix(), p, _output_name(p, base))
                 for p in sorted(base.rglob("*"))
                 if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES]
    elif src.is_file():
        base = src.resolve().parent
        items = []
        for line in src.read_text().splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = (base / entry).resolve()
            items.append(Item(entry, path, _output_name(path, base)))
    else:
        raise DatasetError(f"{src} is neither a folder nor a list file")
    seen: dict[str, str] = {}
    for item in items:
        if item.source in seen:
            raise DatasetError(f"{item.source!r} is listed twice")
        seen[item.source] = item.latent
    return sorted(items, key=lambda i: i.source)


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each source; a line cut short by a crash is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("source"), str):
                records[record["source"]] = record
    return records


def is_done(record: dict[str, Any] | None, out: Path) -> bool:
    if record is None or record.get("status") != "ok":
        return False
    latent = out / str(record.get("latent", ""))
    return latent.is_file() and latent.stat().st_size == record.get("bytes")


class _Manifest:
    """Append-only JSON lines, each flushed and fsynced before the next item counts."""

    def __init__(self, path: Path) -> None:
        self.file: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115
        self.file.seek(0, os.SEEK_END)
        if self.file.tell():  # a crash may have cut the last line: do not glue onto it
            self.file.seek(self.file.tell() - 1)
            if self.file.read(1) != "\n":
                self.file.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    import fcntl

    with open(out / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"another encode-dataset run is writing to {out}") from None
        yield


def _remove_stale_temporaries(out: Path) -> int:
    stale = list(out.rglob(f"*{LATENT_SUFFIX}.*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


async def encode_dataset(src: Path, out: Path, *, server: str, concurrency: int = 4,
                         encode_options: dict[str, Any] | None = None,
                         api_key: str | None = None, timeout: float = 600.0,
                         retry: RetryPolicy | None = None, progress: bool = False,
                         ca_cert: str | os.PathLike[str] | None = None) -> Summary:
    """Encode every item of ``src`` not yet done into ``out`` (see the module docstring).

    Raises ``DatasetError`` when the run cannot start or the service stays unreachable
    (after ``retry``); items that fail for their own reasons are recorded and counted.
    """
    if concurrency < 1:
        raise DatasetError("concurrency must be at least 1")
    items = collect(src)
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(total=len(items))
    with _locked(out):
        _remove_stale_temporaries(out)
        done = read_manifest(out / MANIFEST_NAME)
        todo = [i for i in items if not is_done(done.get(i.source), out)]
        summary.skipped = len(items) - len(todo)
        manifest = _Manifest(out / MANIFEST_NAME)
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="encode-dataset", unit="clip", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        start = time.perf_counter()
        try:
            async with AsyncClient(server, api_key=api_key, timeout=timeout,
                                   retry=retry, ca_cert=ca_cert) as client:
                await _run(client, todo, out, manifest, summary, bar, concurrency,
                           encode_options or {})
        finally:
            summary.seconds = time.perf_counter() - start
            bar.close()
            manifest.close()
    return summary


async def _run(client: AsyncClient, todo: list[Item], out: Path, manifest: _Manifest,
               summary: Summary, bar: Any, concurrency: int, options: dict[str, Any]) -> None:
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            record = await _encode_one(client, item, out, options)
            manifest.append(record)
            if record["status"] == "ok":
                summary.encoded += 1
            else:
                summary.failed += 1
                summary.errors[record["error"]] = summary.errors.get(record["error"], 0) + 1
                bar.set_postfix(failed=summary.failed)
            bar.update(1)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _encode_one(client: AsyncClient, item: Item, out: Path,
                      options: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    record: dict[str, Any] = {"source": item.source, "latent": item.latent}
    try:
        result = await client.encode(item.path, **options)
    except (BackendUnavailable, Overloaded) as exc:  # already retried: give up the run
        raise DatasetError(f"the service at {client.url} is unavailable: {exc.detail}") from exc
    except IVVAEError as exc:
        return {**record, "status": "error", "error": exc.code, "detail": exc.detail}
    except OSError as exc:
        return {**record, "status": "error", "error": "io_error", "detail": str(exc)}
    target = out / item.latent

    def write() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, result.data)

    await asyncio.to_thread(write)
    return {**record, "status": "ok", "shape": list(result.latent_shape),
            "content_sha256": result.info.content_sha256,
            "latent_sha256": hashlib.sha256(result.data).hexdigest(),
            "bytes": len(result.data), "model": result.info.model_name,
            "seconds": round(time.perf_counter() - start, 3)}


def main(args: argparse.Namespace) -> int:
    """The ``encode-dataset`` subcommand (arguments: see ``add_arguments``)."""
    options: dict[str, Any] = {"model": args.model, "sample": args.sample, "seed": args.seed,
                               "dtype": args.dtype, "moments": args.moments}
    retry = RetryPolicy(attempts=args.retries + 1)

    async def run() -> Summary:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # stop as cleanly as Ctrl-C
        return await encode_dataset(
            Path(args.src), Path(args.out), server=args.server, concurrency=args.concurrency,
            encode_options=options, api_key=args.api_key or os.environ.get("IVVAE_API_KEY"),
            timeout=args.timeout, retry=retry, progress=not args.no_progress,
            ca_cert=args.ca_cert)

    try:
        summary = asyncio.run(run())
    except DatasetError as exc:
        print(f"encode-dataset: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("encode-dataset: interrupted; run it again to finish", file=sys.stderr)
        return 130
    print(json.dumps({**summary.as_dict(), "manifest": str(Path(args.out) / MANIFEST_NAME)}))
    return 1 if summary.failed else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``encode-dataset`` arguments."""
    p.add_argument("src", metavar="SRC_DIR_OR_LIST",
                   help="a folder of videos (searched recursively) or a file listing paths")
    p.add_argument("out", metavar="OUT_DIR", help="latents and manifest.jsonl go here")
    p.add_argument("--server", required=True,
                   help="grpc://HOST:PORT, HOST:PORT (gRPC) or http(s)://HOST:PORT")
    p.add_argument("--concurrency", type=int, default=4, help="videos in flight (default 4)")
    p.add_argument("--api-key", help="default: $IVVAE_API_KEY")
    p.add_argument("--ca-cert", help="PEM CA bundle for https:// or grpcs:// servers with a "
                   "private CA (default: the system's roots)")
    p.add_argument("--model", default="")
    p.add_argument("--sample", action="store_true", help="sample the posterior")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default=PRECISIONS[0], choices=PRECISIONS)
    p.add_argument("--moments", action="store_true", help="also store mu and logvar")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per video")
    p.add_argument("--retries", type=int, default=6,
                   help="retries of a video on UNAVAILABLE / no connection (default 6)")
    p.add_argument("--no-progress", action="store_true")
