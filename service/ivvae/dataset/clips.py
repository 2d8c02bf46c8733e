"""One clip from its source to its record: fetching it (once for the clips of one remote
file), its sidecars, encoding it, and telling a source that changed while it was read, or a
store that stopped answering, from a bad clip."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import strict
from ..errors import IVVAEError
from ..storage import (
    Location,
    identity,
    read_errors,
)
from .encoders import ClipEncoder, Encoded
from .job import DatasetError, JobConfig
from .parts import error_record, ok_record
from .sources import Source, clip_key, suffix_of, with_row_options

if TYPE_CHECKING:
    pass


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
                               suffix=suffix_of(loc.path), dir=spool)
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
