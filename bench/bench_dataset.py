"""``encode-dataset`` throughput: clips/s at concurrency 1 vs 4 through a real server.

Run: ``python bench/bench_dataset.py`` (a minute or two on 2 cores). It writes a tiny model
and a set of distinct generated clips, starts ``ivvae serve`` (gRPC only, result cache
off) in a subprocess on a free loopback port, warms it up, then encodes a fresh copy of the
clips with ``encode_dataset`` at each concurrency (``--url http`` to go over HTTP
instead) and prints clips/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, make_weights  # noqa: E402


def make_clips(folder: Path, count: int, frames: int, size: int, first_fps: int) -> Path:
    """``count`` distinct clips (each its own frame rate, so its own bytes and cache key)."""
    from tests import media

    folder.mkdir(parents=True)
    for i in range(count):
        media.make_video(folder / f"clip{i:03d}.mp4", frames=frames, width=size, height=size,
                         fps=first_fps + i)
    return folder


def run(src: Path, out: Path, url: str, concurrency: int) -> float:
    from ivvae.dataset import encode_dataset

    summary = asyncio.run(encode_dataset(src, out, server=url, concurrency=concurrency))
    if summary.encoded != summary.total:
        raise RuntimeError(f"only {summary.encoded} of {summary.total} clips encoded")
    return summary.clips_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64, help="clip width and height")
    parser.add_argument("--z", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--url", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--server-threads", type=int, default=0,
                        help="torch threads in the server (0: torch's default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = make_weights(tmp / "weights.safetensors", args.z, args.dim)
        warmup = make_clips(tmp / "warmup", 4, args.frames, args.size, first_fps=5)
        sets = {c: make_clips(tmp / f"clips_c{c}", args.clips, args.frames, args.size,
                              first_fps=10 + 100 * k)
                for k, c in enumerate(args.concurrency)}
        print(f"{args.clips} clips of {args.frames} frames {args.size}x{args.size}, model "
              f"z{args.z} dim{args.dim}, over {args.url}, {os.cpu_count()} CPUs, server "
              f"threads {args.server_threads or 'default'}", flush=True)
        # torch's intra-op threads in the server (default: one per core)
        threads = ({"OMP_NUM_THREADS": str(args.server_threads),
                    "MKL_NUM_THREADS": str(args.server_threads)} if args.server_threads else {})
        with ServeProcess(weights, IVVAE_CACHE_MEMORY_MAX_BYTES="0", **threads) as server:
            url = server.grpc_url if args.url == "grpc" else server.url
            run(warmup, tmp / "out_warmup", url, max(args.concurrency))
            rates = {c: run(src, tmp / f"out_c{c}", url, c) for c, src in sets.items()}
    for c, rate in rates.items():
        print(f"concurrency {c}: {rate:.2f} clips/s")
    first, last = args.concurrency[0], args.concurrency[-1]
    print(f"ratio (concurrency {last} / {first}): {rates[last] / rates[first]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
