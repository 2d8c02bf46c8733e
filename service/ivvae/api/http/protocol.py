"""HTTP/1.1 connections with bounds: uvicorn's h11 protocol, plus what it lacks.

uvicorn (0.55) bounds the bytes of a request head (``h11_max_incomplete_event_size``) and
the idle time between requests (``timeout_keep_alive``), but not: the time a client takes
to send a request head (a connection that sends nothing, or a byte a second, is held
forever: slowloris), the gaps in a request body, the number of headers, or the number of
connections (idle ones exhaust file descriptors), nor a body's overall pace (one byte every
29 seconds keeps a 30-second gap timer happy for ever). And after an early response (a 413 on a
body still arriving) the connection keeps the rest of that body coming. This subclass adds
those bounds; :class:`ConnectionLimits` holds them and ``ivvae serve`` builds them from
the settings.

Why a protocol subclass: these are properties of the connection, decided before and
outside the ASGI app (a request whose head never completes never reaches the app).

Metrics: what is refused here before the app routes it (a connection past the cap, a head
with too many headers or bytes, one h11 rejects) is counted with ``metrics`` as a request
of op ``unrouted`` (``ivvae.api.metering``). A 408 is not counted here: the app's request
sees it (``BODY_TIMED_OUT``) and its meter counts it as ``deadline_exceeded`` of its route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import DeadlineExceeded, InvalidInput, NotTakenInTime, Overloaded
from ...metrics import Metrics
from ..metering import UNROUTED, count_refusal
from .answers import cut_off_by

try:  # the unsent bytes of a socket (SIOCOUTQ): Linux
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = termios = None  # type: ignore[assignment]


def _raw_response(status: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, b"content-type: application/json", b"connection: close",
            b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_OVERLOADED = json.dumps({"error": Overloaded.code,
                          "detail": "too many open connections; retry later"}).encode()
_TOO_MANY_CONNECTIONS = _raw_response(b"503 Service Unavailable", _OVERLOADED, b"retry-after: 1")

# The liveness check: what a connection past ``max_connections`` (in the probe reserve)
# may ask for. Only liveness: a readiness check that fails when connections are full is
# right (the orchestrator sends the next requests elsewhere); a liveness check that fails
# has the pod restarted, dropping every request in flight.
LIVENESS_PATH = "/healthz"


# Set in a request's scope when its body was cut off for its pace (answered 408): the app
# then sees a disconnect, and says in its log and metrics why.
BODY_TIMED_OUT = "ivvae.body_timed_out"

_BODY_TOO_SLOW = json.dumps({"error": DeadlineExceeded.code,
                             "detail": "the request body came too slowly (a gap past the body "
                                       "timeout, or under the minimum rate)"}).encode()


@dataclass
class _BodyPace:
    started: float  # loop time the body began
    received: int = 0  # bytes since (roughly: the first read may hold the head's end)
    paused_s: float = 0.0  # time reading was paused by us, which is not the client's
    paused_at: float | None = None


@dataclass(frozen=True)
class ConnectionLimits:
    """``max_header_bytes``: the whole request head (h11 answers 400 past it).
    ``max_headers``: header lines per request (431 past it). ``header_timeout_s``: from
    the connection's opening, or the end of the previous response, to a complete request
    head. ``body_timeout_s``: the longest gap between pieces of a request body (while the
    app is reading it). ``body_min_rate``: bytes a second a body must average, after a
    first ``body_timeout_s`` of grace (as Apache's mod_reqtimeout ``MinRate``: each byte
    earns ``1 / body_min_rate`` seconds more; 0: no overall bound). Time with reading
    paused by us (the app is behind) does not count against the client. A body past
    either bound is answered 408 and the connection ends. ``max_connections``: open
    connections; more are answered 503 and closed at once, except ``probe_reserve`` more
    that serve only ``GET``/``HEAD`` of the liveness path (a liveness probe that failed
    whenever the service is busiest would have the orchestrator restart it exactly then,
    dropping every request in flight); any other request on them gets the same 503.
    ``linger_s`` / ``linger_bytes``: after an early response (or one cut off), how long and
    how much of what the client still sends is read and dropped before closing (closing at
    once would reset the connection under the client's feet, and it might never read the
    response); what the client has not taken by then is dropped with a reset."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate: float = 500.0
    max_connections: int = 1024
    probe_reserve: int = 8
    linger_s: float = 2.0
    linger_bytes: int = 1 << 20


def bounded_protocol(limits: ConnectionLimits,
                     metrics: Metrics | None = None) -> type[H11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``; ``metrics``: where its
    refusals are counted."""

    class Bounded(_BoundedH11):
        pass

    Bounded.limits = limits
    Bounded.metrics = metrics
    return Bounded


class _BoundedH11(H11Protocol):
    limits = ConnectionLimits()
    metrics: Metrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = _head_guard(self.app, self.limits, lambda: self._probe_only,
                               self._refused, self._abandon, self._cut)
        self._probe_only = False  # past max_connections: health paths only
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = -1  # bytes dropped since an early response; -1: not lingering
        self._body: _BodyPace | None = None  # the pace of the request body now arriving

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The body clock stops while reading is paused (the app is behind) and must start
        # again when the app resumes it: otherwise a client that sent more than one buffer
        # of its body and then stopped was held for ever.
        pause, resume = self.flow.pause_reading, self.flow.resume_reading

        def pause_reading() -> None:
            if self._body is not None and not self.flow.read_paused:
                self._body.paused_at = self.loop.time()
            pause()

        def resume_reading() -> None:
            if self._body is not None and self._body.paused_at is not None:
                self._body.paused_s += self.loop.time() - self._body.paused_at
                self._body.paused_at = None
            resume()
            if (self.conn.their_state is h11.SEND_BODY and self._lingering < 0
                    and not self.transport.is_closing()):
                self._arm_body()

        self.flow.pause_reading = pause_reading  # type: ignore[method-assign]
        self.flow.resume_reading = resume_reading  # type: ignore[method-assign]
        over = len(self.connections) - self.limits.max_connections
        if over > self.limits.probe_reserve:
            self._refused(Overloaded.code)
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._probe_only = over > 0
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > self.limits.linger_bytes:
                self._disarm()
                self._end_linger()
            return
        pace = self._body
        if pace is not None:
            pace.received += len(data)  # before h11 sees it: the timer it arms counts these
        super().data_received(data)
        if pace is None and self._body is not None:
            self._body.received = len(data)  # the body began in this read (with the head's end)

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing() or self._lingering >= 0:
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._body is None:
                now = self.loop.time()
                # The read that began the body may have filled the buffer: reading is then
                # paused already, by us, and that time is not the client's.
                self._body = _BodyPace(started=now,
                                       paused_at=now if self.flow.read_paused else None)
            # Body pieces must keep coming, but only while we read them: with reading
            # paused (the app is behind) the client is not the slow one.
            if self.flow.read_paused:
                self._disarm()
            else:
                self._arm_body()
        elif state is not h11.IDLE:
            self._body = None
            self._disarm()  # the request is in; the app's time is bounded elsewhere

    def on_response_complete(self) -> None:
        self._body = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._linger()
            return
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm(self.limits.header_timeout_s)

    def send_400_response(self, msg: str) -> None:
        # h11 refused the request (malformed, or a head past max_header_bytes): answer, then
        # linger like after any early response instead of resetting the connection.
        detail = json.dumps({"error": InvalidInput.code, "detail": msg}).encode()
        if self.cycle is None or self.cycle.response_complete:
            # A request head (mid-body, the app's request sees the connection end instead).
            self._refused(InvalidInput.code)
        self.transport.write(_raw_response(b"400 Bad Request", detail))
        self._linger()

    def _refused(self, code: str) -> None:
        count_refusal(self.metrics, UNROUTED, "http", code)

    def _abandon(self) -> None:
        """The client stopped reading an answer already begun: reset the connection. A
        graceful close would wait, for as long as the client stays connected, to hand it
        what is queued (up to a chunk of the answer, and the socket)."""
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's end is not an unfinished response
        self._disarm()
        self._reset()

    def _reset(self) -> None:
        self._deadline = None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset (RST): the kernel drops what is queued, too
            with contextlib.suppress(OSError):  # the client reset it first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _cut(self) -> None:
        """An answer already begun failed on the server's side (its backend went away):
        end the connection after what was sent, so the client sees a body that never
        ended (the app logged why); what it has not taken by the end of the linger is
        dropped with a reset."""
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's end is not an unfinished response
        if self.transport.is_closing():
            return  # the client went first
        if not self.transport.can_write_eof():
            # TLS: no half-close; a close is how the client learns the answer ended.
            self._disarm()
            self.transport.close()
            self._deadline = self.loop.call_later(self.limits.linger_s, self._end_linger)
            return
        self._linger()

    def timeout_keep_alive_handler(self) -> None:
        self._disarm()
        super().timeout_keep_alive_handler()

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _arm_body(self) -> None:
        """The next gap, or the end of the body's overall allowance if that comes first."""
        seconds = self.limits.body_timeout_s
        pace, rate = self._body, self.limits.body_min_rate
        if pace is not None and rate > 0:
            allowed = (pace.started + pace.paused_s + self.limits.body_timeout_s
                       + pace.received / rate)
            seconds = min(seconds, max(0.0, allowed - self.loop.time()))
        self._arm(seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:
            if self.flow.read_paused:
                return  # paused by us since the timer was armed: not the client's fault
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                # Answer, and tell the app at once (its receive() sees a disconnect and
                # anything it sends is dropped): the connection is ended either way.
                cycle.response_started = cycle.disconnected = True
                cycle.scope[BODY_TIMED_OUT] = True  # type: ignore[literal-required]
                cycle.waiting_for_100_continue = False  # no "100 Continue" after the answer
                cycle.message_event.set()
                self.transport.write(_raw_response(b"408 Request Timeout", _BODY_TOO_SLOW))
                self._linger()
                return
        self.transport.close()

    def _linger(self) -> None:
        """End the connection after what was sent (an answer given before the request was
        all in, or one cut off): drop what the client still sends for a while, then
        close."""
        self._lingering = 0
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        self._disarm()
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the client reset the connection already: nothing to drop
                self.transport.close()
                return
        self._deadline = self.loop.call_later(self.limits.linger_s, self._end_linger)

    def _end_linger(self) -> None:
        """Close, or reset if the client has not taken all that was sent: a close would
        hand the socket, and what is queued in it, to the kernel, which keeps it for a
        client that reads nothing for as long as that client stays connected."""
        self._deadline = None
        if self._unsent():
            self._reset()
        else:
            self.transport.close()

    def _unsent(self) -> bool:
        """Whether bytes sent on the connection have not reached the client: in the
        transport's buffer, or in the socket's send queue (not yet acknowledged; Linux's
        SIOCOUTQ). Where the queue cannot be read, assume they have not."""
        if self.transport.get_write_buffer_size():
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return False  # closed: nothing of ours is left to send
        if fcntl is None or termios is None:
            return True
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:  # not Linux
            return True
        return struct.unpack("i", queued)[0] > 0


def _head_guard(app: Any, limits: ConnectionLimits,
                probe_only: Callable[[], bool] = lambda: False,
                refused: Callable[[str], None] = lambda code: None,
                abandon: Callable[[], None] = lambda: None,
                cut: Callable[[], None] = lambda: None) -> Any:
    """The ASGI app, refusing requests with more than ``max_headers`` headers, or a head
    over ``max_header_bytes`` (431). h11 bounds only a head that arrives in pieces: one
    that comes in a single read is parsed whole, whatever its size. While ``probe_only()``
    (the connection is in the probe reserve) anything but a liveness check gets 503.
    ``refused(code)`` counts each refusal. An answer the client did not take in time
    (``ivvae.api.http.answers``) ends with ``abandon()``, one the service's own error cut
    off after it began with ``cut()``: neither as a server error."""

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        scope = _origin_form(scope)
        if probe_only() and not (scope["method"] in ("GET", "HEAD")
                                 and scope["path"] == LIVENESS_PATH):
            refused(Overloaded.code)
            await _respond(send, 503, _OVERLOADED, (b"retry-after", b"1"))
            return
        size = len(scope["raw_path"] or b"") + len(scope["query_string"]) + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        detail: str | None = None
        if len(scope["headers"]) > limits.max_headers:
            detail = f"more than {limits.max_headers} request headers"
        elif size > limits.max_header_bytes:
            detail = f"the request head is over {limits.max_header_bytes} bytes"
        if detail is not None:
            refused(InvalidInput.code)
            await _respond(send, 431, json.dumps({"error": InvalidInput.code,
                                                  "detail": detail}).encode())
            return
        try:
            await app(scope, receive, send)
        except Exception as exc:
            error = cut_off_by(exc)
            if error is None:
                raise
            (abandon if isinstance(error, NotTakenInTime) else cut)()

    return guarded



def _origin_form(scope: Any) -> Any:
    """``POST http://host/encode`` (absolute-form, which servers must accept: RFC 9112
    3.2.2; proxies and some clients send it) as ``POST /encode``; uvicorn routes the whole
    URL as the path."""
    raw: bytes = scope.get("raw_path") or b""
    scheme, sep, rest = raw.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return scope
    raw = b"/" + rest.partition(b"/")[2]
    # In place: the connection marks this very scope later (BODY_TIMED_OUT).
    scope.update(raw_path=raw, path=unquote(raw.decode("latin-1")))
    return scope


async def _respond(send: Any, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    """A JSON error that ends the connection, sent before the app sees the request."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
