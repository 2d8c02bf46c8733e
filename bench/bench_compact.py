"""``ivvae compact-dataset`` against its alternative, writing the job anew: after a share of
a dataset's captions changed (its clips re-encoded, their old samples left in the old
shards), how long compaction takes next to encoding the whole dataset again, and what each
leaves on disk.

Run: ``python bench/bench_compact.py`` (a minute or two on 2 cores; ``--clips``,
``--changed`` the share re-captioned, ``--format webdataset|parquet``). It writes a tiny
model and distinct clips, encodes them (in-process), re-captions a share and reruns (which
re-encodes those clips), then times, side by side on this machine, a compaction of that
output and a fresh encode of the same dataset into a new one, and prints seconds, shard
bytes and the ratios. Both outputs hold the same current samples.
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

from bench._common import make_weights  # noqa: E402
from bench.bench_dataset import make_clips, output_bytes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--changed", type=float, default=0.25,
                        help="share of clips re-captioned before compacting")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=32, help="clip width and height")
    parser.add_argument("--format", choices=("webdataset", "parquet"), default="webdataset")
    args = parser.parse_args()

    from ivvae.compact import compact
    from ivvae.data import LatentDataset
    from ivvae.dataset import EncoderSpec, encode_dataset

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        spec = EncoderSpec(weights=str(make_weights(tmp / "w.safetensors", 4, 8)),
                           torch_threads=1)
        src = make_clips(tmp / "clips", args.clips, args.frames, args.size, first_fps=10)
        for i in range(args.clips):
            (src / f"clip{i:03d}.txt").write_text(f"caption {i}")

        def encode(out: Path) -> float:
            start = time.perf_counter()
            asyncio.run(encode_dataset(src, out, encoder=spec, format=args.format,
                                       shard_clips=8, concurrency=2))
            return time.perf_counter() - start

        out = tmp / "out"
        encode(out)
        changed = max(1, round(args.clips * args.changed))
        for i in range(0, args.clips, max(1, args.clips // changed)):
            (src / f"clip{i:03d}.txt").write_text(f"a new caption {i}")
        encode(out)
        stale_bytes = output_bytes(out)

        start = time.perf_counter()
        result = compact(str(out))
        compact_s = time.perf_counter() - start
        fresh_s = encode(tmp / "fresh")

        def samples(where: Path) -> dict[str, bytes]:
            return {m["source"]: x.numpy().tobytes() for x, m in LatentDataset(str(where))}

        if samples(out) != samples(tmp / "fresh"):
            raise RuntimeError("the compacted output and the fresh one differ")
        print(f"{args.clips} clips of {args.frames} frames {args.size}x{args.size}, "
              f"{result.samples_dropped} superseded samples in {result.shards_rewritten} "
              f"shards rewritten and {result.shards_removed} removed, --format "
              f"{args.format}, model z4 dim8, {os.cpu_count()} CPUs")
        print(f"{'way':<30} {'seconds':>8} {'shard bytes':>12} {'time vs compact':>16}")
        print(f"{'before (stale samples)':<30} {'':>8} {stale_bytes:12d}")
        print(f"{'compact-dataset':<30} {compact_s:8.2f} {output_bytes(out):12d} "
              f"{1.0:15.2f}x")
        print(f"{'encode anew into a new OUT':<30} {fresh_s:8.2f} "
              f"{output_bytes(tmp / 'fresh'):12d} {fresh_s / compact_s:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
