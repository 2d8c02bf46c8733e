"""The result cache through HTTP, against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import numpy as np
import redis

from ivvae.cache import CachedMoments, deserialize, serialize
from ivvae.cache.codec import MAGIC, PREAMBLE_BYTES
from tests import media
from tests.redis_server import RedisServer
from tests.service_fixtures import running_app, tiny_settings

VIDEO = media.make_video(None, frames=9, width=24, height=16)


def _post(video: bytes = VIDEO) -> dict[str, object]:
    return {"files": {"file": ("v.mp4", video, "video/mp4")}}


async def test_miss_then_hit_same_bytes_and_shared_by_sampling(
    tiny_weights: Path, redis_server: RedisServer
) -> None:
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url, redis_timeout_s=2.0)
    async with running_app(settings) as client:
        first = await client.post("/encode", **_post())  # type: ignore[arg-type]
        second = await client.post("/encode", **_post())  # type: ignore[arg-type]
        sampled = await client.post("/encode?sample=true&seed=1", **_post())  # type: ignore[arg-type]
        t0 = time.perf_counter()
        await client.post("/encode", **_post())  # type: ignore[arg-type]
        hit_seconds = time.perf_counter() - t0
        ready = (await client.get("/readyz")).json()
    assert first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit" and sampled.headers["x-cache"] == "hit"
    assert second.content == first.content
    assert ready["cache"] == {"name": "redis", "status": "ok"}
    keys = redis.Redis(port=redis_server.port).keys("ivvae:v1:*")
    assert len(keys) == 1  # one entry (the moments) serves mean and sample requests
    assert redis.Redis(port=redis_server.port).ttl(keys[0]) > 0
    assert hit_seconds < 5  # sanity only; latency targets live in bench/


async def test_redis_down_means_miss_not_failure(tiny_weights: Path,
                                                 redis_server: RedisServer) -> None:
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url, redis_timeout_s=2.0,
                             redis_retry_s=0.2)
    async with running_app(settings) as client:
        first = await client.post("/encode", **_post())  # type: ignore[arg-type]
        redis_server.kill()
        during = await client.post("/encode", **_post())  # type: ignore[arg-type]
        ready = await client.get("/readyz")
        redis_server.start()
        await asyncio.sleep(0.2)  # the circuit breaker's retry period
        again = await client.post("/encode", **_post())  # type: ignore[arg-type]
        after = await client.post("/encode", **_post())  # type: ignore[arg-type]
    assert first.status_code == during.status_code == again.status_code == 200
    assert during.headers["x-cache"] == "miss"
    assert during.content == first.content
    assert ready.status_code == 200  # degraded, still ready
    assert ready.json()["cache"]["status"] == "degraded"
    assert again.headers["x-cache"] == "miss"  # the restarted Redis is empty
    assert after.headers["x-cache"] == "hit"


async def test_a_hung_redis_does_not_hold_readiness_for_its_timeout(
    tiny_weights: Path, redis_server: RedisServer
) -> None:
    # With IVVAE_REDIS_TIMEOUT_S=10 each /readyz took 10 s while Redis hung: past any probe
    # timeout (Kubernetes' is 3 s here), every replica unready for an optional cache.
    from ivvae.service import READINESS_CACHE_S

    settings = tiny_settings(tiny_weights, redis_url=redis_server.url, redis_timeout_s=10.0)
    async with running_app(settings) as client:
        assert (await client.get("/readyz")).json()["cache"]["status"] == "ok"
        redis_server.pause()  # SIGSTOP: accepts connections, answers nothing
        try:
            t0 = time.perf_counter()
            ready = await client.get("/readyz")
            seconds = time.perf_counter() - t0
            # The slow answer counts as a failure: requests skip the hung cache now.
            assert not client.app.state.service.cache.breaker.closed  # type: ignore[attr-defined]
        finally:
            redis_server.resume()
    assert ready.status_code == 200 and ready.json()["cache"]["status"] == "degraded"
    assert seconds < READINESS_CACHE_S + 4 < 10  # not the cache's own 10 s timeout


async def test_corrupt_entry_is_ignored_and_replaced(tiny_weights: Path,
                                                     redis_server: RedisServer) -> None:
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url)
    raw = redis.Redis(port=redis_server.port)
    async with running_app(settings) as client:
        first = await client.post("/encode", **_post())  # type: ignore[arg-type]
        (key,) = raw.keys("ivvae:v1:*")
        blob = bytearray(raw.get(key))  # type: ignore[arg-type]
        blob[len(blob) // 2] ^= 0xFF
        raw.set(key, bytes(blob))
        second = await client.post("/encode", **_post())  # type: ignore[arg-type]
        third = await client.post("/encode", **_post())  # type: ignore[arg-type]
    assert second.status_code == 200 and second.headers["x-cache"] == "miss"
    assert second.content == first.content
    assert third.headers["x-cache"] == "hit"
    assert raw.get(key) != bytes(blob)  # replaced by a good entry


async def test_failed_encode_writes_no_cache_entry(tiny_weights: Path,
                                                   redis_server: RedisServer) -> None:
    truncated = media.make_video(None, frames=30, width=64, height=48)
    truncated = truncated[: len(truncated) // 2]
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url)
    async with running_app(settings) as client:
        r = await client.post("/encode", **_post(truncated))  # type: ignore[arg-type]
    assert r.status_code == 422
    assert redis.Redis(port=redis_server.port).keys("ivvae:*") == []


SECRET = "http-cache-test-secret-0123456789"


async def test_forged_entries_are_not_served_but_deleted_and_replaced(
    tiny_weights: Path, redis_server: RedisServer
) -> None:
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url, cache_secret=SECRET)
    raw = redis.Redis(port=redis_server.port)
    async with running_app(settings) as client:
        first = await client.post("/encode", **_post())  # type: ignore[arg-type]
        (redis_key,) = raw.keys("ivvae:v1:*")
        key = redis_key.decode().rsplit(":", 1)[1]
        genuine = raw.get(redis_key)
        assert isinstance(genuine, bytes)
        entry = deserialize(genuine, secret=SECRET.encode(), key=key)

        # 1. mu = 1e6, well-formed, under a recomputed plain sha256 (the old check).
        huge = CachedMoments(mu=np.full_like(entry.mu, 1e6), logvar=entry.logvar,
                             meta=entry.meta)
        forged = bytearray(serialize(huge, secret=b"x" * 32, key=key))
        forged[len(MAGIC) : len(MAGIC) + 32] = hashlib.sha256(
            forged[PREAMBLE_BYTES - 4 :]).digest()
        raw.set(redis_key, bytes(forged))
        after_forgery = await client.post("/encode", **_post())  # type: ignore[arg-type]
        replaced = raw.get(redis_key)

        # 2. Sealed with the right secret (a writer that has it, and a bug): wrong-shape
        # moments for this video, then an absurd mean. Both are a miss, never a 500 or a hit.
        outcomes = []
        for bad in (
            CachedMoments(mu=entry.mu[:, :, :1], logvar=entry.logvar[:, :, :1], meta=entry.meta),
            CachedMoments(mu=np.full_like(entry.mu, 1e6), logvar=entry.logvar, meta=entry.meta),
        ):
            raw.set(redis_key, serialize(bad, secret=SECRET.encode(), key=key))
            r = await client.post("/encode", **_post())  # type: ignore[arg-type]
            outcomes.append((r.status_code, r.headers["x-cache"], r.content == first.content,
                             raw.get(redis_key) == genuine))
        last = await client.post("/encode", **_post())  # type: ignore[arg-type]
    assert after_forgery.status_code == 200 and after_forgery.headers["x-cache"] == "miss"
    assert after_forgery.content == first.content
    assert replaced == genuine  # the forgery was deleted and the real entry written again
    assert outcomes == [(200, "miss", True, True)] * 2
    assert last.headers["x-cache"] == "hit" and last.content == first.content


def _problems(metrics: str) -> dict[str, float]:
    return {line.split('kind="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ivvae_cache_problems_total{")}


async def test_a_cache_that_answers_but_stores_or_serves_nothing_is_not_ok(
        tiny_weights: Path, redis_server: RedisServer) -> None:
    # A full Redis (noeviction) refused every write, and entries of a gateway with another
    # secret were dropped on every read: /readyz said "ok" and /metrics only counted
    # misses, the same as a cache that was merely cold.
    settings = tiny_settings(tiny_weights, redis_url=redis_server.url)
    raw = redis.Redis(port=redis_server.port)
    async with running_app(settings) as client:
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", "1")  # below what it uses: every write refused
        try:
            refused = await client.post("/encode", **_post())  # type: ignore[arg-type]
            ready = (await client.get("/readyz")).json()
            metrics = (await client.get("/metrics")).text
        finally:
            raw.config_set("maxmemory", "0")
        assert refused.status_code == 200 and refused.headers["x-cache"] == "miss"
        assert ready["cache"]["status"] == "degraded", ready
        assert "writes are refused" in ready["cache"]["detail"]
        assert "maxmemory" in ready["cache"]["detail"]
        assert _problems(metrics)["refused"] == 1
        stored = await client.post("/encode", **_post())  # type: ignore[arg-type]
        assert stored.headers["x-cache"] == "miss"
        assert (await client.get("/readyz")).json()["cache"] == {"name": "redis",
                                                                "status": "ok"}
    other = tiny_settings(tiny_weights, redis_url=redis_server.url,
                          cache_secret="another gateway's secret, 32 bytes or more")
    async with running_app(other) as client:
        forged = await client.post("/encode", **_post())  # type: ignore[arg-type]
        assert forged.headers["x-cache"] == "miss" and forged.content == stored.content
        ready = (await client.get("/readyz")).json()
        assert ready["cache"]["status"] == "degraded", ready
        assert "MAC mismatch" in ready["cache"]["detail"]
        assert _problems((await client.get("/metrics")).text)["corrupt"] == 1
