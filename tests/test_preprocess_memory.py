"""Resizing happens as frames stream out of the decoder: encoding a 4K clip to a 256-pixel
short side peaks at about the memory of encoding a clip that is already that small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.media import make_video
from tests.service_fixtures import tiny_weights  # noqa: F401

FRAMES = 5
# Encodes one file in a fresh process and reports its peak resident memory.
_CHILD = """
import asyncio, json, resource, sys
from pathlib import Path
from ivvae.config import Settings
from ivvae.pipeline import EncodeOptions
from ivvae.service import Service
from ivvae.video import Preprocess

async def main():
    svc = Service(Settings(weights=sys.argv[1], batch_max_delay_ms=1, enable_grpc=False))
    await svc.start()
    options = EncodeOptions(preprocess=Preprocess.parse(json.loads(sys.argv[3])))
    result = await svc.pipeline.encode(Path(sys.argv[2]), options)
    await svc.close()
    return result.latent_shape

shape = asyncio.run(main())
print(json.dumps({"shape": list(shape),
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak(weights: Path, video: Path, params: dict[str, str]) -> tuple[list[int], int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(weights), str(video),
                          json.dumps(params)], capture_output=True, text=True, check=True,
                         timeout=600)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["shape"], report["peak_kib"]


def test_4k_resized_on_the_way_in_peaks_like_a_small_clip(tiny_weights: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    big = tmp_path / "uhd.mp4"
    small = tmp_path / "small.mp4"
    make_video(big, frames=FRAMES, width=3840, height=2160, pattern="gradient")
    make_video(small, frames=FRAMES, width=455, height=256, pattern="gradient")
    big_shape, big_peak = _peak(tiny_weights, big, {"resize": "256"})
    small_shape, small_peak = _peak(tiny_weights, small, {})
    assert big_shape == small_shape == [1, 4, 2, 32, 57]
    print(f"peak RSS: 4K resized {big_peak} KiB, small {small_peak} KiB")
    assert big_peak <= 1.5 * small_peak, (big_peak, small_peak)
