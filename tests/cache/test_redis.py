"""ivvae.cache.RedisCache against a real redis-server, including outages; and that fixture."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from ivvae.cache import Expected, RedisCache, cache_key
from ivvae.cache.codec import MAGIC, PREAMBLE_BYTES
from tests.cache.helpers import SECRET, assert_same, moments, seal
from tests.redis_server import RedisServer, redis_binary

pytestmark = pytest.mark.redis

TIMEOUT_S = 1.0  # so that a loaded CI machine does not turn a live command into an error
# What one failed get or put may cost: the command's own timeout, with room for a slow CI box.
FAIL_FAST_S = 2 * TIMEOUT_S
TTL_S = 600
RETRY_S = 1.0  # the circuit breaker's retry period (the skips below must fit inside it)


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[RedisCache]:
    cache = RedisCache(
        redis_server.url,
        ttl_s=TTL_S,
        max_entry_bytes=1 << 20,
        key_prefix="test",
        timeout_s=TIMEOUT_S,
        secret=SECRET,
        retry_after_s=RETRY_S,
    )
    yield cache
    await cache.close()


@pytest.fixture
def plain(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A synchronous client to look at and tamper with what the cache wrote."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


async def test_miss_then_hit_with_identical_arrays(cache: RedisCache, plain: redis.Redis) -> None:
    key = cache_key("content", "model", "weights", "float32", "moments-v1")
    value = moments(1, (1, 16, 3, 4, 6))
    assert await cache.get(key) is None
    assert await cache.put(key, value) is True
    assert_same(await cache.get(key), value)
    assert plain.get(f"test:v1:{key}") == seal(value, key)  # one key, the blob as is
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (1, 1, 1)
    assert cache.stats.errors == cache.stats.corrupt == 0
    assert await cache.ping() is True


async def test_entries_expire_after_ttl(cache: RedisCache, plain: redis.Redis) -> None:
    await cache.put("k", moments())
    assert 0 < plain.ttl(cache.redis_key("k")) <= TTL_S


async def test_ttl_zero_means_no_expiry(redis_server: RedisServer, plain: redis.Redis) -> None:
    cache = RedisCache(
        redis_server.url, ttl_s=0, max_entry_bytes=1 << 20, key_prefix="p", timeout_s=TIMEOUT_S,
        secret=SECRET,
    )
    await cache.put("k", moments())
    assert plain.ttl("p:v1:k") == -1  # exists, no expiry
    await cache.close()


async def test_corrupt_value_is_ignored_counted_and_deleted(
    cache: RedisCache, plain: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_key = cache.redis_key("k")
    blob = bytearray(seal(moments()))
    blob[len(blob) // 2] ^= 0x10
    plain.set(redis_key, bytes(blob))
    with caplog.at_level(logging.WARNING, logger="ivvae.cache"):
        assert await cache.get("k") is None
    assert (cache.stats.corrupt, cache.stats.misses, cache.stats.errors) == (1, 1, 0)
    assert plain.exists(redis_key) == 0
    assert "corrupt" in caplog.text
    # Not ours at all: same outcome.
    plain.set(redis_key, b"some other program's value")
    assert await cache.get("k") is None
    assert cache.stats.corrupt == 2 and plain.exists(redis_key) == 0


async def test_another_type_at_our_key_is_a_miss_and_deleted(
        cache: RedisCache, plain: redis.Redis) -> None:
    # Redis answers WRONGTYPE: it used to count as an outage (the circuit opened for every
    # request) and the key was never cleaned up.
    plain.lpush(cache.redis_key("k"), b"a")
    assert await cache.get("k") is None
    assert plain.exists(cache.redis_key("k")) == 0
    assert cache.breaker.allow()
    assert await cache.put("k", moments()) is True
    assert_same(await cache.get("k"), moments())


async def test_a_full_redis_refusing_writes_still_serves_its_entries(
        cache: RedisCache, plain: redis.Redis) -> None:
    # maxmemory with noeviction: SET fails with OOM. That opened the circuit, so entries
    # Redis still held were not served for retry_after_s after every refused write.
    assert await cache.put("old", moments(1)) is True
    plain.config_set("maxmemory-policy", "noeviction")
    plain.config_set("maxmemory", "1")  # below what it uses: every write refused
    try:
        assert await cache.put("new", moments(2)) is False
        assert_same(await cache.get("old"), moments(1))
        assert cache.stats.refused == 1 and cache.stats.errors == 0 and cache.breaker.allow()
        assert "writes are refused" in (cache.trouble() or "")
    finally:
        plain.config_set("maxmemory", "0")


async def test_a_refused_write_as_the_probe_closes_the_circuit(
        cache: RedisCache, plain: redis.Redis, redis_server: RedisServer) -> None:
    # After an outage the first call is the half-open probe; a full Redis refusing it
    # still answered. The probe was left claimed: every call after it skipped the cache
    # until the process restarted, though Redis had room again.
    redis_server.kill()
    assert await cache.get("k") is None  # the outage opens the circuit
    redis_server.start()
    fresh = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    fresh.config_set("maxmemory-policy", "noeviction")
    fresh.config_set("maxmemory", "1")
    await asyncio.sleep(RETRY_S)
    assert await cache.put("k", moments(5)) is False  # the probe, refused
    fresh.config_set("maxmemory", "0")
    fresh.close()
    assert cache.breaker.closed
    assert await cache.put("k", moments(5)) is True
    assert cache.trouble() is None  # a stored write ends the refusal
    assert_same(await cache.get("k"), moments(5))


async def test_forged_entries_are_ignored_and_deleted(
    cache: RedisCache, plain: redis.Redis
) -> None:
    """Whoever can write to Redis but lacks the secret cannot plant latents."""
    key = cache_key("content", "model")
    redis_key = cache.redis_key(key)
    # A well-formed blob whose digest is a plain sha256 (what the unkeyed format checked).
    forged = bytearray(seal(moments(), key))
    forged[len(MAGIC) : len(MAGIC) + 32] = hashlib.sha256(forged[PREAMBLE_BYTES - 4 :]).digest()
    plain.set(redis_key, bytes(forged))
    assert await cache.get(key) is None
    assert plain.exists(redis_key) == 0 and cache.stats.corrupt == 1
    # A genuine entry of another video, copied under this key.
    other = cache_key("other content", "model")
    assert await cache.put(other, moments(2))
    plain.set(redis_key, plain.get(cache.redis_key(other)))
    assert await cache.get(key) is None
    assert plain.exists(redis_key) == 0 and cache.stats.corrupt == 2
    assert_same(await cache.get(other), moments(2))


async def test_sealed_entry_that_does_not_fit_the_request_is_deleted(
    cache: RedisCache, plain: redis.Redis
) -> None:
    # Wrong-shape moments for the model (z=4 stored, z=16 served): one miss, then gone,
    # instead of failing every request for the video for the whole TTL.
    assert await cache.put("k", moments())
    assert await cache.get("k", Expected(z_dim=16)) is None
    assert plain.exists(cache.redis_key("k")) == 0
    assert cache.stats.corrupt == 1


async def test_entry_over_max_size_is_skipped(
    redis_server: RedisServer, plain: redis.Redis
) -> None:
    cache = RedisCache(
        redis_server.url, ttl_s=60, max_entry_bytes=1000, key_prefix="p", timeout_s=TIMEOUT_S,
        secret=SECRET,
    )
    assert len(seal(moments())) > 1000
    assert await cache.put("k", moments()) is False
    assert cache.stats.skipped_too_large == 1 and cache.stats.writes == 0
    assert plain.exists("p:v1:k") == 0
    await cache.close()


async def test_killed_redis_fails_fast_then_recovers(
    cache: RedisCache, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    value = moments(3)
    assert await cache.put("k", value)
    assert await cache.get("k") is not None  # a pooled connection is open now
    redis_server.kill()

    with caplog.at_level(logging.DEBUG, logger="ivvae.cache"):
        start = time.monotonic()
        assert await cache.get("k") is None  # meets the dead server: the circuit opens
        assert time.monotonic() - start < FAIL_FAST_S
        for _ in range(2):  # not tried while open
            assert await cache.get("k") is None
            assert await cache.put("k", value) is False
        assert await cache.ping() is False
    assert cache.stats.errors == 1 and cache.stats.skipped_open == 4
    # One warning for the outage, not one per request.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "answering without the cache" in warnings[0].getMessage()

    redis_server.start()  # same port, empty (no persistence)
    await asyncio.sleep(RETRY_S)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ivvae.cache"):
        assert await cache.ping() is True  # the probe: closes the circuit
        assert await cache.get("k") is None  # a plain miss: the data went with the server
        assert await cache.put("k", value) is True
        assert_same(await cache.get("k"), value)
    assert cache.stats.errors == 1  # no new errors
    assert "answers again" in caplog.text


async def test_stopped_redis_costs_one_timeout_then_is_skipped_and_probed(
    cache: RedisCache, redis_server: RedisServer
) -> None:
    value = moments(4)
    assert await cache.put("k", value)
    redis_server.pause()  # SIGSTOP: accepts connections, answers nothing
    try:
        # Requests in flight when Redis stops each meet one timeout...
        assert await asyncio.gather(cache.get("k"), cache.get("k")) == [None, None]
        assert cache.stats.errors == 2
        # ...and every request after that skips the cache without asking.
        for _ in range(10):
            assert await cache.get("k") is None
            assert await cache.put("k2", value) is False
        assert cache.stats.errors == 2 and cache.stats.skipped_open == 20
        # Once the retry period is over, one request probes while the others skip.
        await asyncio.sleep(RETRY_S)
        results = await asyncio.gather(*(cache.get("k") for _ in range(5)))
        assert results == [None] * 5
        assert cache.stats.errors == 3 and cache.stats.skipped_open == 24
    finally:
        redis_server.resume()
    await asyncio.sleep(RETRY_S)
    assert_same(await cache.get("k"), value)  # the next probe finds it back
    assert cache.breaker.closed
    assert await cache.put("k2", value) is True


async def test_restart_between_commands_is_not_an_error(
    cache: RedisCache, redis_server: RedisServer
) -> None:
    # The pooled connection dies with the server; the next command retries on a new one.
    assert await cache.put("k", moments())
    redis_server.stop()
    redis_server.start()
    assert await cache.get("k") is None
    assert await cache.put("k", moments(5)) is True
    assert_same(await cache.get("k"), moments(5))
    assert cache.stats.errors == 0


async def test_redis_down_from_the_start(redis_server: RedisServer) -> None:
    redis_server.kill()
    cache = RedisCache(
        redis_server.url, ttl_s=60, max_entry_bytes=1 << 20, key_prefix="p", timeout_s=TIMEOUT_S,
        secret=SECRET, retry_after_s=RETRY_S,
    )
    assert await cache.ping() is False
    assert await cache.get("k") is None
    assert await cache.put("k", moments()) is False
    redis_server.start()
    await asyncio.sleep(RETRY_S)
    assert await cache.put("k", moments()) is True
    assert await cache.get("k") is not None
    await cache.close()


# -- the redis_server fixture itself ----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_starts_fast_restarts_on_its_port_and_leaves_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    try:
        start = time.monotonic()
        server.start()
        assert time.monotonic() - start < 5  # sanity only (a loaded CI machine is slow)
        port, pid = server.port, server.pid
        assert pid is not None and _alive(pid)
        with redis.Redis.from_url(server.url) as client:
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
        server.stop()
        assert not server.running and not _alive(pid)
        server.start()
        assert server.port == port and server.running
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        pid = server.pid
    finally:
        server.kill()
    assert pid is not None and not _alive(pid) and not server.running
    server.kill()  # idempotent


async def test_an_unreachable_redis_is_warned_about_by_the_first_ping(
        caplog: pytest.LogCaptureFixture) -> None:
    # Readiness probes ping before any request reads the cache: their failures were logged
    # at debug level and opened the circuit, so no request ever met the failure to warn.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", ttl_s=TTL_S, max_entry_bytes=1 << 20,
                       key_prefix="test", timeout_s=TIMEOUT_S, secret=SECRET,
                       retry_after_s=0.01)
    try:
        with caplog.at_level(logging.DEBUG, logger="ivvae.cache"):
            assert await cache.ping() is False
            await asyncio.sleep(0.02)
            assert await cache.ping() is False  # the probe after retry_after_s
    finally:
        await cache.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "redis cache: ping failed" in warnings[0].getMessage()
