"""In-process ResultCache: an LRU of serialized blobs, bounded by their total size.

It stores blobs rather than objects so that an entry costs what it costs in Redis, a caller
can never mutate a cached array, and reads take the same checksummed path as Redis reads.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from .base import ResultCache


class MemoryCache(ResultCache):
    """LRU bounded by ``max_bytes`` of stored blobs.

    ``secret``: the MAC key; by default a random one, since no other process reads these.

    An entry larger than ``min(max_entry_bytes, max_bytes)`` is skipped. Safe to share
    between tasks and threads: the dict is only touched under a lock, which is never held
    across an ``await``.
    """

    name = "memory"

    def __init__(self, *, max_bytes: int, max_entry_bytes: int,
                 secret: bytes | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        super().__init__(max_entry_bytes=min(max_entry_bytes, max_bytes),
                         secret=secrets.token_bytes(32) if secret is None else secret)
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._total_bytes = 0
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        """Bytes of blobs held now."""
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, key: object) -> bool:
        return key in self._blobs

    async def _ping(self) -> None:
        return None

    async def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._total_bytes = 0

    async def _load(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None:
                self._blobs.move_to_end(key)
            return blob

    async def _store(self, key: str, blob: bytes) -> None:
        with self._lock:
            old = self._blobs.pop(key, None)
            if old is not None:
                self._total_bytes -= len(old)
            self._blobs[key] = blob
            self._total_bytes += len(blob)
            while self._total_bytes > self.max_bytes:
                _, evicted = self._blobs.popitem(last=False)
                self._total_bytes -= len(evicted)

    async def _discard(self, key: str, blob: bytes) -> None:
        with self._lock:
            # Only the blob found corrupt: a put may have replaced it meanwhile.
            if self._blobs.get(key) is blob:
                del self._blobs[key]
                self._total_bytes -= len(blob)
