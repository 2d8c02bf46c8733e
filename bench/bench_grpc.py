"""gRPC flow-control windows: memory held by refused uploads vs upload time over a long RTT.

Run: ``python bench/bench_grpc.py`` (about a minute on 2 cores). In one run, side by side,
one real ``ivvae serve`` per setting of ``IVVAE_GRPC_STREAM_WINDOW_BYTES`` (the fixed
4 MiB default, and 0: grpc's bandwidth-probed windows):

1. server RSS growth (after, and peak during) ``--rounds`` rounds of 20 concurrent
   unauthenticated 60 MB ``EncodeUnary`` calls (refused before their message is read: what
   they hold is what their streams' windows let in);
2. the time of one authenticated 20 MB ``EncodeUnary`` upload (not a video, so the answer
   is INVALID_ARGUMENT right after the read), direct and through a loopback proxy that
   delays every chunk by ``--delay-ms`` each way (a long round trip).

Loopback only: servers and proxy bind 127.0.0.1 on free ports and are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, free_port, make_weights  # noqa: E402

from ivvae.api.grpc.gen import ivvae_pb2 as pb  # noqa: E402
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc  # noqa: E402

KEY = "bench-key"
REFUSED_BYTES = 60 << 20
UPLOAD_BYTES = 20 << 20
OPTIONS = [("grpc.max_send_message_length", REFUSED_BYTES + (1 << 20))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def refused_round(target: str) -> None:
    video = bytes(REFUSED_BYTES)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.IVVAEStub(channel)

        async def one() -> None:
            try:
                await stub.EncodeUnary(pb.EncodeUnaryRequest(video=video), timeout=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OK:
                    raise
            else:
                raise RuntimeError("an unauthenticated call was admitted")

        await asyncio.gather(*(one() for _ in range(20)))


async def upload_s(target: str) -> float:
    video = bytes(UPLOAD_BYTES)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        t0 = time.perf_counter()
        try:
            await stub.EncodeUnary(pb.EncodeUnaryRequest(video=video),
                                   metadata=(("authorization", f"Bearer {KEY}"),), timeout=300)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
        return time.perf_counter() - t0


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
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def delayed_upload_s(grpc_port: int, delay_s: float) -> float:
    pipes: list[asyncio.Future[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", grpc_port)
        pipes.append(asyncio.gather(_pipe(reader, up_writer, delay_s),
                                    _pipe(up_reader, writer, delay_s), return_exceptions=True))
        with contextlib.suppress(asyncio.CancelledError):
            await pipes[-1]

    port = free_port()
    proxy = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        return await upload_s(f"127.0.0.1:{port}")
    finally:
        proxy.close()
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


def measure(weights: Path, window: int, rounds: int, delay_s: float) -> dict[str, float]:
    with ServeProcess(weights, IVVAE_API_KEYS=KEY, IVVAE_TORCH_THREADS="1",
                      IVVAE_GRPC_STREAM_WINDOW_BYTES=str(window)) as srv:
        assert srv.proc is not None
        target = f"127.0.0.1:{srv.grpc_port}"
        pid = srv.proc.pid
        before = rss_mb(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], rss_mb(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for _ in range(rounds):
                asyncio.run(refused_round(target))
        finally:
            done.set()
            sampler.join()
        growth, peak_growth = rss_mb(pid) - before, peak[0] - before
        direct = min(asyncio.run(upload_s(target)) for _ in range(2))
        delayed = min(asyncio.run(delayed_upload_s(srv.grpc_port, delay_s)) for _ in range(2))
    return {"growth": growth, "peak": peak_growth, "direct": direct, "delayed": delayed}


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
            ("20 MB upload, loopback", "direct", "s", 2),
            (f"20 MB upload, {rtt:g} ms round trip", "delayed", "s", 2)]
    print(f"{'':44s} {'fixed 4 MiB':>12s} {'probed (0)':>12s}")
    for label, key, unit, digits in rows:
        print(f"{label:44s} {fixed[key]:>9.{digits}f} {unit:2s} {probed[key]:>9.{digits}f} {unit}")
    print(f"peak held by refused uploads, probed / fixed: "
          f"{probed['peak'] / max(fixed['peak'], 1.0):.1f}x")
    print(f"upload time at {rtt:g} ms, fixed / probed: "
          f"{fixed['delayed'] / probed['delayed']:.2f}x")


if __name__ == "__main__":
    main()
