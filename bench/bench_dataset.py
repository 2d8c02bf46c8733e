"""``encode-dataset`` throughput: clips/s and bytes/clip per output format, and the plain
path vs Ray Data with 1 and 2 workers, on a tiny model with the in-process encoder.

Run: ``python bench/bench_dataset.py`` (a few minutes on 2 cores; ``--no-ray`` without the
``ivvae[ray]`` extra; ``--server`` adds the plain path through ``ivvae serve`` over gRPC).
It writes a tiny model and a set of distinct generated clips, warms the encoder up, then
encodes a fresh output per row and prints clips/s, bytes/clip (of the published outputs:
latent files or shards, without manifest and records) and the ratios to the first row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import ServeProcess, make_weights  # noqa: E402


def make_clips(folder: Path, count: int, frames: int, size: int, first_fps: int) -> Path:
    """``count`` distinct clips (each its own frame rate, so its own bytes)."""
    from tests import media

    folder.mkdir(parents=True)
    for i in range(count):
        media.make_video(folder / f"clip{i:03d}.mp4", frames=frames, width=size, height=size,
                         fps=first_fps + i)
    return folder


def output_bytes(out: Path) -> int:
    from ivvae.dataset import LATENT_SUFFIX
    from ivvae.dataset.job import SHARDS_DIR

    shards = out / SHARDS_DIR
    files = shards.glob("*") if shards.is_dir() else out.rglob(f"*{LATENT_SUFFIX}")
    return sum(p.stat().st_size for p in files)


def plain(src: Path, out: Path, fmt: str, spec: object, concurrency: int) -> float:
    from ivvae.dataset import encode_dataset

    start = time.perf_counter()
    summary = asyncio.run(encode_dataset(src, out, encoder=spec, format=fmt,  # type: ignore[arg-type]
                                         concurrency=concurrency, shard_clips=8))
    if summary.encoded != summary.total:
        raise RuntimeError(f"only {summary.encoded} of {summary.total} clips encoded")
    return summary.encoded / (time.perf_counter() - start)


def on_ray(src: Path, out: Path, spec: object, workers: int, concurrency: int) -> float:
    from ivvae.dataset import Job
    from ivvae.ray import run_on_ray

    job = Job(str(src), str(out), format="webdataset", shard_clips=8,
              concurrency=concurrency)
    start = time.perf_counter()
    summary = run_on_ray(job, spec, workers=workers)  # type: ignore[arg-type]
    if summary.encoded != summary.total:
        raise RuntimeError(f"only {summary.encoded} of {summary.total} clips encoded")
    return summary.encoded / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=32, help="clip width and height")
    parser.add_argument("--z", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2, help="clips in flight")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--server", action="store_true",
                        help="also the plain path through ivvae serve (gRPC)")
    args = parser.parse_args()

    from ivvae.dataset import EncoderSpec

    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = make_weights(tmp / "weights.safetensors", args.z, args.dim)
        spec = EncoderSpec(weights=str(weights), torch_threads=1)
        print(f"{args.clips} clips of {args.frames} frames {args.size}x{args.size}, model "
              f"z{args.z} dim{args.dim}, {args.concurrency} in flight, {os.cpu_count()} CPUs",
              flush=True)
        sets = iter(range(100))

        def clips() -> Path:
            k = next(sets)
            return make_clips(tmp / f"clips{k}", args.clips, args.frames, args.size,
                              first_fps=10 + 100 * k)

        plain(make_clips(tmp / "warmup", 2, args.frames, args.size, 5), tmp / "o_warm",
              "files", spec, args.concurrency)
        for fmt in ("files", "webdataset", "parquet"):
            out = tmp / f"out_{fmt}"
            rate = plain(clips(), out, fmt, spec, args.concurrency)
            rows.append((f"plain, --format {fmt}", rate, output_bytes(out) / args.clips))
        if args.server:
            with ServeProcess(weights, IVVAE_CACHE_MEMORY_MAX_BYTES="0",
                              IVVAE_TORCH_THREADS="1") as server:
                served = EncoderSpec(server=server.grpc_url)
                plain(make_clips(tmp / "warmup2", 2, args.frames, args.size, 7),
                      tmp / "o_warm2", "webdataset", served, args.concurrency)
                out = tmp / "out_server"
                rate = plain(clips(), out, "webdataset", served, args.concurrency)
                rows.append(("service (gRPC), webdataset", rate,
                             output_bytes(out) / args.clips))
        if not args.no_ray:
            import ray

            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False,
                     log_to_driver=False)
            try:
                for workers in (1, 2):
                    out = tmp / f"out_ray{workers}"
                    rate = on_ray(clips(), out, spec, workers, args.concurrency)
                    rows.append((f"ray, {workers} worker(s), webdataset", rate,
                                 output_bytes(out) / args.clips))
            finally:
                ray.shutdown()
    first = rows[0][1]
    print(f"{'path':<34} {'clips/s':>8} {'bytes/clip':>11} {'vs first':>9}")
    for name, rate, size in rows:
        print(f"{name:<34} {rate:8.2f} {size:11.0f} {rate / first:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
