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
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import numpy as np

from ..core.names import CRF_RANGE, DEFAULT_CRF
from ..core.steps import FRAMES_DTYPES, FramesDtype
from ..errors import InvalidInput
from ..video.preprocess import Preprocess
from ._common import (
    RetryPolicy,
    VideoSource,
    bare_latent_file,
    check_api_key,
    frames_of_array,
    is_array,
    read_source,
    with_retries,
)
from ._result import LatentResult, Models, atomic_write

__all__ = ["AsyncClient", "Client", "LatentResult", "Models", "RetryPolicy", "atomic_write"]

T = TypeVar("T")
DecodeFormat = Literal["mp4", "frames"]
LatentSource = VideoSource | Path | LatentResult
# Arrays: numpy, or torch tensors (typed loosely: the clients never import torch).
VideoInput = VideoSource | Path | np.ndarray | Any
LatentInput = LatentSource | np.ndarray | Any
DEFAULT_TIMEOUT_S = 600.0


class _Transport(Protocol):
    async def encode(self, video: VideoSource | Path | np.ndarray, options: dict[str, Any],
                     preprocess: dict[str, str], fps: float | None = None) -> LatentResult: ...
    async def decode(self, latent: bytes, *, frames: bool, crf: int,
                     target: dict[str, str] | None = None,
                     frames_dtype: str = "uint8") -> bytes | np.ndarray: ...
    async def models(self) -> Models: ...
    async def healthy(self) -> bool: ...
    async def answers(self) -> bool: ...
    async def close(self) -> None: ...


def _parse_url(url: str) -> tuple[Literal["http", "grpc"], str, bool]:
    """(transport, address, TLS) of a client URL; raises ``ValueError`` when malformed."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"the port of {url!r} must be a number in 0-65535") from None
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


def _option_strings(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Preprocessing options as the string parameters they travel as: a number as its
    text (``max_frames=41``), a list (of buckets) as one item each."""
    pairs = []
    for name, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise InvalidInput(f"preprocess option {name!r}: {item!r} is not a string "
                                   "or a number")
            pairs.append((name, str(item)))
    return pairs


def _used_before_fork(kind: str, pid: int) -> str:
    """Why a client copied into a fork refuses to work there."""
    return (f"this {kind} was used in process {pid}, and {os.getpid()} is a fork of it (a "
            "DataLoader worker?): its connection (and a Client's event loop) stayed in the "
            f"parent. Make a {kind} in each process that uses one (e.g. on first use in "
            "__getitem__, or in worker_init_fn)")


class AsyncClient:
    """An asyncio client; see the module docstring. Use ``async with`` or ``await close()``.

    ``timeout`` bounds each call (seconds, each attempt); ``retry`` says how UNAVAILABLE
    and connection failures are retried. The connection is made on first use, in the
    running event loop. One used before a fork is refused in the child, as ``Client`` is
    (its connection belongs to the parent); ``close()`` there only lets go of it.
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 ca_cert: str | os.PathLike[str] | None = None) -> None:
        _, _, secure = _parse_url(url)  # fail now on a malformed URL, not at the first call
        check_api_key(api_key)
        if ca_cert is not None:
            # A CA with a plain-text URL was ignored over gRPC: the user meant TLS.
            if not secure:
                raise ValueError(f"ca_cert is for https:// and grpcs:// URLs; {url!r} is "
                                 "plain text")
            if not Path(ca_cert).is_file():
                raise FileNotFoundError(f"ca_cert {os.fspath(ca_cert)!r} is not a file")
        self.url = url
        self.api_key = api_key
        self.ca_cert = ca_cert
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._impl: _Transport | None = None
        self._pid = 0  # of the process that made the connection

    @property
    def _forked(self) -> bool:
        """Whether this is a fork's copy of a client its parent connected: a gRPC channel
        or an HTTP connection pool is not safe to use from two processes."""
        return self._impl is not None and self._pid != os.getpid()

    @property
    def _t(self) -> _Transport:
        if self._forked:
            raise RuntimeError(_used_before_fork("AsyncClient", self._pid))
        if self._impl is None:
            self._pid = os.getpid()
            self._impl = _transport(self.url, self.api_key, self.timeout, self.ca_cert)
        return self._impl

    async def encode(self, video: VideoInput, *, sample: bool = False,
                     seed: int | None = None, dtype: str = "float32", model: str = "",
                     moments: bool = False,
                     preprocess: Preprocess | Mapping[str, Any] | None = None,
                     fps: float | None = None) -> LatentResult:
        """Encode a video to a latent file: a video or image file (a path, or its bytes),
        or frames as a numpy array or torch tensor (``(T, H, W, 3)`` uint8, or
        ``(1, 3, T, H, W)`` / ``(3, T, H, W)`` float in [-1, 1]; ``fps`` their rate,
        default 24).

        ``sample``: sample the posterior (else its mean, deterministic); ``seed`` makes a
        sample reproducible; ``dtype``: float32, bfloat16 or float16 (file uploads; arrays
        give float32 latents); ``model``: a served model (``models()``), empty for the
        default; ``moments``: also store mu and logvar; ``preprocess``: resize, crop,
        bucket, frame window and rate (``ivvae.video.Preprocess`` or its parameters, e.g.
        ``{"bucket": ["480x272x17", "320x240x17"], "max_frames": 41}``: numbers as numbers
        or strings, buckets as a list or one comma-separated string), checked here before
        anything is sent.
        """
        options: dict[str, Any] = {"model": model, "sample": sample, "dtype": dtype,
                                   "moments": moments}
        if seed is not None:
            options["seed"] = seed
        if preprocess is None:
            preprocess = Preprocess()
        elif not isinstance(preprocess, Preprocess):
            preprocess = Preprocess.parse(_option_strings(preprocess))
        params = preprocess.to_params()
        source: VideoSource | Path | np.ndarray
        if is_array(video):
            if dtype != "float32":
                raise ValueError("arrays are encoded to float32 latents; dtype applies to "
                                 "file uploads")
            source = frames_of_array(video)
        else:
            source = cast("VideoSource | Path", video)
        return await with_retries(self.retry,
                                  lambda: self._t.encode(source, options, params, fps))

    async def decode(self, latent: LatentInput, *, format: DecodeFormat = "mp4",
                     crf: int = DEFAULT_CRF, model: str = "", fps: float | str | None = None,
                     num_frames: int | None = None, height: int | None = None,
                     width: int | None = None,
                     latent_space: Literal["scaled", "raw"] = "scaled",
                     frames_dtype: FramesDtype = "uint8",
                     ) -> bytes | np.ndarray:
        """Decode to video: a latent file (a path, its bytes, or a ``LatentResult``), or a
        bare latent a sampler made, as a numpy array or torch tensor ``(B, z, t, h, w)`` or
        ``(z, t, h, w)`` (bfloat16 / float16 kept) or a bare latent file.

        ``format="mp4"``: the bytes of an H.264 MP4 (original fps, frame count and size;
        ``crf`` its quality, lower is better; a batch of more than one: a zip of
        ``0.mp4``, ``1.mp4``, ...); ``format="frames"``: ``(T, H, W, 3)`` uint8 RGB frames
        in [0, 255] (``(B, T, H, W, 3)`` for a batch), or with ``frames_dtype="float32"`` the
        decoder's own values in the same layout (about [-1, 1], not clamped: what the uint8
        frames are rounded from, equal to decoding in-process). For bare latents, ``model``
        (default: the served default), ``fps`` (default 24), ``num_frames`` / ``height`` / ``width``
        (defaults ``1 + 4(t-1)``, ``8h``, ``8w``) and ``latent_space`` (``scaled``: the
        model's ``scale * (s - shift)``, what encode returns; ``raw``: ``s``).
        """
        if format not in ("mp4", "frames"):
            raise ValueError(f"format must be 'mp4' or 'frames', got {format!r}")
        if frames_dtype not in FRAMES_DTYPES:
            raise ValueError(f"frames_dtype must be one of {FRAMES_DTYPES}, got {frames_dtype!r}")
        if format == "mp4" and frames_dtype != "uint8":
            raise ValueError("frames_dtype='float32' needs format='frames': an MP4 holds uint8")
        lo, hi = CRF_RANGE
        if isinstance(crf, bool) or not isinstance(crf, int) or not lo <= crf <= hi:
            raise ValueError(f"crf must be an integer in [{lo}, {hi}], got {crf!r}")
        target = {k: str(v) for k, v in (("model", model), ("fps", fps),
                                          ("num_frames", num_frames), ("height", height),
                                          ("width", width))
                  if v is not None and v != ""}  # 0 goes to the server, which refuses it
        if latent_space != "scaled":
            target["latent_space"] = latent_space
        if is_array(latent):
            data = bare_latent_file(latent)
        elif isinstance(latent, LatentResult):
            data = latent.data
        else:
            data = await read_source(cast("VideoSource | Path", latent))
        return await with_retries(
            self.retry, lambda: self._t.decode(data, frames=format == "frames", crf=crf,
                                               target=target, frames_dtype=frames_dtype))

    async def models(self) -> Models:
        return await with_retries(self.retry, self._t.models)

    async def healthy(self) -> bool:
        """Whether the service answers and is ready (no retries)."""
        return await self._t.healthy()

    async def answers(self) -> bool:
        """Whether the service answers at all, ready or not (liveness, no retries): a
        process stopped or wedged does not, one that is busy, full or stopping does."""
        return await self._t.answers()

    async def close(self) -> None:
        if self._forked:  # the parent's: let go of it, it is not this process's to close
            self._impl = None
            return
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

    Make one per process (e.g. per DataLoader worker, after the fork): one used before a
    fork is refused in the child (its loop thread stayed in the parent: every call would
    wait for ever); ``close()`` there only lets go of the parent's.
    """

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 ca_cert: str | os.PathLike[str] | None = None) -> None:
        self._async = AsyncClient(url, api_key=api_key, timeout=timeout, retry=retry,
                                  ca_cert=ca_cert)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = 0  # of the process whose thread runs the loop

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def _forked(self) -> bool:
        """Whether this is a fork's copy of a client its parent used: the loop, its thread
        and the connection are the parent's."""
        return self._loop is not None and self._pid != os.getpid()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._forked:
            coro.close()
            raise RuntimeError(_used_before_fork("Client", self._pid))
        with self._lock:
            if self._loop is None:
                self._pid = os.getpid()
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

    def encode(self, video: VideoInput, *, sample: bool = False,
               seed: int | None = None, dtype: str = "float32", model: str = "",
               moments: bool = False, preprocess: Preprocess | Mapping[str, Any] | None = None,
               fps: float | None = None) -> LatentResult:
        """See ``AsyncClient.encode``."""
        return self._run(self._async.encode(video, sample=sample, seed=seed, dtype=dtype,
                                            model=model, moments=moments,
                                            preprocess=preprocess, fps=fps))

    def decode(self, latent: LatentInput, *, format: DecodeFormat = "mp4",
               crf: int = DEFAULT_CRF, model: str = "", fps: float | str | None = None,
               num_frames: int | None = None, height: int | None = None,
               width: int | None = None,
               latent_space: Literal["scaled", "raw"] = "scaled",
               frames_dtype: FramesDtype = "uint8") -> bytes | np.ndarray:
        """See ``AsyncClient.decode``."""
        return self._run(self._async.decode(latent, format=format, crf=crf, model=model,
                                            fps=fps, num_frames=num_frames, height=height,
                                            width=width, latent_space=latent_space,
                                            frames_dtype=frames_dtype))

    def models(self) -> Models:
        return self._run(self._async.models())

    def healthy(self) -> bool:
        return self._run(self._async.healthy())

    def answers(self) -> bool:
        return self._run(self._async.answers())

    def close(self) -> None:
        if self._forked:  # let go of the parent's without waiting on its loop
            self._loop = self._thread = None
            return
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
