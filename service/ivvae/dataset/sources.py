"""The clips of a job: listing a folder, prefix, glob or list file (a table's rows with
their captions and their own preprocessing), and what names a clip (``Source``: its name,
where to read it, its identity, its output path) and its key."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import IVVAEError
from ..media_types import MEDIA_SUFFIXES
from ..storage import (
    Location,
    content_sha256,
    identity,
)
from .job import LATENT_SUFFIX, DatasetError, JobConfig

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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
        return worker_of(self.name, count)


def worker_of(name: str, count: int) -> int:
    """Which of ``count`` workers (``--shard i/N``) encodes the clip ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count


def suffix_of(path: str) -> str:
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
    media = sorted(p for p in infos if suffix_of(p) in MEDIA_SUFFIXES)
    return _sources(loc, media, infos, siblings, hash_threads, names=None)


def _sources(loc: Location, media: list[str], infos: dict[str, dict[str, Any]],
             siblings: dict[str, list[str]], hash_threads: int,
             names: dict[str, str] | None) -> list[Source]:
    fs = loc.fs

    def ident(path: str) -> str:
        return identity(infos[path]) or "sha256:" + content_sha256(fs, path)

    paths = set(media)
    for m in media:
        paths.update(s for s in siblings.get(_stem(m), []) if suffix_of(s) not in MEDIA_SUFFIXES)
    with ThreadPoolExecutor(max(1, hash_threads)) as pool:
        ids = dict(zip(sorted(paths), pool.map(ident, sorted(paths)), strict=True))
    sources = []
    for m in media:
        name = names[m] if names is not None else under(loc, fs, m) or loc.relative(m)
        sidecars = tuple(sorted(
            (suffix_of(s), fs.unstrip_protocol(s), ids[s])
            for s in siblings.get(_stem(m), []) if suffix_of(s) not in MEDIA_SUFFIXES))
        sources.append(Source(name, fs.unstrip_protocol(m), ids[m], _output_for(loc, fs, m),
                              sidecars))
    sources.sort(key=lambda s: s.name)
    check_unique(sources)
    return sources


def _sidecars_beside(loc: Location, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sidecars of the clips among ``entries`` that ``entries`` lacks: a glob for the
    clips (``*.mp4``) matches none of them, so each clip folder is listed once."""
    clips = [e["name"] for e in entries
             if e.get("type") == "file" and suffix_of(e["name"]) in MEDIA_SUFFIXES]
    stems, known = {_stem(c) for c in clips}, {e["name"] for e in entries}
    return [e for folder in sorted({posixpath.dirname(c) for c in clips})
            for e in loc.fs.ls(folder, detail=True)
            if e.get("type") == "file" and e["name"] not in known
            and _stem(e["name"]) in stems and suffix_of(e["name"]) not in MEDIA_SUFFIXES]


def collect(src: str | os.PathLike[str], *, hash_threads: int = 4,
            columns: Columns | None = None) -> list[Source]:
    """The clips of ``src`` (see the module docstring), sorted by name: a folder or URL
    prefix, a glob, or a list file (``columns``: which of a table's columns name the clip
    and its caption; by default the first of ``PATH_COLUMNS`` and ``CAPTION_COLUMNS``)."""
    src = str(src)
    if columns is not None and columns.given and suffix_of(src) not in TABLE_SUFFIXES:
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
    if suffix_of(loc.path) in MEDIA_SUFFIXES:
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
        from ..video.preprocess import PREPROCESS_KEYS

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
    from ..video.preprocess import Preprocess, canonical_text

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
    from ..video.preprocess import Preprocess, canonical_pairs

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
    if suffix_of(listing.path) in TABLE_SUFFIXES:
        table = _table(text, suffix_of(listing.path), listing.url(), columns)
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
    check_unique(sources)
    return sources


def under(base: Location, fs: Any, path: str) -> str | None:
    """``path`` below ``base``, cut from it (relpath would read "a/../b" in an object key
    as "b", another key); None when it is elsewhere."""
    folder = base.path.rstrip("/") + "/"
    return path[len(folder):] if fs is base.fs and path.startswith(folder) else None


def _output_for(base: Location, fs: Any, path: str) -> str:
    """A source's latent file under OUT: its path below the base folder, else its whole
    URL (``_mirrored``), kept under OUT (``_contained``)."""
    below = under(base, fs, path)
    return _contained(below if below is not None else _mirrored(fs.unstrip_protocol(path))
                      ) + LATENT_SUFFIX


def check_unique(sources: Sequence[Source], attrs: Sequence[str] = ("output",)) -> None:
    what = {"output": "output file", "sample_key": "sample key"}
    for attr in attrs:
        seen: dict[str, str] = {}
        for s in sources:
            value = getattr(s, attr)
            if value in seen:
                raise DatasetError(f"{seen[value]!r} and {s.name!r} would share the "
                                   f"{what[attr]} {value!r}; rename one")
            seen[value] = s.name


def clip_key(source: Source, config: JobConfig) -> str:
    return source.key(config.key, sidecars=config.format != "files")
