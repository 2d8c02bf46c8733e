"""What both transports share: server errors back to ``ivvae.errors`` classes, retries, and
reading the caller's input."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import BackendUnavailable, IVVAEError, Overloaded
from ..safetensors_io import SafetensorsError, loads

T = TypeVar("T")
VideoSource = str | os.PathLike[str] | bytes
CHUNK_BYTES = 1 << 20  # request chunks; the server answers in chunks of at most this size


def _error_classes(base: type[IVVAEError]) -> dict[str, type[IVVAEError]]:
    out = {base.code: base}
    for sub in base.__subclasses__():
        out.update(_error_classes(sub))
    return out


def error_from_code(code: str, detail: str) -> IVVAEError:
    """The ``ivvae.errors`` exception for a server's error code (the HTTP JSON ``error``,
    the gRPC ``ivvae-error-code``); an ``IVVAEError`` carrying ``code`` if it is unknown."""
    cls = _error_classes(IVVAEError).get(code)
    exc = (cls or IVVAEError)(detail)
    if cls is None:
        exc.code = code
    return exc


RETRYABLE: tuple[type[IVVAEError], ...] = (BackendUnavailable, Overloaded)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for errors that a retry can fix: the server or
    its backend unavailable or overloaded (gRPC UNAVAILABLE, HTTP 503), or no connection.

    ``attempts`` counts every try (1: no retry). The n-th wait is uniform in
    ``[0, min(max_backoff_s, initial_backoff_s * multiplier**n)]``.
    """

    attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def delays(self) -> Iterator[float]:
        for n in range(self.attempts - 1):
            cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**n)
            yield random.uniform(0, cap)


async def with_retries(policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
    delays = policy.delays()
    while True:
        try:
            return await call()
        except RETRYABLE:
            delay = next(delays, None)
            if delay is None:
                raise
        await asyncio.sleep(delay)


async def read_source(source: VideoSource | Path) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return await asyncio.to_thread(Path(source).read_bytes)


async def iter_source(source: VideoSource | Path) -> AsyncIterator[bytes]:
    """The input in ``CHUNK_BYTES`` pieces; a file is read as it is sent, not held whole."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for i in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[i : i + CHUNK_BYTES])
        return
    f = await asyncio.to_thread(open, Path(source), "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
            yield chunk
    finally:
        f.close()


def frames_from_file(data: bytes | bytearray, source: str) -> np.ndarray:
    """The ``(T, H, W, 3)`` uint8 frames of a frames file (``ivvae.outputs``), writable."""
    try:
        tensors, _ = loads(data)
        return np.array(tensors["frames"].array)
    except (SafetensorsError, KeyError) as exc:
        raise IVVAEError(f"{source} sent unreadable frames: {exc}") from exc
