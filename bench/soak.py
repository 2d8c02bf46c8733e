"""Soak: many clients against one real ``ivvae serve`` on loopback, for a bounded time.

Run: ``python bench/soak.py --seconds 300 --clients 12`` (``--quick``: 20 s, 4 clients).
Each client loops over a mix of requests: encodes of small clips (new and repeated, so
both cache misses and hits), decodes of a latent, and bad inputs (garbage, a truncated
clip, a malformed latent) that must get a 4xx. At the end it prints requests, errors by
status, p50/p99 latency per kind, and the server's RSS, peak RSS and thread count at the
start, the middle and the end, side by side, so that a leak or a stall shows as growth.

Loopback only: the server binds 127.0.0.1 on free ports and is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, make_weights  # noqa: E402


def process_stats(pid: int) -> dict[str, float]:
    """RSS and peak RSS (MB) and threads of ``pid``, from /proc."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def clips(n: int) -> list[bytes]:
    from tests import media

    return [media.make_video(None, frames=5 + 4 * (i % 3), width=32 + 8 * (i % 4), height=24)
            for i in range(n)]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.unexpected: list[str] = []

    def add(self, kind: str, status: int, seconds: float, expect: range) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            self.latency[kind].append(seconds)
            if status not in expect:
                self.unexpected.append(f"{kind}: {status}")


def client_loop(url: str, stop: float, seed: int, videos: list[bytes], latent: bytes,
                tally: Tally) -> None:
    rng = np.random.default_rng(seed)
    truncated = videos[0][: len(videos[0]) // 2]
    bad_latent = latent[:8] + b"{" * 64 + latent[72:]
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < stop:
            pick = rng.random()
            ok = range(200, 201)
            if pick < 0.4:
                kind, path, body, expect = "encode", "/encode", videos[
                    int(rng.integers(len(videos)))], ok
            elif pick < 0.6:
                kind, path, body, expect = "encode-new", "/encode", _variant(videos[0], rng), ok
            elif pick < 0.8:
                kind, path, body, expect = "decode", "/decode", latent, ok
            else:
                body = [b"garbage" * 50, truncated, bad_latent][int(rng.integers(3))]
                path = "/decode" if body is bad_latent else "/encode"
                kind, expect = "bad", range(400, 500)
            start = time.perf_counter()
            try:
                r = http.post(path, content=body, headers={"content-type": "video/mp4"})
                status = r.status_code
            except httpx.HTTPError:
                status = 0  # connection failed
            tally.add(kind, status, time.perf_counter() - start, expect)


def _variant(video: bytes, rng: np.random.Generator) -> bytes:
    """The same clip with a random trailing byte run: new content, so a cache miss."""
    return video + rng.bytes(8)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="20 s, 4 clients")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.clients = 20.0, 4
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(Path(tmp) / "soak.safetensors", z=4, dim=8)
        videos = clips(6)
        with ServeProcess(weights, IVVAE_ENABLE_GRPC="false", IVVAE_TORCH_THREADS="1") as srv:
            assert srv.proc is not None
            latent = httpx.post(srv.url + "/encode", content=videos[0],
                                headers={"content-type": "video/mp4"}, timeout=120).content
            tally = Tally()
            stats = {"start": process_stats(srv.proc.pid)}
            stop = time.monotonic() + args.seconds
            threads = [threading.Thread(target=client_loop, daemon=True,
                                        args=(srv.url, stop, i, videos, latent, tally))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.seconds / 2)
            stats["middle"] = process_stats(srv.proc.pid)
            for t in threads:
                t.join()
            stats["end"] = process_stats(srv.proc.pid)
    total = sum(tally.statuses.values())
    print(f"soak: {args.clients} clients, {args.seconds:g} s, {total} requests "
          f"({total / args.seconds:.1f}/s)")
    print("\nrequests by kind and status")
    for (kind, status), n in sorted(tally.statuses.items()):
        print(f"  {kind:<11} {status:>4}  {n:>7}")
    print("\nlatency (s)     p50      p99")
    for kind, values in sorted(tally.latency.items()):
        print(f"  {kind:<11} {statistics.median(values):8.3f} {percentile(values, 0.99):8.3f}")
    print("\nserver          RSS MB   peak MB   threads")
    for when, s in stats.items():
        print(f"  {when:<11} {s['VmRSS']:8.0f} {s['VmHWM']:9.0f} {s['Threads']:9.0f}")
    print(f"\nunexpected statuses: {len(tally.unexpected)}"
          + (f" (first: {tally.unexpected[:5]})" if tally.unexpected else ""))
    if tally.unexpected:
        sys.exit(1)


if __name__ == "__main__":
    main()
