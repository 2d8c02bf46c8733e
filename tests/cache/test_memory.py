"""ivvae.cache.MemoryCache: LRU by bytes, size limits, corruption, concurrency; create_cache."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from ivvae.cache import (
    CachedMoments,
    MemoryCache,
    RedisCache,
    cache_key,
    cache_secret,
    create_cache,
)
from ivvae.cache.base import CircuitBreaker
from ivvae.config import Settings
from tests.cache.helpers import SECRET, assert_same, moments, seal

ENTRY_BYTES = len(seal(moments()))  # every moments(seed) of the default shape


def test_entries_of_one_shape_have_one_size() -> None:
    assert {len(seal(moments(seed))) for seed in (0, 7, 99, 12345)} == {ENTRY_BYTES}


async def test_miss_then_hit_with_identical_arrays() -> None:
    cache = MemoryCache(max_bytes=10 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    assert cache.name == "memory"
    value = moments(1)
    assert await cache.get("k") is None
    assert await cache.put("k", value) is True
    assert_same(await cache.get("k"), value)
    assert cache.stats.as_dict() == {
        "hits": 1,
        "misses": 1,
        "corrupt": 0,
        "errors": 0,
        "refused": 0,
        "skipped_too_large": 0,
        "skipped_open": 0,
        "writes": 1,
    }
    assert await cache.ping() is True


async def test_hits_are_independent_copies() -> None:
    cache = MemoryCache(max_bytes=10 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    value = moments(2)
    await cache.put("k", value)
    first = await cache.get("k")
    assert first is not None
    first.mu[...] = 0.0  # a caller scribbling on its result...
    value.logvar[...] = 0.0  # ...or on what it stored
    assert_same(await cache.get("k"), moments(2))  # ...changes nothing cached


async def test_lru_evicts_least_recently_used_by_bytes() -> None:
    cache = MemoryCache(max_bytes=3 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    for name in "abc":
        assert await cache.put(name, moments(ord(name)))
    assert cache.total_bytes == 3 * ENTRY_BYTES
    assert await cache.get("a") is not None  # a is now the most recently used
    assert await cache.put("d", moments(4))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert await cache.get("b") is None
    assert await cache.put("e", moments(5))  # c is the oldest now
    assert "c" not in cache and "a" in cache
    assert len(cache) == 3 and cache.total_bytes == 3 * ENTRY_BYTES


async def test_replacing_an_entry_counts_its_bytes_once() -> None:
    cache = MemoryCache(max_bytes=2 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    for seed in range(5):
        assert await cache.put("same", moments(seed))
    assert len(cache) == 1 and cache.total_bytes == ENTRY_BYTES
    assert_same(await cache.get("same"), moments(4))


async def test_budget_evicts_several_small_entries_for_a_big_one() -> None:
    big = moments(9, (1, 4, 6, 3, 5))  # three times the arrays of a small one
    big_bytes = len(seal(big))
    cache = MemoryCache(max_bytes=big_bytes + ENTRY_BYTES, max_entry_bytes=big_bytes, secret=SECRET)
    for name in "abc":
        await cache.put(name, moments(ord(name)))
    assert await cache.put("big", big)
    assert "a" not in cache and "b" not in cache and "c" in cache and "big" in cache
    assert cache.total_bytes <= cache.max_bytes


async def test_entry_over_max_entry_bytes_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    cache = MemoryCache(max_bytes=100 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES - 1, secret=SECRET)
    with caplog.at_level(logging.INFO, logger="ivvae.cache"):
        assert await cache.put("k", moments()) is False
    assert "k" not in cache and cache.total_bytes == 0
    assert cache.stats.skipped_too_large == 1 and cache.stats.writes == 0
    assert "max entry" in caplog.text
    # Exactly at the limit is fine.
    at_limit = MemoryCache(max_bytes=100 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    assert await at_limit.put("k", moments()) is True


async def test_entry_over_the_whole_budget_is_skipped_and_evicts_nothing() -> None:
    cache = MemoryCache(max_bytes=ENTRY_BYTES, max_entry_bytes=100 * ENTRY_BYTES, secret=SECRET)
    await cache.put("small", moments())
    assert await cache.put("big", moments(1, (1, 4, 4, 3, 5))) is False
    assert "small" in cache and cache.stats.skipped_too_large == 1


async def test_zero_budget_stores_nothing() -> None:
    cache = MemoryCache(max_bytes=0, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    assert await cache.put("k", moments()) is False
    assert await cache.get("k") is None


async def test_non_finite_value_is_not_stored(caplog: pytest.LogCaptureFixture) -> None:
    cache = MemoryCache(max_bytes=10 * ENTRY_BYTES, max_entry_bytes=10 * ENTRY_BYTES, secret=SECRET)
    value = moments()
    value.mu[0, 0, 0, 0, 0] = np.nan
    with caplog.at_level(logging.WARNING, logger="ivvae.cache"):
        assert await cache.put("k", value) is False
    assert "k" not in cache and cache.stats.errors == 1
    assert "non-finite" in caplog.text


async def test_corrupt_entry_is_a_counted_miss_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = MemoryCache(max_bytes=10 * ENTRY_BYTES, max_entry_bytes=10 * ENTRY_BYTES, secret=SECRET)
    blob = bytearray(seal(moments()))
    blob[-1] ^= 0x80
    await cache._store("k", bytes(blob))  # as if memory had been damaged
    with caplog.at_level(logging.WARNING, logger="ivvae.cache"):
        assert await cache.get("k") is None
    assert "k" not in cache and cache.total_bytes == 0
    assert (cache.stats.corrupt, cache.stats.misses, cache.stats.hits) == (1, 1, 0)
    assert "MAC mismatch" in caplog.text


async def test_large_entries_round_trip_off_the_event_loop() -> None:
    value = moments(7, (1, 16, 5, 64, 64))  # 1.3 MB per array: serialized on a worker thread
    cache = MemoryCache(max_bytes=1 << 24, max_entry_bytes=1 << 24, secret=SECRET)
    assert await cache.put("big", value)
    assert_same(await cache.get("big"), value)


async def test_concurrent_tasks_see_whole_entries() -> None:
    cache = MemoryCache(max_bytes=8 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    values = {f"k{i}": moments(i) for i in range(16)}

    async def worker(key: str, value: CachedMoments) -> None:
        for _ in range(5):
            await cache.put(key, value)
            got = await cache.get(key)
            if got is not None:  # evicted by a neighbour is fine; a mixed entry is not
                assert_same(got, value)

    await asyncio.gather(*(worker(k, v) for k, v in values.items()))
    assert cache.total_bytes <= cache.max_bytes
    assert cache.stats.errors == cache.stats.corrupt == 0


async def test_close_drops_everything() -> None:
    cache = MemoryCache(max_bytes=10 * ENTRY_BYTES, max_entry_bytes=ENTRY_BYTES, secret=SECRET)
    await cache.put(cache_key("a"), moments())
    await cache.close()
    assert len(cache) == 0 and cache.total_bytes == 0


def test_negative_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        MemoryCache(max_bytes=-1, max_entry_bytes=1, secret=SECRET)
    with pytest.raises(ValueError):
        MemoryCache(max_bytes=1, max_entry_bytes=-1, secret=SECRET)


async def test_create_cache_picks_the_backend_from_settings() -> None:
    memory = create_cache(
        Settings(redis_url="", cache_memory_max_bytes=1234, cache_max_entry_bytes=99)
    )
    assert isinstance(memory, MemoryCache)
    assert (memory.max_bytes, memory.max_entry_bytes) == (1234, 99)
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",  # nothing listens: creating must not connect
        cache_ttl_s=60,
        cache_key_prefix="test",
        redis_timeout_s=0.25,
    )
    redis_cache = create_cache(settings)
    assert isinstance(redis_cache, RedisCache) and redis_cache.name == "redis"
    assert (redis_cache.ttl_s, redis_cache.timeout_s) == (60, 0.25)
    assert redis_cache.redis_key("abc") == "test:v1:abc"
    await redis_cache.close()


# -- the MAC secret of a shared cache -------------------------------------------------------


def test_configured_secret_is_used_and_checked(tmp_path: Path) -> None:
    settings = Settings(cache_secret="0123456789abcdef-configured",
                        cache_secret_file=str(tmp_path / "unused"))
    assert cache_secret(settings) == b"0123456789abcdef-configured"
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="16"):
        Settings(cache_secret="short")


def test_secret_file_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cache-secret"
    settings = Settings(cache_secret_file=str(path))
    first = cache_secret(settings)
    assert len(first) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert cache_secret(settings) == first  # a restart keeps the deployment's secret
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    other = Settings(cache_secret_file=str(tmp_path / "elsewhere"))
    assert cache_secret(other) != first


def test_an_unwritable_default_secret_file_falls_back_to_a_process_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"  # a read-only root filesystem, in effect
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))
    with caplog.at_level(logging.WARNING, logger="ivvae.cache"):
        one, two = cache_secret(Settings()), cache_secret(Settings())
    assert len(one) == 32 and one != two
    assert "IVVAE_CACHE_SECRET" in caplog.text


def test_a_secret_file_named_by_the_operator_must_be_usable(tmp_path: Path) -> None:
    # A per-process secret in its place meant replicas evicting each other's entries as
    # "corrupt", behind one warning line.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="IVVAE_CACHE_SECRET_FILE"):
        cache_secret(Settings(cache_secret_file=str(blocker / "cache-secret")))
    short = tmp_path / "cache-secret"
    short.write_text("abc")  # too short to trust
    with pytest.raises(ValueError, match=r"IVVAE_CACHE_SECRET_FILE .*16"):
        cache_secret(Settings(cache_secret_file=str(short)))


# -- the circuit breaker (its use with a real, failing Redis is in test_redis) ----------------


def test_breaker_opens_on_failure_then_lets_one_probe_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker(5.0, clock=lambda: now[0])
    assert breaker.closed and breaker.allow() and breaker.allow()
    breaker.failure()
    assert not breaker.closed and not breaker.allow()
    now[0] = 4.9
    assert not breaker.allow()
    now[0] = 5.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its outcome
    breaker.failure()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.abandon()  # cancelled probe: the next caller probes instead
    assert breaker.allow()
    breaker.success()
    assert breaker.closed and breaker.allow() and breaker.allow()
    with pytest.raises(ValueError):
        CircuitBreaker(0)
