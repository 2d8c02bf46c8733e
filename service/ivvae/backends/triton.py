"""The ``triton`` backend: each video is one Triton sequence over ``tritonclient.grpc.aio``.

The model runs in Triton (``model_repository/``); the feature cache of a video lives in the
Triton model instance that ran its first step, keyed by the sequence's correlation id. This
module never imports torch and never reads weights: the served model's description comes
from the ``MODEL_INFO`` parameter of the models' config (``ivvae.triton.contract``).

Endpoints (``IVVAE_TRITON_URL``): ``host:port``, a comma-separated list of them, or
``dns:///name:port``, resolved at the start of each sequence (cached for a few seconds) to
one endpoint per address, as a Kubernetes headless Service gives. A sequence is pinned to
one endpoint from its first step to its last; new sequences go to the endpoint with the
fewest sequences in flight from this gateway.

Failures:

* connection errors on a sequence's first step: up to ``triton_connect_retries`` more
  tries, on the next endpoint when there are several, then ``BackendUnavailable`` (503);
* ``UNAVAILABLE`` after the first step (Triton died or lost the state): ``BackendUnavailable``
  at once, never a retry (the state is gone; the pipeline then writes no result);
* a step slower than ``triton_timeout_s``: ``DeadlineExceeded`` (504);
* ``INVALID_ARGUMENT`` from the model: ``InvalidInput`` (encode) or ``InvalidLatent``
  (decode); Triton's "must specify the START flag" on a later step means the sequence was
  dropped: ``BackendUnavailable``;
* a model instance whose python stub died or hangs (OOM-killed; Triton keeps the server
  and the model "ready" and answers every request ``INTERNAL``, "Stub process ... is not
  healthy", and does not restart it): ``BackendUnavailable``, and the endpoint counts as
  not ready (``/readyz`` 503 naming the model, no new videos sent there) until a data-less
  request to each model succeeds again (Triton restarted, or the model reloaded): the
  health watcher sends one every ``HEALTH_POLL_S``, and so does every readiness check.

Failing fast: a watcher asks each endpoint whether it is live every ``HEALTH_POLL_S``
(``HEALTH_TIMEOUT_S`` for an answer). While no endpoint answers, new sessions are refused
at once with ``BackendUnavailable`` (503) instead of waiting ``triton_timeout_s`` on a
hung server, and steps in flight on an endpoint that stops answering fail as soon as the
watcher sees it.

``close()`` ends the sequence with a data-less ``RELEASE`` request so that Triton frees the
slot and the model its cache at once; the model's time-to-live is the backstop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from ..config import Settings
from ..core.model_info import ModelInfo
from ..core.steps import FramesDtype
from ..errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    InvalidLatent,
    IVVAEError,
    Overloaded,
    UnknownModel,
)
from ..metrics import Metrics
from ..triton import contract as c
from .base import Backend, DecodeSession, EncodeSession, SequenceDecode, SequenceEncode


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options (passing any replaces them all), and a short
    reconnect backoff: gRPC's grows to 120 s while Triton is down, and kept every gateway
    unready for 24-35 s after a restart."""
    keepalive = KeepAliveOptions()
    largest = 2**31 - 1  # tritonclient's MAX_GRPC_MESSAGE_SIZE
    return [("grpc.max_send_message_length", largest),
            ("grpc.max_receive_message_length", largest),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls",
             int(keepalive.keepalive_permit_without_calls)),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000)]


CHANNEL_ARGS = _channel_args()

log = logging.getLogger("ivvae.backends.triton")

DNS_SCHEME = "dns:///"
DNS_CACHE_S = 5.0
PROBE_TIMEOUT_S = 3.0  # readiness and model-config calls
RELEASE_TIMEOUT_S = 5.0  # the request that ends a sequence
RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)
HEALTH_POLL_S = 0.5
HEALTH_TIMEOUT_S = 1.0


def parse_endpoints(url: str) -> tuple[list[str], tuple[str, int] | None]:
    """``(static endpoints, None)`` or ``([], (dns name, port))`` for ``dns:///name:port``."""
    url = url.strip()
    if url.startswith("dns:"):
        if not url.startswith(DNS_SCHEME):
            raise ValueError(f"IVVAE_TRITON_URL {url!r}: only {DNS_SCHEME}name:port is supported")
        host, sep, port = url[len(DNS_SCHEME):].rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"IVVAE_TRITON_URL {url!r} must be {DNS_SCHEME}name:port")
        return [], (host, int(port))
    endpoints = [e.strip() for e in url.split(",") if e.strip()]
    for e in endpoints:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Triton endpoint {e!r} must be host:port")
    if not endpoints:
        raise ValueError("IVVAE_TRITON_URL is empty")
    return endpoints, None


def _correlation_id() -> int:
    """A fresh sequence id: random, so gateways sharing a Triton do not collide."""
    return secrets.randbelow(c.MAX_CORRELATION_ID) + 1


@dataclass(frozen=True)
class _Served:
    """What one endpoint serves, from its models' config."""

    info: ModelInfo
    precision: dict[str, str]  # direction -> PRECISION parameter


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._static, self._dns = parse_endpoints(settings.triton_url)
        self._models = {"encoder": settings.triton_encoder_model,
                        "decoder": settings.triton_decoder_model}
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}
        self._in_flight: dict[str, int] = defaultdict(int)
        self._served: dict[str, _Served] = {}  # endpoint -> what it serves (when known)
        self._info: ModelInfo | None = None
        self._problem = "not connected to Triton yet"
        self._known = 0  # endpoints seen by the last refresh
        self._resolved: tuple[float, list[str]] = (0.0, [])
        self._refresher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # endpoint -> set while it does not answer health checks (absent: not known yet)
        self._down: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        # endpoint -> why a model instance there cannot run steps (a dead python stub)
        self._broken: dict[str, str] = {}
        self._probing: dict[str, asyncio.Task[None]] = {}  # the watcher's probes running

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn what Triton serves; if it is not up yet, keep trying in the background
        (readiness says so meanwhile) rather than failing the gateway's start."""
        await self.refresh()
        self._watcher = asyncio.create_task(self._watch())
        if self._info is None:
            log.warning("Triton at %s is not ready yet (%s); retrying in the background",
                        self.settings.triton_url, self._problem)
            self._refresher = asyncio.create_task(self._refresh_until_known())

    async def _refresh_until_known(self) -> None:
        while self._info is None:
            await asyncio.sleep(2.0)
            try:
                await self.refresh()
            except Exception:  # keep trying; readiness reports the problem
                log.exception("asking Triton what it serves failed")
        log.info("Triton serves model %s (weights %s)", self._info.name,
                 self._info.weights_sha256[:12])

    async def _watch(self) -> None:
        """Keep ``_down`` current: a liveness call per endpoint, every ``HEALTH_POLL_S``."""
        while True:
            resolved = True
            try:
                endpoints = await self._endpoints()
            except BackendUnavailable:
                endpoints, resolved = [], False
            answers = await asyncio.gather(*(self._live(e) for e in endpoints))
            for endpoint, live in zip(endpoints, answers, strict=True):
                down = self._down[endpoint]
                if live and down.is_set():
                    log.info("Triton at %s answers again", endpoint)
                    down.clear()
                elif not live and not down.is_set():
                    log.warning("Triton at %s does not answer health checks; refusing new "
                                "videos on it until it does", endpoint)
                    down.set()
            if resolved:  # (a failed lookup says nothing of who left)
                for gone in [e for e in self._broken if e not in endpoints]:
                    del self._broken[gone]  # left DNS: an address reused later starts clean
            for endpoint, live in zip(endpoints, answers, strict=True):
                # In the background, one at a time per endpoint: a probe can take seconds,
                # and the liveness polls above must keep their pace.
                if live and endpoint in self._broken and endpoint not in self._probing:
                    self._probing[endpoint] = asyncio.create_task(self._probe_broken(endpoint))
            await asyncio.sleep(HEALTH_POLL_S)

    async def _live(self, endpoint: str) -> bool:
        try:
            return bool(await self._client(endpoint).is_server_live(
                client_timeout=HEALTH_TIMEOUT_S))
        except InferenceServerException:
            return False
        except Exception:  # a health check must never stop the watcher
            log.debug("health check of %s failed", endpoint, exc_info=True)
            return False

    async def close(self) -> None:
        for task in list(self._probing.values()):
            task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing must not fail shutdown
                log.debug("closing a Triton client failed", exc_info=True)

    async def ready(self) -> tuple[bool, str]:
        ready = await self.refresh()
        if not ready:
            return False, f"triton: {self._problem}"
        return True, f"triton: {len(ready)} of {self._known} endpoint(s) ready"

    # -- what is served --------------------------------------------------------------------

    @property
    def models(self) -> dict[str, ModelInfo]:
        return {} if self._info is None else {self._info.name: self._info}

    @property
    def default_model(self) -> str:
        if self._info is None:
            raise BackendUnavailable(f"Triton is not ready: {self._problem}")
        return self._info.name

    async def refresh(self) -> list[str]:
        """Ask every endpoint whether its models are ready and what they serve. Returns the
        ready endpoints that serve the current model (adopting a new model only when no
        ready endpoint serves the current one any more, e.g. after a weights change)."""
        try:
            endpoints = await self._endpoints(fresh=True)
        except BackendUnavailable as exc:
            self._problem = exc.detail
            return []
        self._known = len(endpoints)
        for gone in [e for e in self._clients if e not in endpoints and not self._in_flight[e]]:
            # an address that left DNS (a Triton pod went away) and has no video in flight
            await self._clients.pop(gone).close()
            self._in_flight.pop(gone, None)
        probes = await asyncio.gather(*(self._probe(e) for e in endpoints))
        served = {e: s for e, s in zip(endpoints, probes, strict=True) if isinstance(s, _Served)}
        problems = [f"{e}: {s}" for e, s in zip(endpoints, probes, strict=True)
                    if isinstance(s, str)]
        self._served = served
        for endpoint in served:  # it just answered: no need to wait for the next poll
            if self._down[endpoint].is_set():
                log.info("Triton at %s answers again", endpoint)
                self._down[endpoint].clear()
        if served and (self._info is None or not any(
                s.info == self._info for s in served.values())):
            new = next(iter(served.values())).info
            if self._info is not None:
                log.warning("Triton now serves weights %s instead of %s",
                            new.weights_sha256[:12], self._info.weights_sha256[:12])
            self._info = new
        ready = [e for e, s in served.items() if s.info == self._info]
        if not ready:
            self._problem = "; ".join(problems) or "no endpoint"
        return ready

    async def _probe(self, endpoint: str) -> _Served | str:
        """What the endpoint serves, or why it cannot serve."""
        client = self._client(endpoint)
        try:
            for model in self._models.values():
                if not await client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S):
                    return f"model {model} is not ready"
            if endpoint in self._broken and not await self._runs_again(endpoint):
                why = self._broken.get(endpoint)  # another probe may have cleared it since
                if why is not None:
                    return why
            configs = {d: await client.get_model_config(m, as_json=True,
                                                        client_timeout=PROBE_TIMEOUT_S)
                       for d, m in self._models.items()}
        except InferenceServerException as exc:
            return f"{exc.status() or 'error'}: {exc.message()}"
        params = {d: c.string_parameters(cfg.get("config", cfg)) for d, cfg in configs.items()}
        try:
            infos = {d: ModelInfo.from_json(p.get(c.MODEL_INFO, "")) for d, p in params.items()}
        except ValueError as exc:
            return (f"{exc}; the model repository must be prepared from an export "
                    "(`ivvae triton-serve` or docker/triton_prepare.py)")
        if infos["encoder"].weights_sha256 != infos["decoder"].weights_sha256:
            return "the encoder and decoder serve different weights"
        precision = {d: p.get(c.PRECISION) or "float32" for d, p in params.items()}
        wanted = {"encoder": self.settings.encode_precision,
                  "decoder": self.settings.decode_precision}
        if precision != wanted:
            return (f"Triton computes in {precision} but this gateway is configured for "
                    f"{wanted} (IVVAE_ENCODE_PRECISION / IVVAE_DECODE_PRECISION key the "
                    "result cache): make them agree")
        raw = infos["encoder"]
        info = dataclasses.replace(raw, name=self.settings.model_name or raw.name,
                                   source=f"triton:{raw.source}")
        return _Served(info, precision)

    async def _probe_broken(self, endpoint: str) -> None:
        try:
            await self._runs_again(endpoint)
        finally:
            self._probing.pop(endpoint, None)

    async def _runs_again(self, endpoint: str) -> bool:
        """Whether every model at ``endpoint`` runs requests again: a data-less RELEASE of a
        sequence nobody uses goes through the model instance (its python stub) and changes
        nothing. Clears the endpoint's broken mark when it does."""
        client = self._client(endpoint)
        marked = self._broken.get(endpoint)
        release = InferInput(c.RELEASE, [1, 1], "BOOL")
        release.set_data_from_numpy(np.ones((1, 1), dtype=bool))
        for model in self._models.values():
            try:
                await client.infer(model, [release], sequence_id=_correlation_id(),
                                   sequence_start=True, sequence_end=True,
                                   client_timeout=PROBE_TIMEOUT_S)
            except InferenceServerException as exc:
                self._broken[endpoint] = (f"model {model} cannot run requests: "
                                          f"{exc.message() or exc}")
                return False
            except Exception:  # a probe must never stop the watcher; the mark stays
                log.debug("probing %s failed", endpoint, exc_info=True)
                return False
        now = self._broken.get(endpoint)
        if now is None:
            return True  # another probe got there first
        if now is not marked:
            return False  # a step failed there while this probe ran: that is newer
        log.info("Triton at %s runs requests again", endpoint)
        del self._broken[endpoint]
        return True

    # -- endpoints -------------------------------------------------------------------------

    def _client(self, endpoint: str) -> grpcclient.InferenceServerClient:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = grpcclient.InferenceServerClient(
                endpoint, channel_args=CHANNEL_ARGS)
        return client

    async def _endpoints(self, *, fresh: bool = False) -> list[str]:
        if self._dns is None:
            return self._static
        at, resolved = self._resolved
        if resolved and not fresh and time.monotonic() - at < DNS_CACHE_S:
            return resolved
        host, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise BackendUnavailable(f"cannot resolve {host}: {exc}") from None
        addresses = sorted({str(info[4][0]) for info in infos})
        resolved = [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
        if not resolved:
            raise BackendUnavailable(f"{host} resolves to no address")
        self._resolved = (time.monotonic(), resolved)
        return resolved

    async def _candidates(self) -> list[str]:
        """Endpoints for a new sequence, fewest in flight first; those known to serve other
        weights are left out."""
        endpoints = await self._endpoints()
        answering = [e for e in endpoints if not self._down[e].is_set()]
        if not answering:
            raise BackendUnavailable(
                f"Triton at {', '.join(endpoints)} does not answer health checks (within "
                f"{HEALTH_TIMEOUT_S:g} s); retry later")
        working = [e for e in answering if e not in self._broken]
        if not working:  # the watcher probes them, and lets them back in when they work
            raise BackendUnavailable("; ".join(
                f"Triton at {e}: {self._broken[e]}" for e in answering) + "; retry later")
        answering = working
        info = self._info
        usable = [e for e in answering
                  if info is None or e not in self._served or self._served[e].info == info]
        return sorted(usable or answering, key=lambda e: self._in_flight[e])

    # -- sessions --------------------------------------------------------------------------

    def _check_model(self, model: str) -> ModelInfo:
        info = self._info
        if info is None:
            raise BackendUnavailable(f"Triton is not ready: {self._problem}")
        if model != info.name:
            raise UnknownModel(f"unknown model {model!r}; served: [{info.name!r}]")
        return info

    def encode_session(self, model: str) -> EncodeSession:
        return SequenceEncode(_Sequence(self, "encoder", self._check_model(model)))

    def decode_session(self, model: str, frames_dtype: FramesDtype = "uint8") -> DecodeSession:
        return SequenceDecode(_Sequence(self, "decoder", self._check_model(model),
                                        frames_dtype))


class _Sequence:
    """One video's steps on one endpoint, one request at a time."""

    def __init__(self, backend: TritonBackend, direction: str, info: ModelInfo,
                 frames_dtype: FramesDtype = "uint8") -> None:
        self.backend = backend
        self.direction = direction
        self.info = info
        self.model = backend._models[direction]
        self.input_name, self.output_names = c.TENSORS[direction]
        if direction == "decoder":
            self.output_names = (c.DECODER_FRAMES[frames_dtype],)
        self.corrid = _correlation_id()
        self.endpoint: str | None = None
        self.started = False  # the first step succeeded
        self.sent = False  # a request reached the wire (Triton may hold state)
        self.closed = False

    async def step(self, array: np.ndarray, *, first: bool) -> list[np.ndarray]:
        tensor = InferInput(self.input_name, list(array.shape),
                            "UINT8" if array.dtype == np.uint8 else "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        kind = f"{'encode' if self.direction == 'encoder' else 'decode'}_" + (
            "first" if first else "next")
        began = time.perf_counter()
        result = await (self._start(tensor) if first else self._call(tensor))
        self.backend.metrics.batch_seconds.labels(kind).observe(time.perf_counter() - began)
        return [result.as_numpy(name) for name in self.output_names]

    async def _start(self, tensor: InferInput) -> InferResult:
        """The first step, retried on connection errors (a START resets any state, so a
        repeat is safe), on another endpoint when there are several."""
        backend = self.backend
        retries = backend.settings.triton_connect_retries
        failed: set[str] = set()
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S)) - 1])
            try:
                candidates = await backend._candidates()
            except BackendUnavailable:
                if attempt == retries:
                    raise
                continue
            self._pin(next((e for e in candidates if e not in failed), candidates[0]))
            try:
                result = await self._call(tensor, start=True)
            except BackendUnavailable as exc:
                if attempt == retries:
                    raise
                assert self.endpoint is not None
                failed.add(self.endpoint)
                log.info("sequence %d: %s; retrying (%d of %d)", self.corrid, exc.detail,
                         attempt + 1, retries)
                continue
            self.started = True
            return result
        raise AssertionError("unreachable")

    def _pin(self, endpoint: str) -> None:
        in_flight = self.backend._in_flight
        if self.endpoint is not None:
            in_flight[self.endpoint] -= 1
        self.endpoint = endpoint
        in_flight[endpoint] += 1

    async def _call(self, tensor: InferInput | None, *, start: bool = False, end: bool = False,
                    timeout: float | None = None) -> InferResult:
        assert self.endpoint is not None
        client = self.backend._client(self.endpoint)
        inputs = [tensor] if tensor is not None else []
        if tensor is None:  # the data-less request that ends the sequence
            release = InferInput(c.RELEASE, [1, 1], "BOOL")
            release.set_data_from_numpy(np.ones((1, 1), dtype=bool))
            inputs.append(release)
        timeout = timeout or self.backend.settings.triton_timeout_s
        down = self.backend._down[self.endpoint]
        if down.is_set():
            raise BackendUnavailable(f"Triton at {self.endpoint} does not answer health checks")
        self.sent = True
        call = asyncio.ensure_future(client.infer(
            self.model, inputs, sequence_id=self.corrid, sequence_start=start,
            outputs=None if tensor is None else [InferRequestedOutput(name)
                                                 for name in self.output_names],
            sequence_end=end, client_timeout=timeout,
            parameters={c.WEIGHTS_PARAMETER: self.info.weights_sha256} if start else None,
        ))
        watch = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait((call, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not call.done():
                call.cancel()
                await asyncio.wait([call])
        if call.cancelled():  # the endpoint stopped answering while the step ran
            raise BackendUnavailable(
                f"Triton at {self.endpoint} stopped answering during a step")
        try:
            return call.result()
        except InferenceServerException as exc:
            raise self._error(exc, start=start, timeout=timeout) from None

    def _error(self, exc: InferenceServerException, *, start: bool,
               timeout: float) -> IVVAEError:
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
        where = f"Triton {self.model} at {self.endpoint}"
        if status.endswith("DEADLINE_EXCEEDED"):
            return DeadlineExceeded(f"{where}: a step took longer than {timeout:g} s")
        if status.endswith("UNAVAILABLE"):
            return BackendUnavailable(f"{where} is unavailable: {message}")
        if status.endswith("INVALID_ARGUMENT"):
            if c.UNKNOWN_SEQUENCE_MESSAGE in message and not start:
                return BackendUnavailable(f"{where} lost the video's sequence (restarted, or "
                                          f"idle too long): {message}")
            return (InvalidInput if self.direction == "encoder" else InvalidLatent)(message)
        if status.endswith("RESOURCE_EXHAUSTED"):
            return Overloaded(f"{where}: {message}")
        if status.endswith("INTERNAL") and "not healthy" in message.lower():
            assert self.endpoint is not None
            if self.endpoint not in self.backend._broken:
                log.warning("%s: a model instance cannot run requests (%s); sending no new "
                            "videos there until it does", where, message)
            self.backend._broken[self.endpoint] = f"model {self.model} cannot run requests: " \
                                                  f"{message}"
            return BackendUnavailable(f"{where}: its model instance has failed ({message}); "
                                      "retry later")
        return IVVAEError(f"{where} failed: {status} {message}")

    async def close(self) -> None:
        """End the sequence on Triton (frees its slot and cache); never raises."""
        if self.closed:
            return
        self.closed = True
        if self.endpoint is None:
            return
        try:
            if self.sent:
                await self._call(None, end=True,
                                 timeout=min(RELEASE_TIMEOUT_S,
                                             self.backend.settings.triton_timeout_s))
        except IVVAEError as exc:
            log.debug("sequence %d: release failed (its time-to-live will free it): %s",
                      self.corrid, exc.detail)
        finally:
            self.backend._in_flight[self.endpoint] -= 1
