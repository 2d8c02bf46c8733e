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

from ..core import strict
from ..core.frames import refuse_empty, uint8_frames
from ..errors import BackendUnavailable, IVVAEError, Overloaded, UntrustedCertificate
from ..safetensors_io import SafetensorsError, Tensor, dumps, loads

T = TypeVar("T")
VideoSource = str | os.PathLike[str] | bytes
CHUNK_BYTES = 1 << 20  # request chunks; the server answers in chunks of at most this size
# A health check answers from the event loop, not the model: a service that needs longer
# is stopped or wedged, whatever the caller's timeout for real work.
HEALTH_TIMEOUT_S = 10.0


def _error_classes(base: type[IVVAEError]) -> dict[str, type[IVVAEError]]:
    out = {base.code: base}
    for sub in base.__subclasses__():
        for code, cls in _error_classes(sub).items():
            # A subclass sharing its parent's code is a refinement the wire cannot carry
            # (NotTakenInTime: a server's client was too slow): the code names the parent.
            out.setdefault(code, cls)
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


def tls_refused(target: str, detail: str) -> UntrustedCertificate:
    return UntrustedCertificate(f"{target}: the server's TLS certificate is not trusted "
                                f"({detail}); pass ca_cert= the CA bundle that signed it")


def check_api_key(api_key: str | None) -> None:
    """An API key goes in a header (``strict.is_api_key``). Refused here, without showing
    it (a header library would quote it in its error, and a retry would follow)."""
    if api_key and not strict.is_api_key(api_key):
        raise ValueError("api_key must be visible ASCII characters (inner spaces allowed; no "
                         "line breaks or accents); the key is not shown here")


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
    """The ``(T, H, W, 3)`` frames (uint8, or float32 when asked) of a frames file
    (``ivvae.outputs``), writable."""
    try:
        tensors, _ = loads(data)
        return np.array(tensors["frames"].array)
    except (SafetensorsError, KeyError) as exc:
        raise IVVAEError(f"{source} sent unreadable frames: {exc}") from exc


def _as_numpy(x: object) -> np.ndarray:
    """A numpy array or a torch tensor (any device; bfloat16 widened) as numpy, without
    importing torch for numpy input."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import torch

        assert isinstance(x, torch.Tensor)
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    raise TypeError(f"expected a path, bytes, a numpy array or a torch tensor, got "
                    f"{type(x).__name__}")


def is_array(x: object) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("torch")


def frames_of_array(x: object) -> np.ndarray:
    """Video given as an array -> ``(T, H, W, 3)`` uint8 RGB: ``(T, H, W, 3)`` or
    ``(H, W, 3)`` uint8, or ``(1, 3, T, H, W)`` / ``(3, T, H, W)`` float in [-1, 1]
    (checked and rounded to uint8 as the server does a float tensor body: values past
    +-1.25, NaN and empty videos are the service's ``InvalidInput``)."""
    a = _as_numpy(x)
    if a.dtype == np.uint8:
        if a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise ValueError(f"uint8 frames are (T, H, W, 3) or (H, W, 3); got {a.shape}")
        refuse_empty(a)
        return np.ascontiguousarray(a[None] if a.ndim == 3 else a)
    if a.ndim == 5:
        if a.shape[0] != 1:
            raise ValueError(f"encode takes one video; got a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim != 4 or a.shape[0] != 3 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"float video is (1, 3, T, H, W) or (3, T, H, W) in [-1, 1]; got "
                         f"{a.shape} {a.dtype}")
    return uint8_frames(a)


def bare_latent_file(x: object) -> bytes:
    """A latent given as an array, ``(B, z, t, h, w)`` or ``(z, t, h, w)``, as a bare latent
    file (bfloat16 and float16 tensors keep their dtype; other floats become float32)."""
    if type(x).__module__.startswith("torch"):
        import torch

        assert isinstance(x, torch.Tensor)
        t = x.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            bits = t.view(torch.int16).numpy().view(np.uint16)
            return dumps({"latent": Tensor("BF16", bits)})
    a = _as_numpy(x)
    if not np.issubdtype(a.dtype, np.floating):  # an index or a mask passed by mistake
        raise ValueError(f"a latent is a float tensor; got {a.dtype}")
    if a.dtype != np.float16:
        a = a.astype(np.float32)
    return dumps({"latent": np.ascontiguousarray(a)})
