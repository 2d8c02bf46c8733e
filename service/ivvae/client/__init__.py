"""Python clients of the ivvae service, over HTTP or gRPC, sync or asyncio.

    from ivvae.client import Client

    with Client("grpc://encoder.internal:50051", api_key="...") as client:
        latent = client.encode("clip.mp4")        # LatentResult
        latent.save("clip.latent.safetensors")    # atomic
        z = latent.numpy()  # (1, z, 1+ceil((T-1)/4), ceil(H/8), ceil(W/8)) float32
        frames = client.decode(latent, format="frames")  # (T, H, W, 3) uint8 RGB
        mp4 = client.decode(latent)               # bytes of an H.264 MP4

``AsyncClient`` has the same methods as coroutines. The URL picks the transport:
``http://`` / ``https://`` (the REST API, optionally under a path prefix), ``grpc://`` /
``grpcs://`` (TLS with the system roots), or a bare ``host:port`` (gRPC). Both transports
give the same results: the same latent file bytes for the same input and options.

Errors are the service's own (``ivvae.errors``): ``UnsupportedMedia``, ``TooLarge``,
``InvalidLatent``, ``Unauthorized``, ... ``BackendUnavailable`` and ``Overloaded`` (and
failures to connect, raised as ``BackendUnavailable``) are retried with exponential backoff
(``RetryPolicy``) before they reach the caller. A call that runs past ``timeout`` seconds
raises ``DeadlineExceeded``.

The clients never import torch; ``LatentResult.torch()`` does, when called.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import numpy as np

from ..core.names import DEFAULT_CRF
from ._common import RetryPolicy, VideoSource, read_source, with_retries
from ._result import LatentResult, Models, atomic_write

__all__ = ["AsyncClient", "Client", "LatentResult", "Models", "RetryPolicy", "atomic_write"]

T = TypeVar("T")
DecodeFormat = Literal["mp4", "frames"]
LatentSource = VideoSource | Path | LatentResult
DEFAULT_TIMEOUT_S = 600.0


class _Transport(Protocol):
    async def encode(self, video: VideoSource | Path,
                     options: dict[str, Any]) -> LatentResult: ...
    async def decode(self, latent: bytes, *, frames: bool, crf: int) -> bytes | np.ndarray: ...
    async def models(self) -> Models: ...
    async def healthy(self) -> bool: ...
    async def close(self) -> None: ...


def _parse_url(url: str) -> tuple[Literal["http", "grpc"], str, bool]:
    """(transport, address, TLS) of a client URL; raises ``ValueError`` when malformed."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    if parts.scheme in ("http", "https") and parts.netloc:
        return "http", url, parts.scheme == "https"
    if parts.scheme in ("grpc", "grpcs"):
        if not parts.netloc or parts.path.strip("/"):
            raise ValueError(f"a gRPC URL is grpc://HOST:PORT, got {url!r}")
        return "grpc", parts.netloc, parts.scheme == "grpcs"
    raise ValueError(f"unsupported URL {url!r}: use http://, https://, grpc://, grpcs:// or "
                     "HOST:PORT (gRPC)")


def _transport(url: str, api_key: str | None, timeout: float,
               ca_cert: str | os.PathLike[str] | None) -> _Transport:
    kind, address, secure = _parse_url(url)
    if kind == "http":
        from ._http import HttpTransport

        return HttpTransport(address, api_key=api_key, timeout=timeout, ca_cert=ca_cert)
    from ._grpc import GrpcTransport

    return GrpcTransport(address, api_key=api_key, timeout=timeout, secure=secure,
                         ca_cert=ca_cert)


class AsyncClient:
    """An asyncio client; see the module docstring. Use ``async with`` or ``await close()``.

    ``timeout`` bounds each call (seconds, each attempt); ``retry`` says how UNAVAILABLE
    and connection failures are retried. The connection is made on first use, in the
    running event loop.
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 ca_cert: str | os.PathLike[str] | None = None) -> None:
        _parse_url(url)  # fail now on a malformed URL, not at the first call
        self.url = url
        self.api_key = api_key
        self.ca_cert = ca_cert
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._impl: _Transport | None = None

    @property
    def _t(self) -> _Transport:
        if self._impl is None:
            self._impl = _transport(self.url, self.api_key, self.timeout, self.ca_cert)
        return self._impl

    async def encode(self, video: VideoSource | Path, *, sample: bool = False,
                     seed: int | None = None, dtype: str = "float32", model: str = "",
                     moments: bool = False) -> LatentResult:
        """Encode a video or image file (a path, or its bytes) to a latent file.

        ``sample``: sample the posterior (else its mean, deterministic); ``seed`` makes a
        sample reproducible; ``dtype``: float32, bfloat16 or float16; ``model``: a served
        model (``models()``), empty for the default; ``moments``: also store mu and logvar.
        """
        options: dict[str, Any] = {"model": model, "sample": sample, "dtype": dtype,
                                   "moments": moments}
        if seed is not None:
            options["seed"] = seed
        return await with_retries(self.retry, lambda: self._t.encode(video, options))

    async def decode(self, latent: LatentSource, *, format: DecodeFormat = "mp4",
                     crf: int = DEFAULT_CRF) -> bytes | np.ndarray:
        """Decode a latent file (a path, its bytes, or a ``LatentResult``) to video.

        ``format="mp4"``: the bytes of an H.264 MP4 (original fps, frame count and size;
        ``crf`` its quality, lower is better); ``format="frames"``: ``(T, H, W, 3)`` uint8
        RGB frames in [0, 255].
        """
        if format not in ("mp4", "frames"):
            raise ValueError(f"format must be 'mp4' or 'frames', got {format!r}")
        data = latent.data if isinstance(latent, LatentResult) else await read_source(latent)
        return await with_retries(
            self.retry, lambda: self._t.decode(data, frames=format == "frames", crf=crf))

    async def models(self) -> Models:
        return await with_retries(self.retry, self._t.models)

    async def healthy(self) -> bool:
        """Whether the service answers and is ready (no retries)."""
        return await self._t.healthy()

    async def close(self) -> None:
        if self._impl is not None:
            impl, self._impl = self._impl, None
            await impl.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class Client:
    """The blocking client: ``AsyncClient`` run on a private event loop thread (started on
    first use), so it also works where an event loop is already running (notebooks).

    Make one per process (e.g. per DataLoader worker, after the fork).
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 ca_cert: str | os.PathLike[str] | None = None) -> None:
        self._async = AsyncClient(url, api_key=api_key, timeout=timeout, retry=retry,
                                  ca_cert=ca_cert)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._async.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever,
                                                name="ivvae-client", daemon=True)
                self._thread.start()
            loop = self._loop
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: stop the call, not only the wait
            raise

    def encode(self, video: VideoSource | Path, *, sample: bool = False,
               seed: int | None = None, dtype: str = "float32", model: str = "",
               moments: bool = False) -> LatentResult:
        """See ``AsyncClient.encode``."""
        return self._run(self._async.encode(video, sample=sample, seed=seed, dtype=dtype,
                                            model=model, moments=moments))

    def decode(self, latent: LatentSource, *, format: DecodeFormat = "mp4",
               crf: int = DEFAULT_CRF) -> bytes | np.ndarray:
        """See ``AsyncClient.decode``."""
        return self._run(self._async.decode(latent, format=format, crf=crf))

    def models(self) -> Models:
        return self._run(self._async.models())

    def healthy(self) -> bool:
        return self._run(self._async.healthy())

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._async.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
