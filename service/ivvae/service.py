"""The running service: settings -> metrics, backend, result cache, pipeline.

Both transports (HTTP and gRPC) and the CLI serve one ``Service``; ``ivvae serve`` starts it
once and hands it to each. Transports use what it exposes (``pipeline``, ``models``,
``readiness``, ``metrics``, ``settings``), never the backend behind it. Nothing is created
at import time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import memory
from .backends import Backend, create_backend
from .cache import MemoryCache, ResultCache, create_cache
from .config import Settings
from .core.model_info import ModelInfo
from .metrics import Metrics
from .pipeline import Pipeline

log = logging.getLogger("ivvae.service")

READINESS_CACHE_S = 1.0  # how long a readiness check waits for the result cache


async def _not_yet() -> tuple[bool, str]:
    return False, "starting"


class Service:
    def __init__(self, settings: Settings, *, backend: Backend | None = None,
                 cache: ResultCache | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.backend = backend or create_backend(settings, self.metrics)
        self.cache = cache or create_cache(settings)
        self.metrics.watch_cache(lambda: self.cache.stats.problems())
        self.pipeline = Pipeline(settings, self.backend, self.cache, self.metrics)
        self.started = False
        # Set when the server is told to stop: what is cancelled after it is answered as
        # "shutting down" (a 503 to retry), not as an error.
        self.stopping = False

    async def start(self) -> None:
        await self.backend.start()
        # The process at rest, plus what the in-memory result cache may grow to.
        await asyncio.to_thread(memory.return_memory)
        cache_cap = self.cache.max_bytes if isinstance(self.cache, MemoryCache) else 0
        self.pipeline.start_budget(memory.rss_bytes() + cache_cap)
        self.started = True
        for info in self.backend.models.values():
            if not info.trained:
                log.warning("model %s is UNTRAINED: its latents are meaningless", info.name)
        # A cache that is down at start is said at start (and requests go on without it).
        cache = self.cache.name if await self.cache.ping() else f"{self.cache.name} (unreachable)"
        log.info("service ready: backend=%s cache=%s models=%s", self.backend.name,
                 cache, sorted(self.backend.models))

    async def close(self) -> None:
        await self.backend.close()
        await self.cache.close()

    @property
    def models(self) -> dict[str, ModelInfo]:
        """The served models by name (what ``/models`` and ``ListModels`` list)."""
        return self.backend.models

    @property
    def default_model(self) -> str:
        return self.backend.default_model

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = backend ready. A failing cache only degrades (requests still work), and
        a hung one is given ``READINESS_CACHE_S``: a probe that waited for the cache's own
        timeout (IVVAE_REDIS_TIMEOUT_S) could outlast the orchestrator's probe timeout and
        take every replica out of service for an optional cache."""

        (ok, reason), cache_ok = await asyncio.gather(
            self.backend.ready() if self.started else _not_yet(),
            self.cache.ping(timeout_s=READINESS_CACHE_S))
        trouble = self.cache.trouble() if cache_ok else "it does not answer"
        cache: dict[str, Any] = {"name": self.cache.name,
                                 "status": "degraded" if trouble else "ok"}
        if trouble:
            cache["detail"] = trouble
        return ok, {
            "status": "ready" if ok else "not_ready",
            "backend": {"name": self.backend.name, "ready": ok, "detail": reason},
            "cache": cache,
            "models": sorted(self.backend.models) if ok else [],
        }
