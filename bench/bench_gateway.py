"""Gateway benchmark: HTTP overhead, cache-hit latency, batching throughput.

Run: ``python bench/bench_gateway.py`` (a few minutes on 2 cores). In one run, side by side:

1. in-process model time (``model.encode`` on the decoded frames) vs end-to-end
   ``POST /encode`` of the same clip through a real ``ivvae serve`` on loopback
   (upload, decode, frame groups, batcher, model, latent file) -> overhead %;
   target <= 10 %.
2. cache-hit latency of ``POST /encode`` for a 17-frame 256x256 clip: p50/p90;
   target p50 <= 20 ms.
3. throughput with a tiny model at concurrency 1 vs 8 (distinct clips, cold cache).

``--quick`` shrinks everything for a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, make_weights  # noqa: E402


def post(client: httpx.Client, url: str, data: bytes) -> httpx.Response:
    r = client.post(url + "/encode", content=data, headers={"content-type": "video/mp4"})
    r.raise_for_status()
    return r


def overhead(weights: Path, clip: bytes, repeats: int) -> dict[str, float]:
    import torch

    from ivvae.model import load_model
    from ivvae.video import open_video

    model = load_model(weights)
    with open_video(clip) as reader:
        frames = reader.read_all()
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.inference_mode():
        model.encode(video)
        t_model = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.encode(video)
            t_model.append(time.perf_counter() - t0)
    del model
    with ServeProcess(weights, IVVAE_ENABLE_GRPC="false",
                      IVVAE_CACHE_MEMORY_MAX_BYTES="0") as server, httpx.Client(
            timeout=600) as client:
        post(client, server.url, clip)  # warm-up
        t_http = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = post(client, server.url, clip)
            t_http.append(time.perf_counter() - t0)
            assert r.headers["x-cache"] == "miss"
    m, h = statistics.median(t_model), statistics.median(t_http)
    return {"model_s": m, "http_s": h, "overhead_pct": 100 * (h - m) / m}


def cache_hits(weights: Path, clip: bytes, n: int) -> dict[str, float]:
    with ServeProcess(weights, IVVAE_ENABLE_GRPC="false") as server, \
            httpx.Client(timeout=600) as client:
        post(client, server.url, clip)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = post(client, server.url, clip)
            times.append(time.perf_counter() - t0)
            assert r.headers["x-cache"] == "hit"
    q = np.percentile(times, [50, 90])
    return {"p50_ms": 1000 * q[0], "p90_ms": 1000 * q[1]}


async def _burst(url: str, clips: list[bytes], concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(data: bytes) -> None:
            async with sem:
                r = await client.post(url + "/encode", content=data,
                                      headers={"content-type": "video/mp4"})
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in clips))
        return time.perf_counter() - t0


def throughput(weights: Path, clips: list[bytes], warmup: bytes) -> dict[str, float]:
    out = {}
    for c in (1, 8):
        # a fresh server per run: a cold cache; distinct clips: every request is a miss
        with ServeProcess(weights, IVVAE_ENABLE_GRPC="false", IVVAE_BATCH_MAX_SIZE="8",
                          IVVAE_BATCH_MAX_DELAY_MS="10") as s:
            asyncio.run(_burst(s.url, [warmup], 1))
            seconds = asyncio.run(_burst(s.url, clips, c))
            out[f"c{c}_clips_per_s"] = len(clips) / seconds
    out["speedup"] = out["c8_clips_per_s"] / out["c1_clips_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=16, help="model dim for parts 1-2")
    args = parser.parse_args()
    from tests import media

    size, frames, repeats, hits, n_clips = (256, 17, 3, 30, 16)
    if args.quick:
        size, frames, repeats, hits, n_clips = (32, 5, 1, 5, 4)
    with tempfile.TemporaryDirectory() as tmp:
        dim = 4 if args.quick else args.dim
        w_small = make_weights(Path(tmp) / "small.safetensors", 16, dim)
        w_tiny = make_weights(Path(tmp) / "tiny.safetensors", 4, 4)
        clip = media.make_video(None, frames=frames, width=size, height=size)
        print(f"# gateway benchmark ({os.cpu_count()} CPUs)")
        o = overhead(w_small, clip, repeats)
        print(f"1. encode {frames}x{size}x{size}, z16 dim{dim}: in-process model "
              f"{o['model_s']:.3f} s, HTTP end-to-end {o['http_s']:.3f} s -> overhead "
              f"{o['overhead_pct']:+.1f} % (target <= 10 %)")
        c = cache_hits(w_small, clip, hits)
        print(f"2. cache hit, {frames}x{size}x{size}: p50 {c['p50_ms']:.1f} ms, p90 "
              f"{c['p90_ms']:.1f} ms (target p50 <= 20 ms)")
        clips = [media.make_video(None, frames=9, width=32, height=32, fps=10 + i)
                 for i in range(n_clips)]
        warmup = media.make_video(None, frames=9, width=32, height=32, fps=5)
        t = throughput(w_tiny, clips, warmup)
        print(f"3. tiny model z4 dim4, {n_clips} distinct 9x32x32 clips: concurrency 1 "
              f"{t['c1_clips_per_s']:.2f} clips/s, concurrency 8 {t['c8_clips_per_s']:.2f} "
              f"clips/s -> x{t['speedup']:.2f}")


if __name__ == "__main__":
    main()
