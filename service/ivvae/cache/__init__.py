"""ResultCache: posterior moments of encoded videos, stored under a content key.

A repeated upload (same bytes, same weights, same encode precision) is answered from here
without running the model. The pipeline keys entries with
``cache_key(content_sha256, model_name, weights_sha256, encode_precision, MOMENTS_VERSION,
preprocess)`` (``ivvae.pipeline.MOMENTS_VERSION``; the canonical preprocessing options).

Not to be confused with ``ivvae.model.cache.FeatureCache``, the model's temporal state.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from ..config import Settings
from ..core.files import state_dir
from .base import CacheStats, ResultCache
from .codec import (
    CachedMoments,
    CorruptEntry,
    Expected,
    cache_key,
    check_secret,
    deserialize,
    serialize,
)
from .memory import MemoryCache
from .redis_cache import RedisCache

__all__ = [
    "CacheStats",
    "CachedMoments",
    "CorruptEntry",
    "Expected",
    "MemoryCache",
    "RedisCache",
    "ResultCache",
    "cache_key",
    "cache_secret",
    "create_cache",
    "deserialize",
    "serialize",
]


def create_cache(settings: Settings) -> ResultCache:
    """A :class:`RedisCache` when ``settings.redis_url`` is set, else a :class:`MemoryCache`.

    Connects lazily: Redis being down at startup is not an error (``ping`` reports it).
    """
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            max_entry_bytes=settings.cache_max_entry_bytes,
            key_prefix=settings.cache_key_prefix,
            timeout_s=settings.redis_timeout_s,
            secret=cache_secret(settings),
            retry_after_s=settings.redis_retry_s,
        )
    return MemoryCache(
        max_bytes=settings.cache_memory_max_bytes,
        max_entry_bytes=settings.cache_max_entry_bytes,
    )


log = logging.getLogger("ivvae.cache")


def default_secret_file() -> Path:
    return state_dir() / "cache-secret"


def cache_secret(settings: Settings) -> bytes:
    """The MAC key for a shared cache: ``IVVAE_CACHE_SECRET``, else the secret file.

    The file (``IVVAE_CACHE_SECRET_FILE``, default :func:`default_secret_file`) is created
    with a random secret, mode 0600, when absent, so a deployment keeps one secret across
    restarts without being configured. Where the default file cannot be written (a
    read-only root filesystem), the secret is random per process: the cache still works,
    but entries do not outlive the process and are not shared between gateways. A file
    named by ``IVVAE_CACHE_SECRET_FILE`` that cannot be used is a ``ValueError``.
    """
    configured = settings.cache_secret.get_secret_value()
    if configured:
        return check_secret(configured.encode())
    path = Path(settings.cache_secret_file) if settings.cache_secret_file else (
        default_secret_file())
    try:
        return _read_or_create(path)
    except (OSError, ValueError) as exc:
        if settings.cache_secret_file:  # asked for by name: a per-process one is not it
            raise ValueError(f"IVVAE_CACHE_SECRET_FILE {path}: cannot read or create a "
                             f"cache secret there ({exc})") from exc
        log.warning("cache secret file %s unusable (%s); using a per-process secret: set "
                    "IVVAE_CACHE_SECRET to share cache entries between processes", path, exc)
        return secrets.token_bytes(32)


def _read_or_create(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cache-secret-")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp files are 0600
                f.write(secrets.token_hex(32))
            # link, not rename: two processes starting at once must not replace each
            # other's secret; the loser reads the winner's.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return check_secret(path.read_bytes().strip())
