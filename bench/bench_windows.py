"""What counting a clip's frames for ``ivvae windows`` costs, side by side with reading and
encoding it.

Run: ``python bench/bench_windows.py`` (about a minute on 2 cores).

On the real 1280x720 ``bigbuckbunny`` clip (132 frames at 25 fps), read at ``--fps``
(default 12), each the median of ``--repeats`` runs in this process:

1. ``count_frames``: every frame decoded, none converted (what ``ivvae windows`` does);
2. ``read_all``: the same frames decoded and converted to RGB (what encoding reads);
3. encoding the clip as a training job would, ``resize=256`` at ``--fps``, with the bundled
   model in this process (one run after a warm-up; the result cache off).

Counting is the extra pass ``ivvae windows`` adds before ``encode-dataset``: the ratios say
what share of the encode it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "service"))


def median_s(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


async def encode_s(clip: Path, fps: Fraction) -> tuple[float, tuple[int, ...]]:
    from tests.media import make_video

    from ivvae.config import Settings
    from ivvae.pipeline import EncodeOptions
    from ivvae.service import Service
    from ivvae.video import Preprocess

    service = Service(Settings(enable_grpc=False, enable_http=False, batch_max_delay_ms=1,
                               cache_memory_max_bytes=0))
    await service.start()
    try:
        await service.pipeline.encode(make_video(None, frames=5, width=455, height=256))
        options = EncodeOptions(preprocess=Preprocess.parse({"resize": "256",
                                                             "fps": str(fps)}))
        start = time.perf_counter()
        result = await service.pipeline.encode(clip, options)
        return time.perf_counter() - start, result.latent_shape
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", default="12")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tests.media import sample_clip

    from ivvae.dataset.windows import count_frames
    from ivvae.video import Preprocess, VideoLimits, open_video

    fps = Fraction(args.fps)
    clip = sample_clip("bigbuckbunny")
    limits = VideoLimits(max_frames=100_000)

    def read() -> int:
        with open_video(clip, limits=limits, preprocess=Preprocess(fps=fps)) as reader:
            return len(reader.read_all())

    count_s, counted = median_s(lambda: count_frames(clip, None, fps), args.repeats)
    read_s, read_n = median_s(read, args.repeats)
    assert counted == read_n, (counted, read_n)
    enc_s, shape = asyncio.run(encode_s(clip, fps))

    print(f"bigbuckbunny 1280x720, 132 frames at 25 fps, read at {args.fps} fps: "
          f"{counted} frames")
    print(f"  count_frames (decode only)      {count_s:8.3f} s")
    print(f"  read_all (decode + RGB)         {read_s:8.3f} s")
    print(f"  encode resize=256, bundled model {enc_s:7.3f} s  latent {list(shape)}")
    print(f"  count / read                    {count_s / read_s:8.2f}x")
    print(f"  count / encode                  {count_s / enc_s:8.3f}x")


if __name__ == "__main__":
    main()
