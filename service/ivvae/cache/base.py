"""The ResultCache interface: posterior moments stored under a content key.

The cache is an optimization, so it never fails a request: ``get`` answers a miss and ``put``
answers ``False`` on any trouble (absent or corrupt entry, backend down or slow), and the
trouble is logged on ``ivvae.cache`` and counted in :class:`CacheStats`.

Nor may it slow requests down for long: after a backend failure (a hung Redis costs a full
timeout per command) a circuit breaker skips the backend for ``retry_after_s``; then one
operation probes it while the others keep skipping, and its outcome closes the circuit or
opens it again. So an outage costs the requests in flight when it starts one timeout each,
and later requests nothing.

The semantics live here once; a backend only moves bytes (``_load``, ``_store``,
``_discard``) and may raise whatever its client raises.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, TypeVar

from ..core.tasks import within
from .codec import CachedMoments, CorruptEntry, Expected, check_secret, deserialize, serialize

log = logging.getLogger("ivvae.cache")

# Checksumming and copying a blob this big takes long enough to stall other requests, so it
# runs on a worker thread (hashlib and numpy release the GIL for large buffers).
OFFLOAD_BYTES = 1 << 20

# How long readiness reports entries that failed their check: long enough for a probe to
# see writers that disagree (they meet each other's entries now and then), short enough
# that an upgrade's old entries, replaced as they are read, stop being news.
CORRUPT_RECENT_S = 300.0

_T = TypeVar("_T")
_A = TypeVar("_A")


@dataclass
class CacheStats:
    """Monotonic counters of one cache instance. Prometheus gets the pipeline's view of
    lookups and writes (``ivvae_cache_total`` by outcome), and the reasons below
    (``ivvae_cache_problems_total`` by kind).

    Every ``get`` counts one hit or one miss; ``corrupt`` and ``errors`` say why some misses
    (and failed puts) happened. ``errors``: backend failures (connection, timeout, any client
    error) and values that could not be encoded (non-finite arrays). ``refused``: writes the
    backend answered with a refusal (a full Redis with ``noeviction``, a read-only replica).
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0
    refused: int = 0
    skipped_too_large: int = 0
    skipped_open: int = 0  # operations not tried because the circuit was open
    writes: int = 0

    # Why a lookup missed or a write stored nothing, beyond an absent entry.
    PROBLEMS: ClassVar[tuple[str, ...]] = (
        "corrupt", "errors", "refused", "skipped_open", "skipped_too_large")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def problems(self) -> dict[str, int]:
        """The ``PROBLEMS`` counters, by name (``ivvae_cache_problems_total`` by kind)."""
        return {name: getattr(self, name) for name in self.PROBLEMS}


class CircuitBreaker:
    """Closed until a failure; then open for ``retry_after_s``; then half-open: one caller
    is let through as a probe, and its ``success`` closes the circuit, its ``failure``
    opens it again. Single event loop: no locking needed."""

    def __init__(self, retry_after_s: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        if retry_after_s <= 0:
            raise ValueError(f"retry_after_s must be > 0, got {retry_after_s}")
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._open_until: float | None = None
        self._probing = False

    @property
    def closed(self) -> bool:
        return self._open_until is None

    def allow(self) -> bool:
        """Whether to try the backend now (claims the probe when half-open)."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until = None
        self._probing = False

    def failure(self) -> None:
        self._open_until = self._clock() + self.retry_after_s
        self._probing = False

    def abandon(self) -> None:
        """The allowed call ended without an outcome (cancelled): let another probe."""
        self._probing = False


async def _off_loop(fn: Callable[[_A], _T], arg: _A, nbytes: int) -> _T:
    if nbytes >= OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, arg)
    return fn(arg)


class Refused(Exception):
    """The backend answered, and refused this one command (a full Redis refusing a write):
    not an outage, so it does not open the circuit for the entries it still serves."""


class ResultCache(abc.ABC):
    """Async cache of :class:`CachedMoments` under string keys (see :func:`cache_key`).

    ``max_entry_bytes``: serialized entries larger than this are not stored (``put`` answers
    ``False`` and counts ``skipped_too_large``); 0 stores nothing. ``secret`` keys the MAC
    that seals every entry (see ``codec``); every writer of one store must share it.
    """

    name: str

    def __init__(self, *, max_entry_bytes: int, secret: bytes,
                 retry_after_s: float = 5.0) -> None:
        if max_entry_bytes < 0:
            raise ValueError(f"max_entry_bytes must be >= 0, got {max_entry_bytes}")
        self.max_entry_bytes = max_entry_bytes
        self._secret = check_secret(secret)
        self.breaker = CircuitBreaker(retry_after_s)
        self.stats = CacheStats()
        self._failing = False  # logs a backend outage once, and its end once
        # What readiness reports besides an outage: the last write's refusal (until a write
        # succeeds), and the last entry that failed its check (for CORRUPT_RECENT_S).
        self._refusal: str | None = None
        self._corrupt: tuple[float, str] | None = None

    async def get(self, key: str, expected: Expected | None = None) -> CachedMoments | None:
        """The entry under ``key``, or None (absent, corrupt, backend trouble). Never raises.

        An entry is corrupt when its MAC fails or it does not fit ``expected``; it is
        deleted on sight, so that it costs one miss and the next ``put`` replaces it.
        """
        if not self.breaker.allow():
            self.stats.skipped_open += 1
            self.stats.misses += 1
            return None
        try:
            blob = await self._load(key)
        except Exception as exc:
            self._backend_failed("get", key, exc)
            self.stats.misses += 1
            return None
        except BaseException:
            self.breaker.abandon()
            raise
        self._backend_ok()
        if blob is None:
            self.stats.misses += 1
            return None
        try:
            value = await _off_loop(
                lambda b: deserialize(b, secret=self._secret, key=key, expected=expected),
                blob, len(blob))
        except CorruptEntry as exc:
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._corrupt = (time.monotonic(), str(exc))
            log.warning("%s cache: dropping corrupt entry %s: %s", self.name, key, exc)
            if self.breaker.allow():
                try:
                    await self._discard(key, blob)
                except Exception as discard_exc:
                    self._backend_failed("delete", key, discard_exc)
                except BaseException:
                    self.breaker.abandon()
                    raise
                else:
                    self._backend_ok()
            return None
        except Exception as exc:  # not the entry's fault (e.g. no worker thread at shutdown)
            self.stats.errors += 1
            self.stats.misses += 1
            log.warning("%s cache: could not read %s: %s", self.name, key, exc, exc_info=exc)
            return None
        self.stats.hits += 1
        return value

    async def put(self, key: str, value: CachedMoments) -> bool:
        """Store ``value`` under ``key``, replacing any entry there. True when stored; False
        when skipped (too large, non-finite) or failed. Never raises."""
        try:
            # The arrays alone bound the blob from below: skip a hopeless entry unencoded.
            if value.nbytes > self.max_entry_bytes:
                return self._skip_too_large(key, value.nbytes)
            blob = await _off_loop(
                lambda v: serialize(v, secret=self._secret, key=key), value, value.nbytes)
        except Exception as exc:
            self.stats.errors += 1
            log.warning("%s cache: not storing %s: %s", self.name, key, exc)
            return False
        if len(blob) > self.max_entry_bytes:
            return self._skip_too_large(key, len(blob))
        if not self.breaker.allow():
            self.stats.skipped_open += 1
            return False
        try:
            await self._store(key, blob)
        except Refused as exc:
            # An answer: the backend is up. As the half-open probe, it closes the circuit
            # (left claimed, the probe stopped every later call until a restart).
            self._backend_ok()
            self.stats.refused += 1
            self._refusal = str(exc)
            log.warning("%s cache: not storing %s: %s", self.name, key, exc)
            return False
        except Exception as exc:
            self._backend_failed("put", key, exc)
            return False
        except BaseException:
            self.breaker.abandon()
            raise
        self._backend_ok()
        self.stats.writes += 1
        self._refusal = None
        return True

    def trouble(self) -> str | None:
        """What keeps the cache from working while its backend answers, or None: writes
        refused (nothing new is stored), or entries failing their check lately (writers
        with another ``secret``, which each delete the other's entries, or tampering)."""
        if self._refusal is not None:
            return f"writes are refused: {self._refusal}"
        if self._corrupt is not None:
            at, why = self._corrupt
            if time.monotonic() - at < CORRUPT_RECENT_S:
                return (f"entries failed their check lately ({self.stats.corrupt} so far; "
                        f"the last: {why})")
        return None

    async def ping(self, timeout_s: float | None = None) -> bool:
        """True when the backend answers (within ``timeout_s``, if given: a slower answer
        counts as a failure). Never raises. While the circuit is open it answers False
        without asking, except as the probe (so readiness checks also end an outage)."""
        if not self.breaker.allow():
            return False
        try:
            await (self._ping() if timeout_s is None else within(self._ping(), timeout_s))
        except Exception as exc:  # TimeoutError too
            self._backend_failed("ping", "", exc)
            return False
        except BaseException:
            self.breaker.abandon()
            raise
        self._backend_ok()
        return True

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the backend's connections and memory."""

    # -- what a backend provides ------------------------------------------------------------

    @abc.abstractmethod
    async def _ping(self) -> None:
        """Return when the backend answers; raise otherwise."""

    @abc.abstractmethod
    async def _load(self, key: str) -> bytes | None:
        """The stored blob, or None when absent. May raise backend errors."""

    @abc.abstractmethod
    async def _store(self, key: str, blob: bytes) -> None:
        """Store ``blob`` atomically (a reader sees the old blob or the new, whole). May raise."""

    @abc.abstractmethod
    async def _discard(self, key: str, blob: bytes) -> None:
        """Remove the corrupt ``blob`` read under ``key``. May raise."""

    # -- bookkeeping ------------------------------------------------------------------------

    def _skip_too_large(self, key: str, nbytes: int) -> bool:
        self.stats.skipped_too_large += 1
        log.info(
            "%s cache: not storing %s: %d bytes > max entry %d bytes",
            self.name,
            key,
            nbytes,
            self.max_entry_bytes,
        )
        return False

    def _backend_failed(self, op: str, key: str, exc: Exception) -> None:
        self.stats.errors += 1
        self.breaker.failure()
        # During an outage every request fails the same way: warn once, then only debug.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "%s cache: %s failed (%s: %s); answering without the cache for %g s",
            self.name,
            f"{op} {key}" if key else op,
            type(exc).__name__,
            exc,
            self.breaker.retry_after_s,
            # The first failure of an outage carries its traceback: it may be a bug, not a
            # network problem.
            exc_info=exc if level == logging.WARNING else None,
        )

    def _backend_ok(self) -> None:
        self.breaker.success()
        if self._failing:
            self._failing = False
            log.info("%s cache: backend answers again", self.name)
