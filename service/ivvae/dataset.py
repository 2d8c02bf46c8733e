"""``ivvae encode-dataset``: precompute the latents of a whole dataset, exactly resumable.

    ivvae encode-dataset clips/ latents/                        # in-process model
    ivvae encode-dataset s3://raw/clips/ s3://lat/v1/ --format webdataset --shard 3/16
    ivvae encode-dataset clips.txt out/ --server grpc://encoder:50051 --concurrency 8

Sources (``SRC``, local or any fsspec URL): a folder or URL prefix (searched recursively for
video and image files; in a local folder, symbolic links are followed), a glob
(``s3://b/clips/*/*.mp4``), or a list file (one path or URL a line, as written, spaces
included; relative ones are relative to the list's folder; blank lines and lines starting
with ``#`` are skipped). A list may also be a table, as training tools keep their
datasets: ``.csv`` (with a header), ``.jsonl`` or ``.json`` (an array of objects), one row
per clip. Its clip column is ``--path-column`` or the first of ``PATH_COLUMNS``
(``media_path``, ``video_path``, ``video``, ``path``, ...); its caption, ``--caption-column``
or the first of ``CAPTION_COLUMNS`` (``caption``, ``text``, ``prompt``, ``cap``), becomes the
clip's ``.txt`` sidecar and the whole row its ``.json`` sidecar (in place of files beside
the clip with those suffixes). ``--option-column OPTION[=COLUMN]`` lets each row set a
preprocessing option for its clip (a window: ``start_s`` or ``start_frame``, ``num_frames``
or ``max_frames``; or any other), over the job's option of that name and its alternative
(``start_s`` for ``start_frame``, ``num_frames`` for ``max_frames``, ``fps`` for
``stride``); an empty cell sets none. Such a clip is named ``<path>#<its options>``
(``long.mp4#start_s=12,num_frames=49``), so one file in several rows (the spans of a
scene-cut or captioned long video) is a clip per row (a remote file that several clips
of a run read is fetched once: ``Copies``). A source that holds no clip at all is
refused (exit 2): it is a mistyped prefix, not a job. Files next to a clip with its stem
and another suffix (``clip.txt``, ``clip.json``) are its sidecars: they go into webdataset
and parquet samples as they are. A changed sidecar or caption makes its clip's sample new.

Outputs (``OUT``, a folder or URL prefix), ``--format``:

* ``files``: ``OUT/<source>.latent.safetensors``, one latent file per clip;
* ``webdataset``: ``OUT/shards/*.tar``; sample ``<key>`` (the source name with ``.`` -> ``_``)
  holds ``<key>.latent.safetensors``, ``<key>.ivvae.json`` (its manifest record and latent
  metadata) and each sidecar ``<key>.<suffix>``;
* ``parquet``: ``OUT/shards/*.parquet``, one row per clip: ``latent`` (the raw tensor bytes,
  C order), ``shape``, ``dtype``, every latent metadata field as a column, ``sidecars``.

``OUT/manifest.jsonl`` has one line per clip of the job, whatever the number of reruns and
workers: ``source``, ``key``, ``status`` (``ok``, ``error`` or ``pending``: not yet done by
any worker), ``part`` and ``member`` (where the latent is: a file, or a shard and the tar
sample key / parquet row), ``shape``, ``dtype``, ``frames``, ``bytes``, ``latent_sha256``,
``file`` (``files`` format: which publish of the latent file it is), ``error``, ``detail``.
It is rewritten whole when a worker finishes (or is stopped); ``ivvae.data`` reads it.

Encoders. Without ``--server`` the model runs in this process (``EncoderSpec``: weights,
device, precision); concurrent clips' steps are not batched together, so each latent is bit
for bit what encoding that clip alone gives. The preprocessing options
(``ivvae.video.preprocess``: ``--resize``, ``--bucket``, ...) apply on either path.

Exact resume. The job is keyed by everything that decides its output (``JobConfig``): the
format, the preprocessing and encode options, the model and its weights hash. A clip's key
adds the source's identity (object stores: version or ETag, and size; local files: the
content's sha256) and its sidecars'. A rerun with the same job key skips every clip whose
key has a published output and encodes the rest (never done, failed, interrupted, or a
source that changed since); a different job key is refused (``--new-version`` writes it to
``OUT/versions/<key>/`` instead), so outputs are never mixed. A re-encoded clip's old
sample stays in its old shard (a run never rewrites a tar or parquet file): the manifest,
and so ``ivvae.data``, names only the current one, while a reader that globs the shards
itself sees both until ``ivvae compact-dataset`` (``ivvae.compact``) rewrites that shard.

Crash safety. Outputs are published whole (``ivvae.storage``): a latent file, then a shard,
then the part's record file ``OUT/.ivvae/parts/<part>.jsonl``, which is what makes its
clips count as done. A shard published by a run killed before its record file is removed
at the next start of the same ``--shard`` (or of any unsharded run), so no clip is ever in
two shards; temporary files of killed runs are removed too. A lock file keeps two runs of
one ``--shard`` from writing into one local ``OUT`` at once (object stores cannot lock:
run each shard once, as a Kubernetes Indexed Job with ``podReplacementPolicy: Failed``
does; two at once each remove the other's shard whose record is not yet published as a
killed run's leftover, and its clips are encoded again by the next run).

``--shard i/N`` takes the clips whose name hashes to ``i`` modulo ``N``: N workers, started
anywhere and in any order, together cover the dataset exactly once. Each publishes its
listing of its share (``OUT/.ivvae/listings/``); the manifest, whoever writes it, names each
clip as its worker listed it (``write_manifest``).

Exit status: 0 when every clip of this worker is done, 1 when some failed (see the
manifest), 2 when the run could not start, or could not go on (its output failed: a full
disk; a clip's read got no answer and its store none to a check either; with
``--server``, the service is down, a clip ran out of time and the service does not answer
a liveness check either, or it served another model, weights or precision than at the
start; the summary is printed if it had started), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import secrets
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from .core import strict
from .core.names import PRECISIONS
from .errors import BackendUnavailable, DeadlineExceeded, IVVAEError, Overloaded
from .latents import ENCODE_PRECISION_KEY, LatentInfo
from .media_types import MEDIA_SUFFIXES
from .storage import (
    TMP_MARK,
    Location,
    content_sha256,
    file_identity,
    identity,
    modified_time,
    publish_file,
    read_errors,
    storage_errors,
    temp_file_for,
)
from .storage import write_bytes as publish_bytes

if TYPE_CHECKING:
    from .client import RetryPolicy
    from .config import Settings

Format = Literal["files", "webdataset", "parquet"]
FORMATS: tuple[Format, ...] = ("files", "webdataset", "parquet")
LATENT_SUFFIX = ".latent.safetensors"
RECORD_SUFFIX = ".ivvae.json"
MANIFEST_NAME = "manifest.jsonl"
STATE_DIR = ".ivvae"
JOB_NAME = "job.json"
PARTS_DIR = f"{STATE_DIR}/parts"
LISTINGS_DIR = f"{STATE_DIR}/listings"  # each worker's listing of its share
SHARDS_DIR = "shards"
VERSIONS_DIR = "versions"
LOCK_NAME = "lock"
REPLACES = "replaces"  # a record file's line naming a part that a compaction replaced
COMPACTING_NAME = "compacting"  # OUT/.ivvae/compacting: a compaction runs (or was stopped)
COMPACT_PREFIX = "compact"  # the part names a compaction publishes: compact-<run>-<seq>
SHARD_CLIPS = 1000  # a shard's clips at most (--shard-clips)
SHARD_MB = 1024.0  # and its MiB (--shard-mb)
_T = TypeVar("_T")
SHARD_SUFFIX: dict[Format, str] = {"files": "", "webdataset": ".tar", "parquet": ".parquet"}
JOB_SCHEMA = "ivvae.encode-dataset/1"


log = logging.getLogger("ivvae.dataset")


class DatasetError(Exception):
    """The run cannot start or go on (bad arguments, another job's output, no service)."""


# -- the job ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipOptions:
    """The encode options applied to every clip (``preprocess``: the canonical string of
    ``ivvae.video.preprocess.Preprocess``, empty for none)."""

    model: str = ""
    sample: bool = False
    seed: int | None = None  # with sample: clip i gets a seed derived from (seed, its name)
    dtype: str = "float32"
    moments: bool = False
    preprocess: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise DatasetError(f"dtype must be one of {', '.join(PRECISIONS)}, got "
                               f"{self.dtype!r}")
        if self.seed is not None and not self.sample:
            raise DatasetError("--seed is only meaningful with --sample")

    def clip_seed(self, name: str) -> int | None:
        if not self.sample or self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}\n{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # in [0, 2**63)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    weights_sha256: str
    # "server": a service whose /models (ListModels) does not say
    encode_precision: str


@dataclass(frozen=True)
class JobConfig:
    """Everything that decides a job's output; its hash is the job key."""

    format: Format
    options: ClipOptions
    model: ModelIdentity
    schema: str = JOB_SCHEMA

    @property
    def key(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "format": self.format, "options": asdict(self.options),
                "model": asdict(self.model)}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# -- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One clip: ``name`` as the manifest names it, ``url`` where to read it, ``identity``
    (``etag:...:size:N``, ``versionid:...`` or ``sha256:...``), its sidecars as
    ``(suffix, url, identity)`` and ``output``, its path under OUT for ``--format files``.
    ``given``: sidecars a table list file gives as ``(suffix, bytes)`` (its caption as
    ``.txt``, its row as ``.json``), in place of files beside the clip with that suffix."""

    name: str
    url: str
    identity: str
    output: str
    sidecars: tuple[tuple[str, str, str], ...] = ()
    given: tuple[tuple[str, bytes], ...] = ()
    # A table row's own preprocessing (``--option-column``), canonical; applied on top of
    # the job's (``with_row_options``).
    options: str = ""

    def __post_init__(self) -> None:
        if self.output != _contained(self.output):
            raise ValueError(f"output {self.output!r} of {self.name!r} would not stay under "
                             "OUT")

    def key(self, job_key: str, *, sidecars: bool = True) -> str:
        """The clip key: the job key, the name, the source's identity and (for formats that
        carry them) the sidecars' identities."""
        parts = [job_key, self.name, self.identity]
        if self.options:
            parts.append(f"options={self.options}")
        if sidecars:
            parts += [f"{s}={i}" for s, _, i in self.sidecars]
            parts += [f"{s}=sha256:{hashlib.sha256(data).hexdigest()}" for s, data in self.given]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def as_row(self) -> dict[str, str]:
        """The source as a row of strings (a Ray dataset's), ``from_row``'s inverse."""
        return {"name": self.name, "url": self.url, "identity": self.identity,
                "output": self.output, "sidecars": json.dumps([list(x) for x in self.sidecars]),
                "given": json.dumps([[s, base64.b64encode(data).decode()]
                                     for s, data in self.given]),
                "options": self.options}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Source:
        return cls(str(row["name"]), str(row["url"]), str(row["identity"]), str(row["output"]),
                   tuple((str(a), str(b), str(c)) for a, b, c in json.loads(str(row["sidecars"]))),
                   tuple((str(s), base64.b64decode(str(data)))
                         for s, data in json.loads(str(row.get("given") or "[]"))),
                   str(row.get("options") or ""))

    @property
    def sample_key(self) -> str:
        """The webdataset sample key: dots would split it, so they become ``_``."""
        return self.name.replace(".", "_")

    def worker(self, count: int) -> int:
        return _worker_of(self.name, count)


def _worker_of(name: str, count: int) -> int:
    """Which of ``count`` workers (``--shard i/N``) encodes the clip ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


def _mirrored(url: str) -> str:
    """A path for a source outside the base folder: its whole URL, without the protocol."""
    path = url.split("://", 1)[-1]
    return path.lstrip("/")


def _contained(path: str) -> str:
    """``path`` (a source's, relative to OUT) as a path that stays under OUT: empty and
    ``.`` segments dropped, a ``..`` segment kept as the name ``%2E%2E``. An object key or
    a URL may hold ``..`` as a plain name (S3 takes ``clips/../../x.mp4`` as one key);
    joined as it is, it wrote the latent above OUT."""
    parts = ("%2E%2E" if part == ".." else part for part in path.split("/"))
    return "/".join(part for part in parts if part not in ("", "."))


def _followed(loc: Location, entries: Sequence[dict[str, Any]], *, descend: bool = True
              ) -> list[dict[str, Any]]:
    """``entries`` with symbolic links followed, in a local folder (a folder of links is a
    common way to assemble a dataset; fsspec lists a link as neither file nor folder): a
    link to a file is that file under the link's name, a link to a folder is searched too
    when ``descend`` (a folder listing, not a glob), a broken link is skipped with a
    warning. A file reached twice (a link to a folder in the tree) is listed once, under
    its name without links when it has one."""
    if not loc.local:
        return list(entries)
    found: list[dict[str, Any]] = []
    searched = {os.path.realpath(loc.path)}
    pending = list(entries)
    while pending:
        entry = pending.pop()
        name = entry["name"]
        if not entry.get("islink"):
            found.append(entry)
        elif os.path.isfile(name):
            found.append({**entry, "type": "file", "size": os.path.getsize(name)})
        elif os.path.isdir(name):
            real = os.path.realpath(name)
            if descend and real not in searched:
                searched.add(real)
                pending += loc.fs.find(name, detail=True).values()
        else:
            log.warning("skipping %s: a broken symbolic link", name)
    keyed = [(os.path.realpath(e["name"]) if e.get("type") == "file" else e["name"], e)
             for e in found]
    # The plain name (equal to its real path) first, then the others in order: first kept.
    keyed.sort(key=lambda pair: (pair[1]["name"] != pair[0], pair[1]["name"]))
    by_file: dict[str, dict[str, Any]] = {}
    for real, entry in keyed:
        by_file.setdefault(real, entry)
    return list(by_file.values())


def _listing(loc: Location, entries: Sequence[dict[str, Any]], hash_threads: int, *,
             descend: bool = True) -> list[Source]:
    entries = _followed(loc, entries, descend=descend)
    infos = {i["name"]: i for i in entries if i.get("type") == "file"}
    siblings: dict[str, list[str]] = {}
    for path in infos:
        siblings.setdefault(_stem(path), []).append(path)
    media = sorted(p for p in infos if _suffix(p) in MEDIA_SUFFIXES)
    return _sources(loc, media, infos, siblings, hash_threads, names=None)


def _sources(loc: Location, media: list[str], infos: dict[str, dict[str, Any]],
             siblings: dict[str, list[str]], hash_threads: int,
             names: dict[str, str] | None) -> list[Source]:
    fs = loc.fs

    def ident(path: str) -> str:
        return identity(infos[path]) or "sha256:" + content_sha256(fs, path)

    paths = set(media)
    for m in media:
        paths.update(s for s in siblings.get(_stem(m), []) if _suffix(s) not in MEDIA_SUFFIXES)
    with ThreadPoolExecutor(max(1, hash_threads)) as pool:
        ids = dict(zip(sorted(paths), pool.map(ident, sorted(paths)), strict=True))
    sources = []
    for m in media:
        name = names[m] if names is not None else _under(loc, fs, m) or loc.relative(m)
        sidecars = tuple(sorted(
            (_suffix(s), fs.unstrip_protocol(s), ids[s])
            for s in siblings.get(_stem(m), []) if _suffix(s) not in MEDIA_SUFFIXES))
        sources.append(Source(name, fs.unstrip_protocol(m), ids[m], _output_for(loc, fs, m),
                              sidecars))
    sources.sort(key=lambda s: s.name)
    _check_unique(sources)
    return sources


def _sidecars_beside(loc: Location, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sidecars of the clips among ``entries`` that ``entries`` lacks: a glob for the
    clips (``*.mp4``) matches none of them, so each clip folder is listed once."""
    clips = [e["name"] for e in entries
             if e.get("type") == "file" and _suffix(e["name"]) in MEDIA_SUFFIXES]
    stems, known = {_stem(c) for c in clips}, {e["name"] for e in entries}
    return [e for folder in sorted({posixpath.dirname(c) for c in clips})
            for e in loc.fs.ls(folder, detail=True)
            if e.get("type") == "file" and e["name"] not in known
            and _stem(e["name"]) in stems and _suffix(e["name"]) not in MEDIA_SUFFIXES]


def collect(src: str | os.PathLike[str], *, hash_threads: int = 4,
            columns: Columns | None = None) -> list[Source]:
    """The clips of ``src`` (see the module docstring), sorted by name: a folder or URL
    prefix, a glob, or a list file (``columns``: which of a table's columns name the clip
    and its caption; by default the first of ``PATH_COLUMNS`` and ``CAPTION_COLUMNS``)."""
    src = str(src)
    if columns is not None and columns.given and _suffix(src) not in TABLE_SUFFIXES:
        raise DatasetError(f"--path-column, --caption-column and --option-column apply to a "
                           f"{'/'.join(TABLE_SUFFIXES)} list of clips, not to {src}")
    if any(c in src for c in "*?["):
        loc = Location.of(src[: min(src.index(c) for c in "*?[" if c in src)].rsplit("/", 1)[0])
        entries = list(loc.fs.glob(Location.of(src).path, detail=True).values())
        return _listing(loc, entries + _sidecars_beside(loc, entries), hash_threads,
                        descend=False)
    loc = Location.of(src)
    try:
        info = loc.fs.info(loc.path)
    except FileNotFoundError:
        raise DatasetError(f"{src} is neither a folder nor a list file") from None
    # A trailing slash means a folder, also where an object has the folder's name.
    if info.get("type") == "directory" or src.endswith("/"):
        return _listing(loc, list(loc.fs.find(loc.path, detail=True).values()), hash_threads)
    if _suffix(loc.path) in MEDIA_SUFFIXES:
        raise DatasetError(f"{src} is one clip, not a dataset: give its folder, a glob or a "
                           "list file (or use ivvae encode)")
    return _from_list(loc, hash_threads, columns or Columns())


@dataclass(frozen=True)
class Columns:
    """Which columns of a table list file (CSV, JSON Lines, a JSON array of objects) name a
    clip and its caption: ``""`` for the first of ``PATH_COLUMNS`` / ``CAPTION_COLUMNS``
    the table has; and ``options``, ``(option, column)`` pairs: the columns that hold a
    row's own preprocessing (``start_s``, ``num_frames``, ...; see ``with_row_options``)."""

    path: str = ""
    caption: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        from .video.preprocess import PREPROCESS_KEYS

        options = [o for o, _ in self.options]
        for option in options:
            if option not in PREPROCESS_KEYS:
                raise DatasetError(f"--option-column {option!r}: not a preprocessing option "
                                   f"(they are {', '.join(PREPROCESS_KEYS)})")
            if options.count(option) > 1:
                raise DatasetError(f"--option-column {option!r} is given twice")
        if any(not column for _, column in self.options):
            raise DatasetError("--option-column OPTION=COLUMN: the column is empty")

    @property
    def given(self) -> bool:
        return bool(self.path or self.caption or self.options)

    @classmethod
    def parse_options(cls, items: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """``--option-column`` values, ``OPTION`` or ``OPTION=COLUMN``."""
        # A column is named as the table spells it: " begin" in "path, begin".
        return tuple((o.strip(), c if sep else o.strip())
                     for o, sep, c in (item.partition("=") for item in items))


TABLE_SUFFIXES = (".csv", ".jsonl", ".json")
# The names training tools use: LTX-2 (media_path, caption), FastVideo (path, cap),
# musubi-tuner's JSONL (video_path, caption), webdataset-style tables (video, text).
PATH_COLUMNS = ("media_path", "video_path", "video", "path", "file_name", "filename", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt", "cap")


def _table(text: str, suffix: str, where: str, columns: Columns
           ) -> list[tuple[str, tuple[tuple[str, bytes], ...], str]]:
    """A table list file's clips, each with the sidecars its row gives (``.txt`` its
    caption, when a string; ``.json`` the whole row) and its own preprocessing
    (canonical, from ``columns.options``)."""
    rows: list[Any]
    try:
        if suffix == ".csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            header = reader.fieldnames or []
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise DatasetError(f"{where}: the header names {', '.join(twice)} twice")
            rows = list(reader)
            for number, row in enumerate(rows, 1):
                if None in row:  # DictReader's key for fields past the header's
                    raise DatasetError(f"{where}: row {number} has more fields than the "
                                       f"header ({len(header)})")
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (ValueError, csv.Error, RecursionError) as exc:  # json recurses on nesting
        raise DatasetError(f"{where} is not a readable {suffix[1:]} table: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{where}: a {suffix[1:]} list of clips is objects (rows), one per "
                           "clip")
    if not rows:
        raise DatasetError(f"{where} holds no clips")
    present = list(dict.fromkeys(k for row in rows for k in row))  # every row's, in order

    def pick(given: str, candidates: tuple[str, ...], what: str) -> str:
        if given:
            if given not in present:
                raise DatasetError(f"{where} has no column {given!r} (its columns: "
                                   f"{', '.join(present) or 'none'})")
            return given
        # The candidate most rows have (a column a few rows add must not win), then the
        # first in the list.
        counts = {c: sum(c in row for row in rows) for c in candidates if c in present}
        found = max(counts, key=lambda c: (counts[c], -candidates.index(c)), default="")
        if not found and what == "path":
            raise DatasetError(f"{where}: no column names the clips (looked for "
                               f"{', '.join(candidates)}; its columns: "
                               f"{', '.join(present) or 'none'}): give --path-column")
        return found

    path_col = pick(columns.path, PATH_COLUMNS, "path")
    caption_col = pick(columns.caption, CAPTION_COLUMNS, "caption")
    for _, column in columns.options:
        pick(column, (), "option")
    out = []
    for number, row in enumerate(rows, 1):
        path = row.get(path_col)
        if path is None or path == "":
            raise DatasetError(f"{where}: row {number} has no {path_col!r}")
        if not isinstance(path, str) or not path.strip():
            raise DatasetError(f"{where}: row {number}'s {path_col!r} is not a path: "
                               f"{path!r}")
        given = []
        caption = row.get(caption_col) if caption_col else None
        if isinstance(caption, str):
            given.append((".txt", caption.encode()))
        given.append((".json", json.dumps(row, ensure_ascii=False, sort_keys=True).encode()))
        out.append((path, tuple(given), _row_options(row, columns, f"{where}: row {number}")))
    return out


_COUNTS = ("start_frame", "num_frames", "max_frames", "stride")


def _row_options(row: Mapping[str, Any], columns: Columns, where: str) -> str:
    """A row's own preprocessing, canonical: each option's column, where the row has a
    value (an empty, blank or null cell gives none). Each value is checked alone here;
    together with the job's options in ``with_row_options`` (a row's ``crop`` needs the
    job's exact size)."""
    from .video.preprocess import Preprocess, canonical_text

    params: dict[str, str] = {}
    for option, column in columns.options:
        value = row.get(column)
        if isinstance(value, list) and option == "bucket":
            value = ",".join(str(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            raise DatasetError(f"{where}: {column!r} is not a value for {option!r}: "
                               f"{value!r}")
        text = "" if value is None else str(value).strip()
        if not text:
            continue
        if option in _COUNTS:
            # A count column with a gap is float to pandas, which writes 9 as "9.0".
            with contextlib.suppress(ValueError, OverflowError):
                number = float(text)
                if number.is_integer():
                    text = str(int(number))
        alone = [(option, text)] + ([("resize", "1x1")] if option == "crop" else [])
        try:
            params[option] = Preprocess.parse(alone).to_params()[option]
        except IVVAEError as exc:
            raise DatasetError(f"{where}: {exc.detail}") from None
    return canonical_text(params)


# Options that say one thing two ways: a row's takes the place of the job's other one.
_ALTERNATIVES = ({"start_frame", "start_s"}, {"num_frames", "max_frames"}, {"stride", "fps"})


def with_row_options(job: str, row: str) -> str:
    """The job's preprocessing (canonical) with a table row's: a row's option takes the
    place of the job's of the same name and of its alternative (a row's ``start_s`` of the
    job's ``start_frame``, its ``num_frames`` of the job's ``max_frames``, its ``fps`` of
    the job's ``stride``); any other contradiction (a row's ``num_frames`` with the job's
    ``bucket``, which sets the frames too) is refused, naming both."""
    from .video.preprocess import Preprocess, canonical_pairs

    if not row:
        return job
    own = dict(canonical_pairs(row))
    replaced = set(own).union(*(group for group in _ALTERNATIVES if group & set(own)))
    merged = {**{k: v for k, v in canonical_pairs(job) if k not in replaced}, **own}
    try:
        return Preprocess.parse(merged).canonical()
    except IVVAEError as exc:
        raise DatasetError(f"the row's options ({row}) with the job's ({job}): "
                           f"{exc.detail}") from None


def _row_suffix(options: str) -> str:
    """What a clip name gets from its row's options (``#start_s=5,num_frames=49``): one
    file may be several clips, a window each. A ``/`` (of a rate) would make a folder."""
    return "#" + options.replace(";", ",").replace("/", "%2F") if options else ""


def _from_list(listing: Location, hash_threads: int, columns: Columns) -> list[Source]:
    fs = listing.fs
    base = Location(fs, posixpath.dirname(listing.path))
    try:
        text = fs.cat_file(listing.path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{listing.url()} is not a list file (not UTF-8 text)") from None
    table: list[tuple[str, tuple[tuple[str, bytes], ...], str]]
    if _suffix(listing.path) in TABLE_SUFFIXES:
        table = _table(text, _suffix(listing.path), listing.url(), columns)
        unit, numbers = "rows", list(range(1, len(table) + 1))
    else:
        # Taken as written, spaces included (names may begin or end with one, as GNU tar's
        # -T reads them); blank lines and lines starting with # are skipped.
        kept = [(number, line) for number, line in enumerate(text.splitlines(), 1)
                if line.strip() and not line.startswith("#")]
        table = [(line, (), "") for _, line in kept]
        unit, numbers = "lines", [number for number, _ in kept]
    entries: list[tuple[str, Location]] = []
    for entry in dict.fromkeys(entry for entry, _, _ in table):
        if "://" in entry:
            entries.append((entry, Location.of(entry)))
        elif listing.local and os.path.isabs(entry):
            entries.append((entry, Location(fs, os.path.normpath(entry))))
        else:
            entries.append((entry, Location(fs, posixpath.normpath(base.join(entry)))))
    # One clip under two spellings (a.mp4, ./a.mp4, its absolute path) is listed twice too;
    # one file in rows with other options is several clips.
    located = {entry: loc.fs.unstrip_protocol(loc.path) for entry, loc in entries}
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for (entry, _, options), number in zip(table, numbers, strict=True):
        where = (located[entry], options)
        if where in seen:
            first, at = seen[where]
            twice = (f"{entry!r} is listed twice" if first == entry
                     else f"{first!r} and {entry!r} are one file, listed twice")
            raise DatasetError(twice + (f" with the options {options.replace(';', ',')}"
                                        if options else "")
                               + f" ({listing.url()}, {unit} {at} and {number})")
        seen[where] = (entry, number)
    # One listing per folder gives sizes, ETags and sidecars; missing files stay missing
    # (they fail as clips, with an io_error, rather than stopping the job).
    sources: list[Source] = []
    by_fs: dict[int, list[tuple[str, Location]]] = {}
    for entry, loc in entries:
        by_fs.setdefault(id(loc.fs), []).append((entry, loc))
    for group in by_fs.values():
        gfs = group[0][1].fs
        infos: dict[str, dict[str, Any]] = {}
        siblings: dict[str, list[str]] = {}
        for folder in sorted({posixpath.dirname(loc.path) for _, loc in group}):
            try:
                listed = gfs.ls(folder, detail=True)
            except OSError:  # no such folder, or a server that lists none
                listed = []
            for info in listed:
                if info.get("type") == "file":
                    infos[info["name"]] = info
                    siblings.setdefault(_stem(info["name"]), []).append(info["name"])
        for _, loc in group:
            if loc.path not in infos:
                with contextlib.suppress(OSError):
                    info = gfs.info(loc.path)
                    if info.get("type") == "file":
                        infos[loc.path] = info
        names = {loc.path: entry for entry, loc in group}
        present = [p for p in names if p in infos]
        root = base if gfs is fs else Location(gfs, "")
        sources += _sources(root, present, infos, siblings, hash_threads, names)
        sources += [Source(entry, gfs.unstrip_protocol(loc.path), "missing",
                           _output_for(base, gfs, loc.path))
                    for entry, loc in group if loc.path not in infos]
    # One source per file; each row is a clip of it under the row's own spelling (one file
    # under two spellings is two rows only with other options: refused above otherwise).
    by_file = {s.url: s for s in sources}
    sources = []
    for entry, given, options in table:
        s = by_file[located[entry]]
        suffix = _row_suffix(options)
        sources.append(replace(s, name=entry + suffix, given=given or s.given,
                               options=options,
                               output=s.output[:-len(LATENT_SUFFIX)] + suffix + LATENT_SUFFIX))
    sources.sort(key=lambda s: s.name)
    _check_unique(sources)
    return sources


def _under(base: Location, fs: Any, path: str) -> str | None:
    """``path`` below ``base``, cut from it (relpath would read "a/../b" in an object key
    as "b", another key); None when it is elsewhere."""
    folder = base.path.rstrip("/") + "/"
    return path[len(folder):] if fs is base.fs and path.startswith(folder) else None


def _output_for(base: Location, fs: Any, path: str) -> str:
    """A source's latent file under OUT: its path below the base folder, else its whole
    URL (``_mirrored``), kept under OUT (``_contained``)."""
    below = _under(base, fs, path)
    return _contained(below if below is not None else _mirrored(fs.unstrip_protocol(path))
                      ) + LATENT_SUFFIX


def _check_unique(sources: Sequence[Source], attrs: Sequence[str] = ("output",)) -> None:
    what = {"output": "output file", "sample_key": "sample key"}
    for attr in attrs:
        seen: dict[str, str] = {}
        for s in sources:
            value = getattr(s, attr)
            if value in seen:
                raise DatasetError(f"{seen[value]!r} and {s.name!r} would share the "
                                   f"{what[attr]} {value!r}; rename one")
            seen[value] = s.name


# -- encoders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the latent .safetensors file
    info: LatentInfo


class ClipEncoder(Protocol):
    async def start(self, model: str = "") -> ModelIdentity: ...
    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class EncoderSpec:
    """How to encode, picklable (a Ray actor builds its encoder from it): through the
    service at ``server``, else in-process with ``weights`` (empty: bundled) on ``device``."""

    server: str = ""
    weights: str = ""
    device: str = "cpu"
    encode_precision: str = "float32"
    torch_threads: int = 0
    api_key: str | None = None
    ca_cert: str | None = None
    timeout: float = 600.0
    retries: int = 6
    # 1: every clip's model steps run alone, so its latent is bit for bit what encoding it
    # alone gives. More batches steps of concurrent clips (faster on a GPU), and float
    # reductions over a batch then differ in the last bits.
    batch_max_size: int = 1

    def build(self) -> ClipEncoder:
        if self.server:
            return ServiceEncoder(self)
        from pydantic import ValidationError

        from .config import Settings, settings_problems

        try:
            settings = Settings(
                backend="local", redis_url="", weights=self.weights, device=self.device,
                encode_precision=self.encode_precision,
                torch_threads=self.torch_threads, cache_memory_max_bytes=0,
                enable_http=False, enable_grpc=False, request_timeout_s=self.timeout,
                batch_max_size=self.batch_max_size)
        except ValidationError as exc:  # the IVVAE_* environment (its limits apply here)
            raise DatasetError("invalid settings for the in-process encoder: "
                               + "; ".join(settings_problems(exc))) from None
        return LocalEncoder(settings)


class LocalEncoder:
    """The model in this process (``ivvae.service.Service`` with the local backend)."""

    def __init__(self, settings: Settings) -> None:
        from .service import Service

        self.service = Service(settings)

    async def start(self, model: str = "") -> ModelIdentity:
        """Load the weights; the identity of ``model`` (empty: the default one)."""
        await self.service.start()
        try:
            info = self.service.pipeline.model(model)
        except IVVAEError as exc:
            raise DatasetError(exc.detail) from exc
        return ModelIdentity(info.name, info.weights_sha256,
                             self.service.settings.encode_precision)

    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded:
        from .pipeline import EncodeOptions
        from .video.preprocess import Preprocess

        result = await self.service.pipeline.encode(source, EncodeOptions(
            model=options.model, sample=options.sample, seed=options.clip_seed(name),
            dtype=options.dtype, include_moments=options.moments,
            preprocess=Preprocess.from_canonical(options.preprocess)))
        return Encoded(result.data, result.info)

    async def close(self) -> None:
        await self.service.close()


class ServiceEncoder:
    """A running ivvae service (gRPC or HTTP), retried on UNAVAILABLE."""

    def __init__(self, spec: EncoderSpec) -> None:
        from .client import AsyncClient, RetryPolicy

        self.client = AsyncClient(spec.server, api_key=spec.api_key, timeout=spec.timeout,
                                  retry=RetryPolicy(attempts=spec.retries + 1),
                                  ca_cert=spec.ca_cert)
        self.identity: ModelIdentity | None = None  # the job's model, from start()

    async def start(self, model: str = "") -> ModelIdentity:
        try:
            models = await self.client.models()
        except (BackendUnavailable, Overloaded, DeadlineExceeded, OSError) as exc:
            raise DatasetError(f"the service at {self.client.url} is unavailable: "
                               f"{getattr(exc, 'detail', exc)}") from exc
        name = model or models.default
        for m in models.models:
            if m.name == name:
                self.identity = ModelIdentity(m.name, m.weights_sha256,
                                              models.encode_precision or "server")
                return self.identity
        raise DatasetError(f"the service serves no model {name!r} (it serves {models.names()})")

    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded:
        from .video.preprocess import Preprocess

        try:
            result = await self.client.encode(
                source, model=options.model, sample=options.sample,
                seed=options.clip_seed(name), dtype=options.dtype, moments=options.moments,
                preprocess=Preprocess.from_canonical(options.preprocess))
        except (BackendUnavailable, Overloaded) as exc:  # already retried: give up the run
            raise DatasetError(
                f"the service at {self.client.url} is unavailable: {exc.detail}") from exc
        except DeadlineExceeded as exc:
            # A slow clip is the clip's failure; a service that answers nothing at all (a
            # stopped or wedged process keeps its socket) would fail every clip after the
            # whole timeout, so a liveness check decides which this was.
            if not await self.client.answers():
                raise DatasetError(
                    f"the service at {self.client.url} gave no answer for {name} "
                    f"({exc.detail}) and does not answer a liveness check either: giving up "
                    "the run (what is encoded is kept; rerun to go on)") from exc
            raise
        made, job = result.info, self.identity
        if job is not None:
            precision = made.extra.get(ENCODE_PRECISION_KEY, job.encode_precision)
            if (made.model_name, made.weights_sha256, precision) != (
                    job.name, job.weights_sha256, job.encode_precision):
                # The service changed under the run (restarted with other weights or
                # precision, or replicas behind one address that differ): one dataset
                # must never mix two models.
                raise DatasetError(
                    f"the service at {self.client.url} encoded {name} with model "
                    f"{made.model_name!r} (weights {made.weights_sha256[:12]}, "
                    f"{precision}), not the job's {job.name!r} (weights "
                    f"{job.weights_sha256[:12]}, {job.encode_precision}) it served at the "
                    "start: giving up the run (nothing of this clip was written). Rerun "
                    "once the service serves the job's model again (to the new one, a "
                    "rerun is another job: --new-version)")
        return Encoded(result.data, result.info)

    async def close(self) -> None:
        await self.client.close()


# -- parts: what one worker publishes at a time ------------------------------------------------


def _now() -> float:
    return round(time.time(), 3)


def ok_record(source: Source, key: str, encoded: Encoded, seconds: float) -> dict[str, Any]:
    info = encoded.info
    return {"source": source.name, "key": key, "identity": source.identity, "status": "ok",
            "shape": list(info.latent_shape), "dtype": info.dtype,
            "frames": info.num_frames, "bytes": len(encoded.data),
            "latent_sha256": hashlib.sha256(encoded.data).hexdigest(),
            "model": info.model_name, "seconds": round(seconds, 3), "at": _now()}


def error_record(source: Source, key: str, code: str, detail: str) -> dict[str, Any]:
    return {"source": source.name, "key": key, "identity": source.identity,
            "status": "error", "error": code, "detail": detail, "at": _now()}


class PartWriter:
    """Collects finished clips into one part and publishes it: the outputs first, then the
    part's record file. ``publish`` starts the next part; records of clips that failed go
    into the record file too (a part may hold only those)."""

    def __init__(self, out: Location, fmt: Format, prefix: str, *, shard_clips: int = SHARD_CLIPS,
                 shard_bytes: int = int(SHARD_MB * 2**20), row_group_clips: int = 64,
                 spool: str | None = None) -> None:
        self.out, self.fmt, self.prefix = out, fmt, prefix
        self.run_id = f"{int(time.time()):010x}{secrets.token_hex(3)}"
        self.shard_clips = shard_clips if fmt != "files" else min(shard_clips, 256)
        self.shard_bytes, self.row_group_clips = shard_bytes, row_group_clips
        self.spool = spool or tempfile.gettempdir()
        self.tag = prefix + "-"
        self.seq = 0
        # Cancelling a coroutine does not stop its thread: one part is touched by one at once.
        self.mutex = threading.Lock()
        self.published: list[str] = []  # parts published by this writer
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.bytes = 0
        self.rows: list[dict[str, Any]] = []
        self.tmp: str | None = None
        self.tar: tarfile.TarFile | None = None

    @property
    def part_name(self) -> str:
        return f"{self.prefix}-{self.run_id}-{self.seq:05d}"

    @property
    def shard_path(self) -> str:
        return self.out.join(SHARDS_DIR, self.part_name + SHARD_SUFFIX[self.fmt])

    @property
    def full(self) -> bool:
        return len(self.records) >= self.shard_clips or self.bytes >= self.shard_bytes

    def add_error(self, record: dict[str, Any]) -> None:
        with self.mutex:
            self.records.append(record)

    def add(self, source: Source, record: dict[str, Any], encoded: Encoded,
            sidecars: dict[str, bytes]) -> None:
        """Stage one clip (``record`` from ``ok_record``; it gains ``part`` and ``member``)."""
        with self.mutex:
            self._add(source, dict(record), encoded, sidecars)

    def _add(self, source: Source, record: dict[str, Any], encoded: Encoded,
             sidecars: dict[str, bytes]) -> None:
        if self.fmt == "files":
            path = self.out.join(source.output)
            publish_bytes(self.out, path, encoded.data, self.tag)
            self.out.fs.invalidate_cache(path)
            record.update(part=source.output, member=None,
                          file=file_identity(self.out.fs.info(path)))
        elif self.fmt == "webdataset":
            record.update(part=posixpath.relpath(self.shard_path, self.out.path),
                          member=source.sample_key)
            self._add_to_tar(source, record, encoded, sidecars)
        else:
            record.update(part=posixpath.relpath(self.shard_path, self.out.path),
                          member=len(self.rows))
            self.rows.append(_parquet_row(source, record, encoded, sidecars))
        self.bytes += len(encoded.data) + sum(len(v) for v in sidecars.values())
        self.records.append(record)

    def _add_to_tar(self, source: Source, record: dict[str, Any], encoded: Encoded,
                    sidecars: dict[str, bytes]) -> None:
        if self.tar is None:
            self.tmp = temp_file_for(self.out, self.shard_path, self.spool, self.tag)
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        meta = {**record, "metadata": encoded.info.to_metadata()}
        members = {LATENT_SUFFIX: encoded.data,
                   RECORD_SUFFIX: json.dumps(meta, sort_keys=True).encode()}
        members.update({suffix: data for suffix, data in sidecars.items()})
        for suffix, data in members.items():
            entry = tarfile.TarInfo(source.sample_key + suffix)
            entry.size, entry.mode, entry.mtime = len(data), 0o644, 0
            self.tar.addfile(entry, io.BytesIO(data))

    def publish(self) -> list[dict[str, Any]]:
        """Publish the staged clips (nothing when none); returns their records."""
        with self.mutex:
            return self._publish()

    def _publish(self) -> list[dict[str, Any]]:
        records = self.records
        if not records:
            return []
        has_outputs = any(r["status"] == "ok" for r in records)
        if has_outputs and self.fmt == "webdataset":
            assert self.tar is not None and self.tmp is not None
            self.tar.close()
            publish_file(self.out, self.tmp, self.shard_path)
        elif has_outputs and self.fmt == "parquet":
            tmp = temp_file_for(self.out, self.shard_path, self.spool, self.tag)
            _write_parquet(tmp, self.rows, self.row_group_clips)
            publish_file(self.out, tmp, self.shard_path)
        publish_bytes(self.out, self.out.join(PARTS_DIR, self.part_name + ".jsonl"),
                      jsonl(records))
        self.published.append(self.part_name)
        self.seq += 1
        self._reset()
        return records

    def abandon(self) -> None:
        """Drop what is staged (an interrupted part: its clips are redone next time)."""
        with self.mutex:
            self._abandon()

    def _abandon(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
        self._reset()


PARQUET_META_COLUMNS = (
    "model_name", "weights_sha256", "scale_factor", "shift_factor", "z_dim", "num_frames",
    "height", "width", "fps", "padding_policy", "content_sha256", "mode", "seed",
    "format_version", "ivvae_version",
)


def _parquet_row(source: Source, record: dict[str, Any], encoded: Encoded,
                 sidecars: dict[str, bytes]) -> dict[str, Any]:
    from .safetensors_io import loads

    tensors, meta = loads(encoded.data)
    row: dict[str, Any] = {"key": source.sample_key, "source": source.name,
                           "clip_key": record["key"]}
    for name in ("latent", "mu", "logvar"):
        t = tensors.get(name)
        row[name] = None if t is None else t.array.tobytes()
    row["shape"] = list(tensors["latent"].shape)
    row["dtype"] = encoded.info.dtype
    for k in PARQUET_META_COLUMNS:
        row[k] = meta.get(k)
    row["metadata"] = json.dumps(meta, sort_keys=True)
    row["sidecars"] = sorted(sidecars.items())
    return row


def parquet_schema() -> Any:
    import pyarrow as pa

    fields = [pa.field("key", pa.string()), pa.field("source", pa.string()),
              pa.field("clip_key", pa.string()), pa.field("latent", pa.binary()),
              pa.field("mu", pa.binary()), pa.field("logvar", pa.binary()),
              pa.field("shape", pa.list_(pa.int64())), pa.field("dtype", pa.string())]
    fields += [pa.field(k, pa.string()) for k in PARQUET_META_COLUMNS]
    fields += [pa.field("metadata", pa.string()),
               pa.field("sidecars", pa.map_(pa.string(), pa.binary()))]
    return pa.schema(fields)


def _write_parquet(path: str, rows: list[dict[str, Any]], row_group_clips: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    # Page checksums: ivvae.data verifies them, so a damaged shard is an error, not a latent.
    pq.write_table(table, path, row_group_size=max(1, row_group_clips),
                   write_page_checksum=True)


# -- the state of an output -------------------------------------------------------------------


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


def jsonl(items: Iterable[Mapping[str, Any]]) -> bytes:
    """JSON lines, compact, as record files and the manifest hold them."""
    return "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items).encode()


def clip_key(source: Source, config: JobConfig) -> str:
    return source.key(config.key, sidecars=config.format != "files")


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
    workers = [_worker_of(name, count) for name, _, _ in listing.clips]

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
    held = _read_job(out, path)
    if held.get("key") == config.key:
        return out
    if not new_version:
        changes = "; ".join(_differences(held.get("config", {}), config.as_dict()))
        raise DatasetError(
            f"{out_url} holds another job (key {str(held.get('key'))[:12]}): {changes}. "
            "Use another OUT, or --new-version to write this one to "
            f"{VERSIONS_DIR}/{config.key[:16]}/ under it")
    return open_output(out.url(out.join(VERSIONS_DIR, config.key[:16])), config)


def _read_job(out: Location, path: str) -> dict[str, Any]:
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
def _locked(out: Location, prefix: str | None) -> Iterator[None]:
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


# -- a run ------------------------------------------------------------------------------------


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
    options: ClipOptions = ClipOptions()
    shard: tuple[int, int] = (0, 1)
    concurrency: int = 4
    shard_clips: int = SHARD_CLIPS
    shard_bytes: int = int(SHARD_MB * 2**20)
    row_group_clips: int = 64
    new_version: bool = False
    columns: Columns = Columns()

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
        _check_unique(sources, ("sample_key",))
    for s in sources:  # a contradiction is the whole job's mistake: before any work
        if s.options:
            try:
                with_row_options(job.options.preprocess, s.options)
            except DatasetError as exc:
                raise DatasetError(f"{s.name}: {exc}") from None
    out = open_output(job.out, config, new_version=job.new_version)
    # Before the clean-up: a second run of the same worker must not remove the first
    # one's temporaries and unrecorded shards while it writes them.
    held.enter_context(_locked(out, job.prefix))
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


def _named(detail: str, copy: Path | None, source: Source) -> str:
    """An error's text naming the source, not the temporary copy it was read from."""
    return detail.replace(str(copy), source.url) if copy is not None else detail


SPOOL_PREFIX = "ivvae-clip-"  # then the pid of the run that spooled it, "-", random


def fetch_clip(source: Source, spool: str | None = None) -> tuple[Path, bool]:
    """A local path of the clip and whether it is a temporary copy (of an object: the
    decoder then streams from disk, so a large object never sits in memory)."""
    loc = Location.of(source.url)
    if loc.local:
        return Path(loc.path), False
    _remove_orphaned_copies(spool or tempfile.gettempdir())
    fd, tmp = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-",
                               suffix=_suffix(loc.path), dir=spool)
    os.close(fd)
    try:
        loc.fs.get_file(loc.path, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp), True


class Copies:
    """Local copies of the remote files a run reads: one that several clips read (the
    windows of one long video, ``--option-column``) is fetched once, by the first of them
    to ask, and removed after the last is done with it, not downloaded again for every
    window; one still downloading when the run stops is removed when it lands. A fetch
    that failed is tried again by the next clip that asks."""

    def __init__(self, sources: Iterable[Source]) -> None:
        uses: dict[str, int] = {}
        for s in sources:
            uses[s.url] = uses.get(s.url, 0) + 1
        # Every remote file, read once or more: a copy still downloading when the run
        # stops is removed when its thread is done, not left in the spool folder.
        self._left = {url: n for url, n in uses.items() if not Location.of(url).local}
        self._held: dict[str, asyncio.Future[tuple[Path, bool]]] = {}

    def shares(self, source: Source) -> bool:
        """Whether ``source``'s copy is held here (every remote file's): removed by
        ``done`` after its last reader, not by the reader itself."""
        return source.url in self._left

    async def fetch(self, source: Source) -> tuple[Path, bool]:
        """``fetch_clip``'s answer, fetched once per remote file."""
        if not self.shares(source):
            return await asyncio.to_thread(fetch_clip, source)
        held = self._held.get(source.url)
        if held is None or (held.done() and held.exception() is not None):
            held = self._held[source.url] = asyncio.ensure_future(
                asyncio.to_thread(fetch_clip, source))
        return await asyncio.shield(held)

    def done(self, source: Source) -> None:
        """``source`` no longer reads its file: the last to read a shared copy removes it."""
        if not self.shares(source):
            return
        self._left[source.url] -= 1
        if self._left[source.url] == 0:
            self._remove(source.url)

    def close(self) -> None:
        """Remove every copy still held (a run stopped before all of its clips read it)."""
        for url in list(self._held):
            self._remove(url)

    def _remove(self, url: str) -> None:
        held = self._held.pop(url, None)
        if held is None:
            return
        if not held.done():  # its thread still downloads: removed when it is done
            held.add_done_callback(self._unlink)
        else:
            self._unlink(held)

    @staticmethod
    def _unlink(held: asyncio.Future[tuple[Path, bool]]) -> None:
        if not held.cancelled() and held.exception() is None:
            path, temporary = held.result()
            if temporary:
                path.unlink(missing_ok=True)


_swept: set[str] = set()


def _remove_orphaned_copies(folder: str) -> None:
    """Once per process and folder: remove the copies of clips that runs killed mid-clip
    left behind (their pid is gone); a node that runs job after job would fill its disk."""
    if folder in _swept:
        return
    _swept.add(folder)
    for path in Path(folder).glob(SPOOL_PREFIX + "*-*"):
        pid = path.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if not strict.is_count(pid) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # alive, another user's: not ours to remove


def read_sidecars(source: Source) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    given = dict(source.given)
    for suffix, url, _ in source.sidecars:
        if suffix not in given:
            loc = Location.of(url)
            out[suffix] = loc.fs.cat_file(loc.path)
    return {**out, **given}


async def encode_clip(encoder: ClipEncoder, source: Source, config: JobConfig,
                      copies: Copies | None = None
                      ) -> tuple[dict[str, Any], Encoded | None, dict[str, bytes]]:
    """Encode one clip: (its record, the latent file or None on failure, its sidecars).
    ``copies``: where remote files are fetched (once for the clips that share one) and
    removed when their readers are done; by default this clip's own."""
    start = time.perf_counter()
    key = clip_key(source, config)
    options, sidecars = config.options, config.format != "files"
    if source.options:
        options = replace(options, preprocess=with_row_options(options.preprocess,
                                                               source.options))
    copy: Path | None = None
    unreadable = read_errors()
    copies = copies if copies is not None else Copies([source])
    try:
        try:
            path, temporary = await copies.fetch(source)
            copy = path if temporary else None
            extra = await asyncio.to_thread(read_sidecars, source) if sidecars else {}
        except unreadable as exc:
            await asyncio.to_thread(_check_store, source.url, exc)
            raise
        encoded = await encoder.encode(path, options, source.name)
        try:
            changed = await asyncio.to_thread(_changed_since_listed, source,
                                              encoded.info.content_sha256, extra)
        except unreadable as exc:
            await asyncio.to_thread(_check_store, source.url, exc)
            raise
        if changed is not None:
            # Recorded under the listed identity, these bytes' latent would be skipped by
            # every rerun, also once the source is back as listed: a failure is retried.
            return error_record(source, key, SOURCE_CHANGED,
                                f"{source.url} changed while it was read ({changed}); a "
                                "rerun encodes it as it is then"), None, {}
    except IVVAEError as exc:
        return error_record(source, key, exc.code, _named(exc.detail, copy, source)), None, {}
    except unreadable as exc:
        return error_record(source, key, "io_error", _named(str(exc), copy, source)), None, {}
    finally:
        copies.done(source)
    return ok_record(source, key, encoded, time.perf_counter() - start), encoded, extra


SOURCE_CHANGED = "source_changed"  # the error code of a clip whose source changed mid-read


def _changed_since_listed(source: Source, content: str, sidecars: Mapping[str, bytes]
                          ) -> str | None:
    """How the clip (or a sidecar) read differs from its listing, or None: by its content
    hash where that is its identity, else by asking the store again (after the read)."""

    def differs(url: str, listed: str, data_sha256: str | None) -> str | None:
        if listed.startswith("sha256:"):
            if data_sha256 is None or data_sha256 == listed.removeprefix("sha256:"):
                return None
            return "its content is not the one listed"
        now = identity(_asked_again(Location.of(url)))
        return None if now == listed else f"listed as {listed}, now {now}"

    if (why := differs(source.url, source.identity, content)) is not None:
        return why
    given = dict(source.given)
    for suffix, url, listed in source.sidecars:
        if suffix in sidecars and suffix not in given:
            data = hashlib.sha256(sidecars[suffix]).hexdigest()
            if (why := differs(url, listed, data)) is not None:
                return f"its {suffix}: {why}"
    return None


def _asked_again(loc: Location) -> dict[str, Any]:
    """``loc``'s info from the store itself: an answer from fsspec's listing cache is
    none."""
    loc.fs.invalidate_cache(loc.path)
    info: dict[str, Any] = loc.fs.info(loc.path)
    return info


def _no_answer(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the store gave no answer at all: a timeout
    or a connection that failed. An error the store answered with (a 503 SlowDown after the
    retries, a 500) is no reason to give a long job up."""
    names = {"ConnectTimeoutError", "ReadTimeoutError", "EndpointConnectionError",
             "ConnectionClosedError"}  # botocore's, which are not all OSErrors
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (TimeoutError, ConnectionError)) or type(seen).__name__ in names:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _check_store(url: str, failure: BaseException) -> None:
    """After reading ``url`` failed with no answer: a DatasetError (giving up the run) if
    its store does not answer a check either. A store that has stopped answering would fail
    every clip after the whole bounded wait (``ivvae.storage``), one by one, for as long as
    the job lasts."""
    loc = Location.of(url)
    if loc.local or not _no_answer(failure):
        return
    try:
        _asked_again(loc)
    except Exception as exc:
        if _no_answer(exc):
            raise DatasetError(
                f"reading {url} failed ({failure}), and its store does not answer a check "
                f"either ({exc}): giving up the run (what is encoded is kept; rerun to go "
                "on)") from exc


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


# -- the command line -------------------------------------------------------------------------


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _index_shard(args: argparse.Namespace) -> tuple[int, int]:
    """``--shard``, or a Kubernetes Indexed Job's pod index and completions."""
    if args.shard is not None:
        i, n = args.shard
        return i, n
    index = os.environ.get("JOB_COMPLETION_INDEX")
    count = os.environ.get("IVVAE_SHARD_COUNT")
    if index is not None and count is not None:
        return _shard(f"{index}/{count}")
    return 0, 1


# Options that mean something only with another: given without it they would be ignored,
# and a run that silently did something else than asked (another model's weights, one
# shard size for files) is worse than a refusal. (option, where it applies, applies?)
_APPLIES: tuple[tuple[tuple[str, ...], str, Callable[[argparse.Namespace], bool]], ...] = (
    (("weights", "device", "encode_precision"),
     "only to the in-process model: with --server the server's model encodes (choose it "
     "with --model)", lambda a: not a.server),
    (("api_key", "ca_cert"), "only with --server", lambda a: bool(a.server)),
    (("address", "workers", "cpus_per_worker", "gpus_per_worker"),
     "only with --engine ray", lambda a: a.engine == "ray"),
)


def _given(value: _T | None, default: _T) -> _T:
    """An option's value, or its default when not given (not ``or``: 0 is a value, and
    refused by name where it is out of range)."""
    return default if value is None else value


def _check_applicable(args: argparse.Namespace) -> None:
    for names, where, applies in _APPLIES:
        given = [n for n in names if getattr(args, n, None) is not None]
        if given and not applies(args):
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise DatasetError(f"{flags} {'applies' if len(given) == 1 else 'apply'} {where}")


def job_from_args(args: argparse.Namespace) -> tuple[Job, EncoderSpec]:
    from .video.preprocess import PREPROCESS_KEYS, Preprocess

    _check_applicable(args)
    if args.ca_cert is not None and not os.path.isfile(args.ca_cert):
        raise DatasetError(f"--ca-cert {args.ca_cert}: no such file")
    params: list[tuple[str, str]] = []
    for name in PREPROCESS_KEYS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value] if value is not None else []:
            params.append((name, str(v)))
    try:
        preprocess = Preprocess.parse(params)
    except IVVAEError as exc:
        raise DatasetError(exc.detail) from exc
    options = ClipOptions(model=args.model, sample=args.sample, seed=args.seed,
                          dtype=args.dtype, moments=args.moments,
                          preprocess="" if preprocess.is_identity else preprocess.canonical())
    job = Job(args.src, args.out, format=args.format, options=options,
              shard=_index_shard(args), concurrency=args.concurrency,
              shard_clips=_given(args.shard_clips, SHARD_CLIPS),
              shard_bytes=int(_given(args.shard_mb, SHARD_MB) * 2**20),
              new_version=args.new_version,
              columns=Columns(args.path_column or "", args.caption_column or "",
                              Columns.parse_options(args.option_column or [])))
    spec = EncoderSpec(server=args.server or "", weights=args.weights or "",
                       device=args.device or "cpu",
                       encode_precision=args.encode_precision or PRECISIONS[0],
                       api_key=args.api_key or os.environ.get("IVVAE_API_KEY"),
                       ca_cert=args.ca_cert, timeout=args.timeout, retries=args.retries)
    return job, spec


class Engine(Protocol):
    """Runs a whole job elsewhere (``ivvae.ray.run_on_ray``)."""

    def __call__(self, job: Job, spec: EncoderSpec, *, address: str | None, workers: int,
                 cpus_per_worker: float, gpus_per_worker: float,
                 summary: Summary) -> Summary: ...


def main(args: argparse.Namespace, engine: Engine | None = None) -> int:
    """The ``encode-dataset`` subcommand (arguments: see ``add_arguments``); ``engine``
    runs it when ``--engine`` is not ``local`` (the CLI passes Ray's: nothing here may
    import it)."""
    summary = Summary()

    def report(code: int) -> int:
        print(json.dumps(summary.as_dict()))
        return code

    try:
        job, spec = job_from_args(args)
        if args.engine != "local":
            if engine is None:
                raise DatasetError(f"--engine {args.engine} is not available here")
            engine(job, spec, address=_given(args.address, "auto"),
                   workers=_given(args.workers, 1),
                   cpus_per_worker=_given(args.cpus_per_worker, 1.0),
                   gpus_per_worker=_given(args.gpus_per_worker, 0.0), summary=summary)
            return report(1 if summary.failed else 0)

        async def run() -> Summary:
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run_job(job, spec.build(), progress=not args.no_progress,
                                 summary=summary)

        asyncio.run(run())
    except DatasetError as exc:
        print(f"encode-dataset: {exc}", file=sys.stderr)
        return report(2) if summary.output else 2  # given up mid-run: what it had done
    except storage_errors() as exc:  # the output failed mid-run (a full disk, no endpoint)
        print(f"encode-dataset: stopped: {exc}; what was published is kept: run it again "
              "to finish", file=sys.stderr)
        return report(2) if summary.output else 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("encode-dataset: interrupted; run it again to finish", file=sys.stderr)
        summary.interrupted = True
        return report(130)
    return report(1 if summary.failed else 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``encode-dataset`` arguments."""
    from .video.preprocess import OPTION_HELP, PREPROCESS_KEYS

    p.add_argument("src", metavar="SRC", help="a folder, URL prefix, glob or list file")
    p.add_argument("out", metavar="OUT", help="a folder or URL prefix")
    p.add_argument("--path-column", help="a .csv/.jsonl/.json list's column naming the clips "
                   f"(default: the first of {', '.join(PATH_COLUMNS)})")
    p.add_argument("--caption-column", help="its column of captions, stored as the .txt "
                   f"sidecar (default: the first of {', '.join(CAPTION_COLUMNS)})")
    p.add_argument("--option-column", action="append", metavar="OPTION[=COLUMN]",
                   help="a preprocessing option each row of a .csv/.jsonl/.json list sets "
                   "for its clip, from its column COLUMN (default: the column named OPTION); "
                   "repeatable. One file in rows with other options is a clip per row: "
                   "windows of a long video (--option-column start_s --option-column "
                   "num_frames)")
    p.add_argument("--format", choices=FORMATS, default="files",
                   help="files: one latent file per video; webdataset: tar shards; parquet: "
                   "parquet shards (default: files)")
    p.add_argument("--server", help="encode through this service: grpc://HOST:PORT, "
                   "HOST:PORT or http(s)://HOST:PORT (default: in-process model)")
    p.add_argument("--weights", help="in-process weights file (default: bundled)")
    p.add_argument("--device", help="in-process torch device (cpu, cuda:0; default: cpu)")
    p.add_argument("--encode-precision", choices=PRECISIONS,
                   help=f"in-process encoder compute precision (default: {PRECISIONS[0]})")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="this worker's share (default: $JOB_COMPLETION_INDEX/"
                   "$IVVAE_SHARD_COUNT when both are set, else 0/1)")
    p.add_argument("--shard-clips", type=int, help="clips per shard; with --format files, "
                   f"per published part of the manifest (default: {SHARD_CLIPS})")
    p.add_argument("--shard-mb", type=float,
                   help=f"MiB per shard (or part) at most (default: {SHARD_MB:g})")
    p.add_argument("--new-version", action="store_true",
                   help="OUT holds a different job: write this one to OUT/versions/<key>/")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: encode actors on a Ray cluster "
                   "(default: local)")
    p.add_argument("--address", help="Ray cluster address (--engine ray; default 'auto': "
                   "the cluster this machine belongs to, 'local': start one here)")
    p.add_argument("--workers", type=int, help="Ray encode actors (default: 1)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per Ray encode actor (default: 1)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="with --device cuda: GPUs per Ray encode actor (e.g. 1; default 0)")
    p.add_argument("--concurrency", type=int, default=4, help="clips in flight (default 4)")
    p.add_argument("--api-key", help="default: $IVVAE_API_KEY")
    p.add_argument("--ca-cert", help="PEM CA bundle for https:// or grpcs:// servers with a "
                   "private CA (default: the system's roots)")
    p.add_argument("--model", default="", help="model name (default: the service's default)")
    p.add_argument("--sample", action="store_true", help="sample the posterior")
    p.add_argument("--seed", type=int, help="seed for --sample (default: drawn per video, "
                   "recorded in each latent)")
    p.add_argument("--dtype", default=PRECISIONS[0], choices=PRECISIONS,
                   help=f"dtype of the stored latents (default: {PRECISIONS[0]})")
    p.add_argument("--moments", action="store_true", help="also store mu and logvar")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per video")
    p.add_argument("--retries", type=int, default=6,
                   help="retries of a video on UNAVAILABLE / no connection (default 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    for name in PREPROCESS_KEYS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=OPTION_HELP[name],
                       action="append" if name == "bucket" else "store")

