"""gRPC flow-control windows: memory held by refused uploads vs upload time over a long RTT.

Run: ``python bench/bench_grpc.py`` (about a minute on 2 cores). In one run, side by side,
one real ``ivvae serve`` per setting of ``IVVAE_GRPC_STREAM_WINDOW_BYTES`` (the fixed
4 MiB default, and 0: grpc's bandwidth-probed windows):

1. server RSS growth (after, and peak during: ``VmHWM``) ``--rounds`` rounds of 20 concurrent
   unauthenticated 60 MB ``EncodeUnary`` calls (refused before their message is read: what
   they hold is what their streams' windows let in);
2. the time of an authenticated 20 MB ``EncodeUnary`` upload (not a video, so the answer
   is INVALID_ARGUMENT right after the read) on a new connection, and of the next one on
   the same connection (probed windows have grown by then); direct, and through a loopback
   proxy that delays every chunk by ``--delay-ms`` each way (a long round trip).

Loopback only: servers and proxy bind 127.0.0.1 on free ports and are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    ServeProcess,
    free_port,
    make_weights,
    reset_peak_rss,
    status_mb,
)

from ivvae.api.grpc.gen import ivvae_pb2 as pb  # noqa: E402
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc  # noqa: E402

KEY = "bench-key"
REFUSED_BYTES = 60 << 20
UPLOAD_BYTES = 20 << 20
OPTIONS = [("grpc.max_send_message_length", REFUSED_BYTES + (1 << 20))]
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL,
           grpc.StatusCode.UNAVAILABLE}


async def refused_round(target: str) -> list[grpc.StatusCode]:
    """20 concurrent unauthenticated 60 MB ``EncodeUnary`` calls on one connection: their
    status codes."""
    video = bytes(REFUSED_BYTES)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.IVVAEStub(channel)

        async def one() -> grpc.StatusCode:
            try:
                await stub.EncodeUnary(pb.EncodeUnaryRequest(video=video), timeout=60)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        return list(await asyncio.gather(*(one() for _ in range(20))))


def check_refused(codes: list[grpc.StatusCode]) -> None:
    """All refused: UNAUTHENTICATED, or what a client sees whose upload was cut off by that
    answer (INTERNAL, UNAVAILABLE); at least one UNAUTHENTICATED."""
    if not set(codes) <= REFUSED or grpc.StatusCode.UNAUTHENTICATED not in codes:
        raise AssertionError(f"unexpected answers to unauthenticated calls: {codes}")


async def upload_s(target: str) -> tuple[float, float]:
    """Seconds of two uploads, one after the other on one connection: the first starts at
    the initial windows, the second at what the first left (grown, if probed)."""
    video = bytes(UPLOAD_BYTES)
    times = []
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.IVVAEStub(channel)
        for _ in range(2):
            t0 = time.perf_counter()
            try:
                await stub.EncodeUnary(pb.EncodeUnaryRequest(video=video),
                                       metadata=(("authorization", f"Bearer {KEY}"),),
                                       timeout=300)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
            times.append(time.perf_counter() - t0)
    return times[0], times[1]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, every chunk ``delay_s`` late (latency, not bandwidth)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(1 << 16)
            await queue.put((time.monotonic() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def delayed_upload_s(grpc_port: int, delay_s: float) -> tuple[float, float]:
    """``upload_s`` through a loopback proxy that delays each direction by ``delay_s``."""
    pipes: list[asyncio.Future[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", grpc_port)
        try:
            pipes.append(asyncio.gather(_pipe(reader, up_writer, delay_s),
                                        _pipe(up_reader, writer, delay_s)))
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pipes[-1]
        finally:
            writer.close()
            up_writer.close()

    port = free_port()
    proxy = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        return await upload_s(f"127.0.0.1:{port}")
    finally:
        proxy.close()
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await proxy.wait_closed()


def measure(weights: Path, window: int, rounds: int, delay_s: float) -> dict[str, float]:
    with ServeProcess(weights, IVVAE_API_KEYS=KEY, IVVAE_TORCH_THREADS="1",
                      IVVAE_GRPC_STREAM_WINDOW_BYTES=str(window)) as srv:
        assert srv.proc is not None
        target = f"127.0.0.1:{srv.grpc_port}"
        pid = srv.proc.pid
        # No warm-up upload: the allocator would keep its freed buffers and the rounds
        # would reuse them unseen.
        reset_peak_rss(pid)
        before = status_mb(pid, "VmRSS")
        for _ in range(rounds):
            check_refused(asyncio.run(refused_round(target)))
        growth = status_mb(pid, "VmRSS") - before
        peak = status_mb(pid, "VmHWM") - before
        direct = [asyncio.run(upload_s(target)) for _ in range(2)]
        delayed = [asyncio.run(delayed_upload_s(srv.grpc_port, delay_s)) for _ in range(2)]
    return {"growth": growth, "peak": peak,
            "direct": min(t[0] for t in direct), "direct2": min(t[1] for t in direct),
            "delayed": min(t[0] for t in delayed), "delayed2": min(t[1] for t in delayed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="each way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(Path(tmp) / "w.safetensors", z=4, dim=4)
        fixed = measure(weights, 4 << 20, args.rounds, args.delay_ms / 1000)
        probed = measure(weights, 0, args.rounds, args.delay_ms / 1000)
    rtt = 2 * args.delay_ms
    rows = [(f"RSS growth, {args.rounds} x 20 refused 60 MB uploads", "growth", "MB", 0),
            ("  peak RSS growth during them", "peak", "MB", 0),
            ("20 MB upload, loopback, new connection", "direct", "s", 2),
            ("  the next one on that connection", "direct2", "s", 2),
            (f"20 MB upload, {rtt:g} ms round trip, new connection", "delayed", "s", 2),
            ("  the next one on that connection", "delayed2", "s", 2)]
    print(f"{'':48s} {'fixed 4 MiB':>12s} {'probed (0)':>12s}")
    for label, key, unit, digits in rows:
        print(f"{label:48s} {fixed[key]:>9.{digits}f} {unit:2s} {probed[key]:>9.{digits}f} {unit}")
    print(f"peak held by refused uploads, probed / fixed: "
          f"{probed['peak'] / max(fixed['peak'], 1.0):.1f}x")
    print(f"upload time at {rtt:g} ms, fixed / probed: new connection "
          f"{fixed['delayed'] / probed['delayed']:.2f}x, next upload "
          f"{fixed['delayed2'] / probed['delayed2']:.2f}x")


if __name__ == "__main__":
    main()
