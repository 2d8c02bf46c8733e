"""Connection bounds of a real ``ivvae serve``, over real sockets: slow and idle clients are
closed, oversized heads refused, early answers end the connection cleanly, too many
connections are turned away, and bad latents leave a keep-alive connection usable."""

from __future__ import annotations

import contextlib
import http.client
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench._common import ServeProcess

from tests import media
from tests.api.http.test_bad_input import malformed_latents
from tests.scrape import OPS, errors, ops, requests, scrape

HEADER_TIMEOUT_S = 3.0  # 64 connects, or a keep-alive gap, must fit well inside it
BODY_TIMEOUT_S = 1.0
BODY_MIN_RATE = 500  # bytes a second, after the first BODY_TIMEOUT_S
MAX_CONNECTIONS = 64
# How long a client waits for what the server must do "within its timeout": the timeout
# plus room for a loaded CI machine. Not a performance check.
SLACK_S = 10.0
MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServeProcess]:
    with ServeProcess(
        tiny_weights,
        IVVAE_ENABLE_GRPC="false",
        IVVAE_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        IVVAE_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        IVVAE_MIN_UPLOAD_RATE=str(BODY_MIN_RATE),
        IVVAE_HTTP_KEEPALIVE_S="30",
        IVVAE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        IVVAE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        IVVAE_TORCH_THREADS="1",
    ) as srv:
        yield srv


def _connect(server: ServeProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SLACK_S)
    return sock


def _exchange(server: ServeProcess, request: bytes) -> bytes:
    """Send ``request`` on a new connection; everything until the server closes it."""
    with _connect(server) as sock:
        sock.sendall(request)
        return _read_all(sock)


def _requests(server: ServeProcess, op: str, outcome: str) -> float:
    """``ivvae_requests_total`` for ``op`` over HTTP with ``outcome``, from /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=SLACK_S)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ivvae_requests_total{") and f'op="{op}"' in line
               and 'transport="http"' in line and f'outcome="{outcome}"' in line)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (raises socket.timeout if it never does)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_healthy(server: ServeProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=SLACK_S)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()


def test_slow_header_connections_are_closed_by_the_server(server: ServeProcess) -> None:
    socks = [_connect(server) for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        for sock in socks:
            assert _read_all(sock) == b""  # closed, not answered, within SLACK_S
    finally:
        for sock in socks:
            sock.close()
    _wait_healthy(server)


def test_idle_connections_are_closed_and_do_not_pile_up(server: ServeProcess) -> None:
    socks = [_connect(server) for _ in range(20)]
    try:
        for sock in socks:
            assert _read_all(sock) == b""
    finally:
        for sock in socks:
            sock.close()


def _wait_counted(server: ServeProcess, op: str, outcome: str, at_least: float) -> None:
    """Wait until ``ivvae_requests_total`` for ``op`` over HTTP with ``outcome`` reaches
    ``at_least`` (the server counts a request just before or after its client sees it)."""
    deadline = time.monotonic() + SLACK_S
    while requests(scrape(server.url), op, "http", outcome) < at_least:
        assert time.monotonic() < deadline, f"{op} {outcome} was not counted"
        time.sleep(0.1)


def test_a_1mb_header_gets_a_4xx_and_the_connection_ends(server: ServeProcess) -> None:
    before = scrape(server.url)
    with _connect(server) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        # The server answers and stops reading long before the end.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    _wait_healthy(server)
    # Refused before it was routed: counted as such.
    after = scrape(server.url)
    assert (requests(after, "unrouted", "http", "invalid_input")
            == requests(before, "unrouted", "http", "invalid_input") + 1)
    assert errors(after, "invalid_input") == errors(before, "invalid_input") + 1


def test_too_many_headers_get_431(server: ServeProcess) -> None:
    before = scrape(server.url)
    # A path and a method of the client's choosing: neither may become a label value.
    path, method = f"/random-{secrets.token_hex(6)}", f"JUNK{secrets.token_hex(3).upper()}"
    for verb, target in (("GET", "/healthz"), (method, path)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=SLACK_S)
        conn.putrequest(verb, target)
        for i in range(200):
            conn.putheader(f"X-H{i}", "v")
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 431 and b"headers" in reply.read()
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=SLACK_S)
    conn.request(method, path)  # an ordinary head: a 404 or 405
    assert conn.getresponse().status in (404, 405)
    conn.close()
    after = scrape(server.url)
    assert (requests(after, "unrouted", "http", "invalid_input")
            == requests(before, "unrouted", "http", "invalid_input") + 2)
    assert errors(after, "invalid_input") == errors(before, "invalid_input") + 2
    assert ops(after) <= OPS
    assert not [labels for _, labels, _ in after
                if path in str(labels) or method in str(labels)]


def test_early_413_on_a_body_still_arriving_closes_the_connection(server: ServeProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 16384 + b"\0" * 16384 + b"\r\n"
        sent = 0
        try:
            while sent < 4 * MAX_UPLOAD:  # well past the limit, and never finished
                sock.sendall(chunk)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(sock)  # the 413, then the server's close: no stall
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"too_large" in reply
    _wait_healthy(server)


def test_a_stalled_body_is_cut_off(server: ServeProcess) -> None:
    before = scrape(server.url)
    # 100 bytes, and 90 KB: more than the 64 KiB buffer, past which reading pauses until
    # the app takes it (and the body clock stopped for good, holding the connection).
    for sent in (100, 90_000):
        with _connect(server) as sock:
            sock.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                         b"Content-Length: 99000\r\n\r\n" + b"\0" * sent)
            reply = _read_all(sock)  # socket.timeout (SLACK_S) if the server never closes
        assert reply.startswith(b"HTTP/1.1 408"), (sent, reply[:200])
        assert b"too slowly" in reply
    _wait_healthy(server)
    # Counted by the route's meter (the app sees why its body ended), once each.
    _wait_counted(server, "encode", "deadline_exceeded",
                  requests(before, "encode", "http", "deadline_exceeded") + 2)
    after = scrape(server.url)
    assert (requests(after, "encode", "http", "deadline_exceeded")
            == requests(before, "encode", "http", "deadline_exceeded") + 2)
    assert errors(after, "deadline_exceeded") == errors(before, "deadline_exceeded") + 2


@pytest.mark.parametrize(("target", "op"), [
    (b"/encode", "encode"),  # a spooled upload
    (b"/decode", "decode"),  # a body read whole
    (b"http://x/decode", "decode"),  # absolute-form
])
def test_a_trickled_body_is_cut_off_though_no_gap_is_long(server: ServeProcess, target: bytes,
                                                          op: str) -> None:
    before = _requests(server, op, "deadline_exceeded")
    # A byte every half body timeout: each gap is fine, the pace is not.
    with _connect(server) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                     b"Content-Length: 99000\r\n\r\n" % target)
        sock.setblocking(False)
        reply, start = b"", time.monotonic()
        while not reply and time.monotonic() - start < SLACK_S:
            sock.sendall(b"\0")
            time.sleep(BODY_TIMEOUT_S / 2)
            with contextlib.suppress(BlockingIOError):
                reply = sock.recv(65536)
        # Answered while the client was still sending (a client that stopped would be cut
        # off by the gap timer alone).
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    # Counted as what it was, not as a client that went away.
    deadline = time.monotonic() + SLACK_S
    while _requests(server, op, "deadline_exceeded") < before + 1:
        assert time.monotonic() < deadline, "the 408 was not counted as deadline_exceeded"
        time.sleep(0.1)
    _wait_healthy(server)


def test_a_body_slower_than_the_gap_timeout_in_all_but_at_a_good_pace_is_served(
    server: ServeProcess,
) -> None:
    video = media.make_video(None, frames=17, width=48, height=48)
    pieces = [video[i:i + 250] for i in range(0, len(video), 250)]
    assert len(pieces) * 0.25 > 2 * BODY_TIMEOUT_S  # longer in all than the first allowance
    with _connect(server) as sock:
        sock.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(video))
        for piece in pieces:  # 1000 bytes a second, twice the minimum rate
            sock.sendall(piece)
            time.sleep(0.25)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_a_declared_size_past_any_count_is_refused_at_once(server: ServeProcess) -> None:
    reply = _exchange(server, b"POST /decode HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 99999999999999999999\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_connections_past_the_maximum_are_turned_away_at_once(server: ServeProcess) -> None:
    from ivvae.api.http.protocol import ConnectionLimits

    reserve = ConnectionLimits().probe_reserve
    before = requests(scrape(server.url), "unrouted", "http", "overloaded")
    socks = [_connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them all
        # The probe reserve: liveness checks are served (a liveness probe must not fail
        # because the service is busy), anything else gets the same 503 (readiness too:
        # the next requests had better go elsewhere).
        probes = [_connect(server) for _ in range(reserve)]
        socks += probes
        for path, status in (("/healthz", b"200"), ("/readyz", b"503"), ("/models", b"503")):
            sock = probes.pop()
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         % path.encode())
            reply = _read_all(sock)
            assert reply.startswith(b"HTTP/1.1 " + status), (path, reply[:200])
        probes[0].sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        reply = _read_all(probes[0])
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after" in reply.lower(), reply[:200]
        # Past the reserve: turned away at once, without a word from the client. The four
        # closed above come back to the reserve when the server notices, so fill it again
        # until a connection is answered unasked.
        for _ in range(reserve + 4):
            sock = _connect(server)
            socks.append(sock)
            sock.settimeout(0.5)
            try:
                reply = _read_all(sock)
            except TimeoutError:
                continue  # held: a place in the reserve
            break
        else:
            raise AssertionError("no connection was turned away past the probe reserve")
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert b"retry-after" in reply.lower()
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + SLACK_S
    while True:  # the slots come back once the server notices the closes
        try:
            _wait_healthy(server)
            break
        except (AssertionError, OSError, http.client.HTTPException):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    # Three 503s in the probe reserve, one past it (and any of _wait_healthy's that came
    # before the slots did): each counted, as refused before it was routed.
    assert requests(scrape(server.url), "unrouted", "http", "overloaded") >= before + 4


def test_bad_latents_get_4xx_and_the_keep_alive_connection_stays_usable(
    server: ServeProcess,
) -> None:
    video = media.make_video(None, frames=5, width=16, height=16)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/encode", body=video, headers={"Content-Type": "video/mp4"})
    encoded = conn.getresponse()
    good = encoded.read()
    assert encoded.status == 200
    sock = conn.sock
    for name, (data, word) in malformed_latents(good).items():
        if len(data) > MAX_UPLOAD:
            continue  # refused for its size before parsing; covered in-process
        conn.request("POST", "/decode", body=data)
        bad = conn.getresponse()
        body = bad.read()
        assert 400 <= bad.status < 500, (name, bad.status, body[:300])
        assert word.encode() in body, (name, body[:300])
        assert b"\r" not in bad.getheader("x-model", "").encode()
        conn.request("GET", "/models")
        after = conn.getresponse()
        after.read()
        assert after.status == 200, name
        assert conn.sock is sock, f"{name}: the server closed the keep-alive connection"
    conn.request("POST", "/decode", body=good)
    ok = conn.getresponse()
    assert ok.status == 200 and ok.read()[4:8] == b"ftyp"
    assert conn.sock is sock
    conn.close()


def test_a_long_query_string_is_refused_by_the_real_server(server: ServeProcess) -> None:
    # Whichever layer sees it first (h11 while the head is incomplete, the app-side guard
    # once it is whole), a head past 64 KiB is not served.
    with _connect(server) as sock:
        head = (b"GET /healthz?a=" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        reply = _read_all(sock)
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), reply[:200]
    _wait_healthy(server)


async def test_a_head_over_the_limit_in_one_piece_is_refused() -> None:
    # h11 bounds a head only while it is incomplete: one that arrives in a single read (a
    # 100 KB query string, say) was parsed whole and served. The app-side guard counts it.
    from ivvae.api.http.protocol import ConnectionLimits, _head_guard

    served: list[bytes] = []
    sent: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        served.append(scope["query_string"])  # type: ignore[arg-type]

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    guarded = _head_guard(app, ConnectionLimits(max_header_bytes=1000, max_headers=10))
    for query in (b"a=" + b"x" * 500, b"a=" + b"x" * 1000):
        scope = {"type": "http", "raw_path": b"/encode", "query_string": query,
                 "headers": [(b"host", b"x")]}
        await guarded(scope, None, send)
    assert served == [b"a=" + b"x" * 500]
    assert sent[0]["status"] == 431 and b"over 1000 bytes" in sent[1]["body"]  # type: ignore[operator]


def test_an_absolute_form_target_is_served_as_its_path(server: ServeProcess) -> None:
    # RFC 9112 3.2.2: a server must accept "GET http://host/path" (proxies send it).
    reply = _exchange(server, b"GET http://example.com/healthz HTTP/1.1\r\n"
                              b"Host: example.com\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    video = media.make_video(None, frames=5, width=16, height=16)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", f"http://127.0.0.1:{server.port}/encode?output_type=pt",
                 body=video, headers={"Content-Type": "video/mp4"})
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()[:300]
    conn.close()
