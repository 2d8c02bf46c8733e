"""ResultCache on Redis: one key per entry, ``{prefix}:v1:{key}``, written by one ``SET``.

A single ``SET`` replaces a value atomically, so a reader sees the old blob or the new one,
never part of ours. ``v1`` names the key layout; the blob carries its own format magic.

Failure behaviour: every socket read, write and connect is bounded by ``timeout_s``. A
command that meets a dropped connection (Redis restarted) is retried once on a fresh one;
a timeout is not retried, and it opens the circuit breaker (``ResultCache``), so a hung
Redis costs the requests in flight one ``timeout_s`` and then none until a probe succeeds.
The connection pool reconnects by itself once Redis answers again.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .base import Refused, ResultCache

log = logging.getLogger(__name__)

KEY_LAYOUT = "v1"


class RedisCache(ResultCache):
    """Entries in Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``ttl_s``: expiry of each entry, 0 for none. ``secret``: the MAC key, shared by every
    gateway that uses this Redis. No connection is made until first use.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        max_entry_bytes: int,
        key_prefix: str,
        timeout_s: float,
        secret: bytes,
        retry_after_s: float = 5.0,
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        super().__init__(max_entry_bytes=max_entry_bytes, secret=secret,
                         retry_after_s=retry_after_s)
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # Blobs are binary; decoding them as text would corrupt every entry.
            decode_responses=False,
            # redis-py's default retries with backoff would stretch an outage's cost per
            # request far past timeout_s.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    def redis_key(self, key: str) -> str:
        """The Redis key that holds the entry for ``key``."""
        return f"{self.key_prefix}:{KEY_LAYOUT}:{key}"

    async def _ping(self) -> None:
        if not await self._client.ping():
            raise ConnectionError("Redis did not answer PONG")

    async def close(self) -> None:
        await self._client.aclose()

    async def _load(self, key: str) -> bytes | None:
        try:
            blob = await self._client.get(self.redis_key(key))
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            # Something else wrote another kind of value at our key: it is no entry of
            # ours, and left there it would fail every read of it.
            log.warning("redis cache: dropping %s, which holds no entry: %s", key, exc)
            await self._client.delete(self.redis_key(key))
            return None
        if isinstance(blob, str):
            # A backend fault, not a corrupt entry: the entry must not be deleted for it.
            raise TypeError("Redis answered text: the URL must not set decode_responses")
        return blob

    async def _store(self, key: str, blob: bytes) -> None:
        try:
            await self._client.set(self.redis_key(key), blob, ex=self.ttl_s or None)
        except ResponseError as exc:  # e.g. OOM: maxmemory reached with noeviction
            raise Refused(f"Redis refused the write: {exc}") from exc

    async def _discard(self, key: str, blob: bytes) -> None:
        # Unconditional: a valid entry written since the read would be lost, which costs one
        # recomputation, while a compare-and-delete would send the whole blob back.
        await self._client.delete(self.redis_key(key))
