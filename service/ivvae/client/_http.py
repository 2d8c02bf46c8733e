"""The HTTP transport of the clients (httpx): the gateway's REST API."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ..core.model_info import ModelInfo
from ..core.tasks import within
from ..errors import BackendUnavailable, DeadlineExceeded, IVVAEError
from ._common import (
    HEALTH_TIMEOUT_S,
    VideoSource,
    error_from_code,
    frames_from_file,
    iter_source,
    tls_refused,
)
from ._result import LatentResult, Models


def _error(response: httpx.Response) -> IVVAEError:
    try:
        body = json.loads(response.content)
        return error_from_code(str(body["error"]), str(body.get("detail", "")))
    except (ValueError, KeyError, TypeError):
        text = response.text[:200]
        if response.status_code in (502, 503):
            return BackendUnavailable(f"HTTP {response.status_code}: {text}")
        if response.status_code == 504:
            return DeadlineExceeded(f"HTTP 504: {text}")
        exc = IVVAEError(f"HTTP {response.status_code}: {text}")
        exc.code = f"http_{response.status_code}"
        return exc


class HttpTransport:
    def __init__(self, base_url: str, *, api_key: str | None, timeout: float,
                 ca_cert: str | os.PathLike[str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # https://: the system's roots, or the given CA bundle (PEM)
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=os.fspath(ca_cert))
                                         if ca_cert else True)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx.Timeout(timeout, connect=10.0),
                                         verify=verify)

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            # httpx's timeouts bound each read and write: an answer that trickles in
            # would keep a call going past its timeout for ever.
            response = await within(self._client.request(method, path, **kw), self.timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from {self.base_url} within {self.timeout:g} s"
                                   ) from None
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise BackendUnavailable(f"cannot connect to {self.base_url}: {exc}") from exc
            raise DeadlineExceeded(f"no answer from {self.base_url} in time: {exc}") from exc
        except httpx.TransportError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise tls_refused(self.base_url, str(cause)) from exc
            raise BackendUnavailable(f"cannot reach {self.base_url}: {exc!r}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    async def encode(self, video: VideoSource | Path | np.ndarray, options: dict[str, Any],
                     preprocess: dict[str, str], fps: float | None = None) -> LatentResult:
        params: list[tuple[str, str]] = [
            (k, str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in options.items() if v is not None]
        params += list(preprocess.items())
        body: Any
        if isinstance(video, np.ndarray):
            # frames as a raw tensor body; its dtype parameter names the body's dtype
            params = [(k, v) for k, v in params if k != "dtype"]
            params += [("shape", ",".join(str(d) for d in video.shape)), ("dtype", "uint8"),
                       ("output_type", "file")]
            if fps is not None:
                params.append(("fps", repr(float(fps))))
            body = video.tobytes()
        else:
            body = video if isinstance(video, bytes) else iter_source(video)
        response = await self._request(
            "POST", "/encode", params=params, content=body,
            headers={"content-type": "application/octet-stream"})
        return LatentResult.from_bytes(response.content,
                                       cache_hit=response.headers.get("x-cache") == "hit")

    async def decode(self, latent: bytes, *, frames: bool, crf: int,
                     target: dict[str, str] | None = None,
                     frames_dtype: str = "uint8") -> bytes | np.ndarray:
        params = {"format": "frames" if frames else "mp4", "crf": str(crf), **(target or {})}
        if frames_dtype != "uint8":
            params["frames_dtype"] = frames_dtype
        response = await self._request(
            "POST", "/decode", content=latent, params=params,
            headers={"content-type": "application/octet-stream"})
        if not frames:
            return response.content
        return frames_from_file(response.content, "the server")

    async def models(self) -> Models:
        body = (await self._request("GET", "/models")).json()
        return Models(default=body["default"],
                      encode_precision=str(body.get("encode_precision", "")),
                      models=[ModelInfo.from_dict(m) for m in body["models"]])

    async def healthy(self) -> bool:
        try:
            response = await self._client.get(
                "/readyz", timeout=httpx.Timeout(min(self.timeout, HEALTH_TIMEOUT_S)))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def answers(self) -> bool:
        try:
            await self._client.get(
                "/healthz", timeout=httpx.Timeout(min(self.timeout, HEALTH_TIMEOUT_S)))
        except httpx.HTTPError:
            return False
        return True  # any status: something answered

    async def close(self) -> None:
        await self._client.aclose()

