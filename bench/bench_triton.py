"""Triton backend benchmark: local vs triton end to end, and concurrency on triton.

Run: ``python bench/bench_triton.py`` (a few minutes on 2 CPU cores). One run measures,
for each model (tiny z4/dim4 and small z16/dim16, random weights):

1. end to end through a real gateway (``ivvae serve`` on loopback, HTTP, result cache off):
   ``POST /encode`` of one clip and ``POST /decode?format=frames`` of its latent, with
   ``IVVAE_BACKEND=local`` and with ``IVVAE_BACKEND=triton`` against ``ivvae triton-serve``
   (TorchScript); median of ``--repeat`` runs after a warm-up -> triton overhead %
   (target <= 20 % on CPU). Both paths get the same torch thread count.
2. throughput on the triton backend: 4 distinct clips one after another vs all 4 at once;
   videos/s and frames/s, and the batch sizes Triton's encoder executed.

``--quick`` shrinks everything for a smoke test. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, make_weights  # noqa: E402

OCTET = {"content-type": "application/octet-stream"}


def gateway_env(threads: int) -> dict[str, str]:
    """The gateway as measured here: HTTP only, result cache off, ``threads`` torch threads."""
    return {"IVVAE_ENABLE_GRPC": "false", "IVVAE_CACHE_MAX_ENTRY_BYTES": "0",
            "OMP_NUM_THREADS": str(threads)}


async def encode_decode(client: httpx.AsyncClient, video: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    enc = await client.post("/encode", files={"file": ("v.mp4", video, "video/mp4")})
    enc.raise_for_status()
    assert enc.headers["x-cache"] == "miss"
    t1 = time.perf_counter()
    dec = await client.post("/decode?format=frames", content=enc.content, headers=OCTET)
    dec.raise_for_status()
    return t1 - t0, time.perf_counter() - t1


async def latency(url: str, video: bytes, repeat: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        await encode_decode(client, video)  # warm-up
        runs = [await encode_decode(client, video) for _ in range(repeat)]
    return {"encode_s": statistics.median(r[0] for r in runs),
            "decode_s": statistics.median(r[1] for r in runs)}


async def throughput(url: str, videos: list[bytes], frames: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        await encode_decode(client, videos[0])  # warm-up
        t0 = time.perf_counter()
        for v in videos:
            await encode_decode(client, v)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(encode_decode(client, v) for v in videos))
        four = time.perf_counter() - t0
    n = len(videos)
    return {"c1_videos_per_s": n / one, "c4_videos_per_s": n / four,
            "c1_frames_per_s": n * frames / one, "c4_frames_per_s": n * frames / four}


def batch_stats(http_url: str, model: str) -> dict[int, int]:
    stats = httpx.get(f"http://{http_url}/v2/models/{model}/stats",
                      trust_env=False).json()["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats["batch_stats"]}


def run_model(z: int, dim: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests import media

    from ivvae.triton import serve

    weights = make_weights(work / f"z{z}_dim{dim}.safetensors", z, dim)
    frames, (w, h) = args.frames, args.size
    video = media.make_video(None, frames=frames, width=w, height=h)
    videos = [media.make_video(None, frames=frames, width=w, height=h, fps=24 + i,
                               mirror=bool(i % 2)) for i in range(4)]
    result: dict[str, Any] = {"model": f"z{z}_dim{dim}", "clip": f"{frames}x{w}x{h}",
                              "threads": args.threads}
    with ServeProcess(weights, ready_s=180, **gateway_env(args.threads)) as local:
        result["local"] = asyncio.run(latency(local.url, video, args.repeat))
        result["local_throughput"] = asyncio.run(throughput(local.url, videos, frames))
    server = serve.start(work / f"triton-z{z}-dim{dim}", serve.ServeOptions(
        weights=str(weights), num_threads=args.threads))
    try:
        with ServeProcess(weights, ready_s=180, **gateway_env(1), IVVAE_BACKEND="triton",
                          IVVAE_TRITON_URL=server.grpc_url) as gateway:
            result["triton"] = asyncio.run(latency(gateway.url, video, args.repeat))
            before = batch_stats(server.http_url, "ivvae_encoder")
            result["triton_throughput"] = asyncio.run(throughput(gateway.url, videos, frames))
            after = batch_stats(server.http_url, "ivvae_encoder")
    finally:
        server.stop()
    result["encoder_batches"] = {k: n - before.get(k, 0) for k, n in sorted(after.items())
                                 if n - before.get(k, 0)}
    for op in ("encode_s", "decode_s"):
        base, tri = result["local"][op], result["triton"][op]
        result[f"{op[:6]}_overhead_pct"] = 100 * (tri - base) / base
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | clip | threads | op | local s | triton s | triton overhead |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for op in ("encode", "decode"):
            lines.append(f"| {r['model']} | {r['clip']} | {r['threads']} | {op} | "
                         f"{r['local'][op + '_s']:.3f} | {r['triton'][op + '_s']:.3f} | "
                         f"{r[op + '_overhead_pct']:+.1f} % |")
    lines += ["", "| model | backend | 1 at a time, videos/s | 4 at once, videos/s | "
              "speed-up | encoder batch sizes (4 at once) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for name in ("local", "triton"):
            t = r[f"{name}_throughput"]
            batches = r["encoder_batches"] if name == "triton" else "-"
            lines.append(f"| {r['model']} | {name} | {t['c1_videos_per_s']:.2f} | "
                         f"{t['c4_videos_per_s']:.2f} | "
                         f"{t['c4_videos_per_s'] / t['c1_videos_per_s']:.2f}x | {batches} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("W", "H"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the local gateway and of each Triton instance")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    models = [(4, 4), (16, 16)]
    if args.quick:
        args.frames, args.size, args.repeat, models = 9, (32, 32), 1, [(4, 4)]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        results = [run_model(z, dim, args, Path(tmp)) for z, dim in models]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
