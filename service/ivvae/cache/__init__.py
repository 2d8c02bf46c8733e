"""ResultCache: posterior moments of encoded videos, stored under a content key.

A repeated upload (same bytes, same weights, same encode precision) is answered from here
without running the model. The pipeline keys entries with
``cache_key(content_sha256, model_name, weights_sha256, encode_precision, "moments-v1")``.

Not to be confused with ``ivvae.model.cache.FeatureCache``, the model's temporal state.
"""

from __future__ import annotations

from ..config import Settings
from .base import CacheStats, ResultCache
from .codec import CachedMoments, CorruptEntry, cache_key, deserialize, serialize
from .memory import MemoryCache
from .redis_cache import RedisCache

__all__ = [
    "CacheStats",
    "CachedMoments",
    "CorruptEntry",
    "MemoryCache",
    "RedisCache",
    "ResultCache",
    "cache_key",
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
        )
    return MemoryCache(
        max_bytes=settings.cache_memory_max_bytes,
        max_entry_bytes=settings.cache_max_entry_bytes,
    )
