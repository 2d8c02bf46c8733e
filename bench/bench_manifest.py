"""What the manifest costs a worker of a ``--shard`` job when it stops: ``write_manifest``
over a large job, with no share listing published (one worker, or the first to stop) next
to every worker's published (each clip is named as its own worker listed it, so their
listings are read too), and what publishing a share's listing costs at the start.

Run: ``python bench/bench_manifest.py`` (``--clips``, default 100,000; ``--workers``,
default 8; one worker publishes none). Synthetic: no model, no video; one record file names
every clip (a failure each, as small as records come), so the rest of the cost is reading
the records and writing the manifest, which both sides share. Prints seconds (best of 3)
and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))


def best_of(runs: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (one worker publishes no share listing)")

    from ivvae.dataset import ClipOptions
    from ivvae.dataset.job import LISTINGS_DIR, PARTS_DIR, JobConfig, ModelIdentity, jsonl
    from ivvae.dataset.state import Listing, publish_share, write_manifest
    from ivvae.storage import Location

    n = args.workers
    config = JobConfig("webdataset", ClipOptions(), ModelIdentity("m", "0" * 64, "float32"))
    clips = tuple((f"folder{i % 100:02d}/clip{i:07d}.mp4", f"sha256:{i:064x}", f"{i:032x}")
                  for i in range(args.clips))
    with tempfile.TemporaryDirectory() as root:
        out = Location.of(root)
        os.makedirs(out.join(PARTS_DIR))
        with open(out.join(PARTS_DIR, "w00000of00001-run-00000.jsonl"), "wb") as f:
            f.write(jsonl({"source": name, "key": key, "identity": ident, "status": "error",
                           "error": "decode_error", "detail": "x", "at": 1.0}
                          for name, ident, key in clips))
        own = Listing(f"w00000of{n:05d}", clips)
        alone = best_of(3, lambda: write_manifest(out, own, n, config))
        shares = [Listing(f"w{i:05d}of{n:05d}", clips[i::n]) for i in range(n)]
        publish = best_of(3, lambda: publish_share(out, shares[0], n))
        for share in shares:
            publish_share(out, share, n)
        listed = sum(os.path.getsize(out.join(LISTINGS_DIR, s.by + ".jsonl")) for s in shares)
        every = best_of(3, lambda: write_manifest(out, own, n, config))
    print(f"{args.clips:,} clips, {n} workers")
    print(f"  manifest, no share listing published   {alone:7.2f} s   1.00x")
    print(f"  manifest, all {n} share listings read   {every:7.2f} s   {every / alone:.2f}x")
    print(f"  publishing one share's listing          {publish:7.2f} s   "
          f"({listed / n / 2**20:.1f} MiB; {listed / 2**20:.1f} MiB for all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
