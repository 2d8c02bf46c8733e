"""Long clips cut into windows of a fixed length, as musubi-tuner's ``chunk``, ``slide`` and
``uniform`` frame extraction cut them, for a training pipeline that takes N frames a sample.

    ivvae windows clips/ windows.csv --num-frames 49 --fps 24           # back to back
    ivvae windows clips.csv windows.csv --num-frames 49 --step 24        # overlapping
    ivvae windows s3://raw/clips/ windows.jsonl --num-frames 17 --count 3  # 3 spread out
    ivvae encode-dataset windows.csv OUT --fps 24 \\
        --option-column start_s --option-column num_frames

``ivvae windows SRC TABLE`` reads each clip of ``SRC`` (anything ``encode-dataset`` lists),
counts the frames it gives under the job's ``--stride`` or ``--fps`` exactly as encoding
reads them (``VideoReader.count_frames``: every frame decoded, none converted), and writes
``TABLE`` (``.csv`` or ``.jsonl``) with one row per window: the clip's path, where the
window starts (``start_frame``, or ``start_s`` with ``--fps``: the exact time of its first
output frame, as a fraction) and ``num_frames``. ``encode-dataset`` then encodes each row as
a clip of its own (``--option-column``; its name is ``<path>#<window>``), with the job's
other options (``--resize``, ``--crop``; a job ``--bucket`` of the same frame count takes
``start_s`` or ``start_frame`` alone).

A table ``SRC`` keeps its rows (captions and every other column) in each of its windows,
its path column rewritten; a clip in a folder keeps its sidecars, which ``encode-dataset``
finds beside it, except its ``.json``: a table's row is the ``.json`` of what it encodes, so
the clip's ``.json`` object becomes columns of its windows' rows. Paths are written relative
to ``TABLE``'s folder when the clip lies below it, else whole. A clip shorter than one
window has none (counted, not an error); one that cannot be read, or is past the encoder's
source limits (``IVVAE_MAX_SOURCE_SECONDS``, ``IVVAE_MAX_SOURCE_PIXELS``), is named on
stderr and left out (exit 1). The summary on stdout ends with the ``encode-dataset``
command that reads the table.

Counting is its own step so that a dataset is read for it once, not by every worker of a
sharded job at every start, and so the windows are a file to check, edit and keep beside the
latents: a rerun of ``encode-dataset`` on the same table resumes, and one window's caption
can be changed alone.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import posixpath
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import IVVAEError, TooLarge
from ..storage import Location, publish_bytes, read_errors, storage_errors
from .clips import fetch_clip
from .job import DatasetError
from .sources import (
    PATH_COLUMNS,
    TABLE_SUFFIXES,
    Columns,
    Source,
    collect,
    suffix_of,
    under,
)

WINDOW_COLUMNS = ("start_frame", "start_s", "num_frames")
OUTPUT_SUFFIXES = (".csv", ".jsonl")
# Only the frame count matters here: the limits that keep a service's memory bounded would
# refuse the long clips this is for. Frames are decoded one at a time and never converted.
_MAX_FRAMES = 2**31 - 1
_MAX_PIXELS = 16384 * 16384


def window_starts(frames: int, length: int, *, step: int | None = None,
                  count: int | None = None) -> list[int]:
    """The first output frame of each window of ``length`` frames in a clip of ``frames``:
    every ``step`` frames from the first (by default ``length``: back to back), or ``count``
    windows spread evenly from the first frame to the last window that fits (fewer when
    the clip has fewer distinct ones). None when the clip is shorter than ``length``."""
    if frames < length:
        return []
    last = frames - length
    if count is not None:
        if count == 1:
            return [0]
        return sorted({round(i * last / (count - 1)) for i in range(count)})
    return list(range(0, last + 1, step or length))


def window_start(first: int, stride: int | None, fps: Fraction | None
                 ) -> tuple[str, str | int]:
    """The row option that makes a window begin at output frame ``first`` of the clip read
    with the job's ``stride`` or ``fps``: with ``fps``, ``start_s`` at that frame's time
    (``first / fps``, exact, so the window's frames are the clip's from ``first`` on);
    else ``start_frame`` at its source frame (``first * stride``)."""
    if fps is not None:
        return "start_s", _fraction(Fraction(first) / fps)
    return "start_frame", first * (stride or 1)


def _fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def count_frames(path: str | os.PathLike[str], stride: int | None, fps: Fraction | None, *,
                 max_source_pixels: int | None = None,
                 max_source_seconds: float | None = None) -> int:
    """The output frames of the clip at ``path`` under ``stride`` or ``fps``; a clip past
    the source limits (the encoder's, ``IVVAE_MAX_SOURCE_*``) is ``TooLarge``, as encoding
    any window of it would be."""
    from ..video.preprocess import Preprocess
    from ..video.reader import VideoLimits, open_video

    limits = VideoLimits(max_frames=_MAX_FRAMES, max_pixels=_MAX_PIXELS,
                         max_source_pixels=max_source_pixels,
                         max_source_seconds=max_source_seconds)
    with open_video(path, limits=limits, preprocess=Preprocess(stride=stride, fps=fps)) as r:
        return r.count_frames()


@dataclass(frozen=True)
class Counted:
    source: Source
    frames: int | None  # None: unreadable
    error: str = ""
    # A folder clip's .json sidecar, parsed: its window rows carry it, since a table row
    # becomes the .json of what encode-dataset makes of it (in place of the file beside).
    sidecar: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reading:
    """How clips are counted: the job's time options and the encoder's source limits."""

    stride: int | None = None
    fps: Fraction | None = None
    max_source_pixels: int | None = None
    max_source_seconds: float | None = None


def _count(source: Source, how: Reading) -> Counted:
    unreadable = read_errors()
    copy = None
    try:
        sidecar = _json_sidecar(source)
        path, temporary = fetch_clip(source)
        copy = path if temporary else None
        return Counted(source, count_frames(path, how.stride, how.fps,
                                            max_source_pixels=how.max_source_pixels,
                                            max_source_seconds=how.max_source_seconds),
                       sidecar=sidecar)
    except TooLarge as exc:
        return Counted(source, None, f"{exc.detail} (the encoder's limit, "
                                     "IVVAE_MAX_SOURCE_SECONDS / IVVAE_MAX_SOURCE_PIXELS: "
                                     "raise it here and for encode-dataset)")
    except IVVAEError as exc:
        return Counted(source, None, exc.detail)
    except unreadable as exc:
        return Counted(source, None, str(exc))
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)


def _json_sidecar(source: Source) -> dict[str, Any] | None:
    """The clip's own ``.json`` file beside it, as an object (anything else as ``{"json":
    its text}``); None without one, or for a table's row (already the row)."""
    if ".json" in dict(source.given):
        return None
    url = next((u for suffix, u, _ in source.sidecars if suffix == ".json"), None)
    if url is None:
        return None
    loc = Location.of(url)
    text = loc.fs.cat_file(loc.path).decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"json": text}


def _path_column(row: dict[str, Any], source: Source, given: str) -> str:
    """The column of a table row that names its clip (as ``collect`` read it)."""
    if given:
        return given
    return next((c for c in PATH_COLUMNS if row.get(c) == source.name), "path")


def _written_path(source: Source, table: Location) -> str:
    """How ``TABLE`` names the clip: relative to its folder when the clip lies below it,
    else whole (a local path without ``file://``)."""
    clip = Location.of(source.url)
    below = under(Location(table.fs, posixpath.dirname(table.path)), clip.fs, clip.path)
    if below is not None:
        return below
    return clip.path if clip.local else source.url


def window_rows(counted: Sequence[Counted], table: Location, length: int, *,
                step: int | None, count: int | None, stride: int | None,
                fps: Fraction | None, path_column: str = "") -> list[dict[str, Any]]:
    """The rows of ``TABLE``: each readable clip's windows, in order."""
    rows: list[dict[str, Any]] = []
    for c in counted:
        if c.frames is None:
            continue
        given = dict(c.source.given)
        own = json.loads(given[".json"]) if ".json" in given else dict(c.sidecar or {})
        column = _path_column(own, c.source, path_column)
        clash = sorted(set(own) & {*WINDOW_COLUMNS, *([] if ".json" in given else [column])})
        if clash:
            where = "row" if ".json" in given else ".json sidecar"
            raise DatasetError(f"{c.source.name}: its {where} has a column {clash[0]!r}, "
                               "which the windows write: rename it")
        # The clip first, its own columns, then the window's (a table's row comes with its
        # columns sorted: that is how encode-dataset keeps it).
        rest = {k: v for k, v in own.items() if k != column}
        path = _written_path(c.source, table)
        for first in window_starts(c.frames, length, step=step, count=count):
            name, value = window_start(first, stride, fps)
            rows.append({column: path, **rest, name: value, "num_frames": length})
    return rows


def render(rows: Sequence[dict[str, Any]], suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    header = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return text.getvalue().encode()


def _cell(value: Any) -> Any:
    """A table cell in a CSV: JSON for what is not text or a number (a row's list, object
    or boolean; null is an empty cell, as encode-dataset reads one)."""
    if value is None or isinstance(value, str) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    return json.dumps(value, ensure_ascii=False)


def main(args: argparse.Namespace) -> int:
    """The ``windows`` subcommand: 0 every clip read, 1 some could not be, 2 no table."""
    stopped: tuple[type[BaseException], ...] = (DatasetError, *storage_errors())
    try:
        return _main(args)
    except stopped as exc:
        print(f"windows: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from ..video.preprocess import Preprocess

    suffix = posixpath.splitext(args.table)[1].lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DatasetError(f"{args.table}: the table is a {' or '.join(OUTPUT_SUFFIXES)} file")
    for name in ("num_frames", "step", "count", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DatasetError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.step is not None and args.count is not None:
        raise DatasetError("--step and --count are two ways to place windows: give one")
    params = [(n, str(v)) for n, v in (("stride", args.stride), ("fps", args.fps))
              if v is not None]
    try:
        time = Preprocess.parse(params)
    except IVVAEError as exc:
        raise DatasetError(exc.detail) from None
    how = Reading(time.stride, time.fps, *_source_limits())
    table = Location.of(args.table)
    if suffix_of(args.src) in TABLE_SUFFIXES and _same_file(Location.of(args.src), table):
        raise DatasetError(f"{args.table} is the source table: write the windows elsewhere")
    columns = Columns(args.path_column or "")
    sources = collect(args.src, columns=columns if columns.given else None)
    with ThreadPoolExecutor(args.threads or 4) as pool:
        counted = list(pool.map(lambda s: _count(s, how), sources))
    for c in counted:
        if c.frames is None:
            print(f"windows: {c.source.name}: not read: {c.error}", file=sys.stderr)
    rows = window_rows(counted, table, args.num_frames, step=args.step, count=args.count,
                       stride=time.stride, fps=time.fps, path_column=args.path_column or "")
    failed = sum(c.frames is None for c in counted)
    short = sum(c.frames is not None and c.frames < args.num_frames for c in counted)
    if not rows:
        raise DatasetError(f"no clip of {args.src} gives {args.num_frames} frames"
                           + (f" ({failed} could not be read)" if failed else "")
                           + ": no table written")
    publish_bytes(table, table.path, render(rows, suffix))
    start = "start_s" if time.fps is not None else "start_frame"
    encode = ["ivvae", "encode-dataset", args.table, "OUT"]
    for name, value in params:
        encode += [f"--{name}", value]
    if args.path_column:
        encode += ["--path-column", args.path_column]
    encode += ["--option-column", start, "--option-column", "num_frames"]
    print(json.dumps({
        "clips": len(sources), "windows": len(rows), "too_short": short, "failed": failed,
        "table": table.url(), "encode": shlex.join(encode),
    }))
    return 1 if failed else 0


def _source_limits() -> tuple[int, float]:
    """The source limits the in-process encoder applies (``IVVAE_MAX_SOURCE_PIXELS``,
    ``IVVAE_MAX_SOURCE_SECONDS``): a clip past them has no window it could encode."""
    from pydantic import ValidationError

    from ..config import Settings, settings_problems

    try:
        settings = Settings(enable_http=False, enable_grpc=False)
    except ValidationError as exc:
        raise DatasetError("invalid settings: " + "; ".join(settings_problems(exc))) from None
    return settings.max_source_pixels, settings.max_source_seconds


def _same_file(a: Location, b: Location) -> bool:
    """Whether two spellings name one file (``t/../t/x.csv``, a link to it)."""
    if a.local and b.local:
        return os.path.realpath(a.path) == os.path.realpath(b.path)
    return type(a.fs) is type(b.fs) and posixpath.normpath(a.path) == posixpath.normpath(b.path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``windows`` arguments."""
    p.add_argument("src", metavar="SRC", help="a folder, URL prefix, glob or list file (as "
                   "for encode-dataset)")
    p.add_argument("table", metavar="TABLE", help="the table to write: a .csv or .jsonl "
                   "file, local or a URL")
    p.add_argument("--num-frames", type=int, required=True,
                   help="frames a window (1 + 4k fill whole latent frames: 17, 49, 121)")
    p.add_argument("--step", type=int, help="frames from one window's start to the next's "
                   "(default: --num-frames, back to back; less overlaps them)")
    p.add_argument("--count", type=int, help="instead of --step: this many windows a clip, "
                   "spread evenly from its start to its end")
    p.add_argument("--stride", type=int, help="the job's --stride: windows count every k-th "
                   "frame")
    p.add_argument("--fps", help="the job's --fps: windows count frames at this rate "
                   "(e.g. 24, 30000/1001)")
    p.add_argument("--path-column", help="a table SRC's column naming the clips (default: "
                   f"the first of {', '.join(PATH_COLUMNS)})")
    p.add_argument("--threads", type=int, help="clips read at once (default 4)")
