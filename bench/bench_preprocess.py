"""What preprocessing and tensor bodies cost, side by side.

Run: ``python bench/bench_preprocess.py`` (about a minute on 2 cores; ``--model z,dim`` for
another random-weight model size, default the test-sized 4,4).

1. Encode of the real 1280x720 ``bigbuckbunny`` clip (``--frames`` frames) with
   ``resize=256`` (swscale on the way in, 455x256 out) against encoding a file that is
   already 455x256 (the same frames, resized once with PyAV and stored as near-lossless
   H.264): one run each after a warm-up, the result cache off.
2. ``POST /decode`` of the same latent as a latent file and as a raw tensor body
   (Hugging Face's remote-VAE form, ``shape`` / ``dtype`` parameters), MP4 out, through
   the in-process HTTP app: the median of ``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "service"))

from bench._common import make_weights  # noqa: E402


def pre_resized(src: Path, out: Path, frames: int, width: int, height: int) -> Path:
    """The first ``frames`` frames of ``src`` resized by PyAV (swscale) and written as
    x264 crf 0 (lossless in YUV): the file a user's own ffmpeg pass would make."""
    import av

    with av.open(str(src)) as inp, av.open(str(out), "w") as dst:
        rate = inp.streams.video[0].average_rate
        stream = dst.add_stream("libx264", rate=rate, options={"crf": "0",
                                                               "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for index, frame in enumerate(inp.decode(video=0)):
            if index == frames:
                break
            small = frame.reformat(width=width, height=height, format="yuv444p",
                                   interpolation="AREA")
            small.pts = index
            for packet in stream.encode(small):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out


async def bench(weights: Path, frames: int, repeats: int, tmp: Path) -> None:
    import httpx
    import numpy as np
    from tests.media import make_video, sample_clip

    from ivvae.api.http import create_app
    from ivvae.config import Settings
    from ivvae.latents import decode_latent_file
    from ivvae.pipeline import EncodeOptions
    from ivvae.service import Service
    from ivvae.video import Preprocess

    settings = Settings(weights=str(weights), enable_grpc=False, batch_max_delay_ms=1,
                        cache_memory_max_bytes=0)
    clip = sample_clip("bigbuckbunny")
    small = pre_resized(clip, tmp / "small.mp4", frames, 455, 256)
    service = Service(settings)
    await service.start()
    try:
        warm = make_video(None, frames=9, width=455, height=256)
        await service.pipeline.encode(warm)

        async def timed(source: Path, params: dict[str, str]) -> tuple[float, tuple[int, ...]]:
            start = time.perf_counter()
            result = await service.pipeline.encode(
                source, EncodeOptions(preprocess=Preprocess.parse(params)))
            return time.perf_counter() - start, result.latent_shape

        t_pre, shape_pre = await timed(clip, {"resize": "256", "num_frames": str(frames)})
        t_small, shape_small = await timed(small, {})
        assert shape_pre == shape_small, (shape_pre, shape_small)

        latent_file = (await service.pipeline.encode(small)).data
        latent = decode_latent_file(latent_file)[0]
    finally:
        await service.close()

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ivvae",
                                     timeout=600) as client:
            async def decode_time(**kwargs: object) -> float:
                start = time.perf_counter()
                r = await client.post("/decode", **kwargs)  # type: ignore[arg-type]
                assert r.status_code == 200, r.text
                return time.perf_counter() - start

            params = {"shape": list(latent.shape), "dtype": "float32",
                      "num_frames": str(frames), "height": "256", "width": "455",
                      "fps": "25"}
            await decode_time(content=latent_file)
            file_s, tensor_s = [], []
            for _ in range(repeats):
                file_s.append(await decode_time(content=latent_file))
                tensor_s.append(await decode_time(content=np.ascontiguousarray(latent).tobytes(),
                                                  params=params))

    print(f"encode {frames} frames, 1280x720 -> 455x256 latent {shape_pre}:")
    print(f"  resize=256 on the way in   {t_pre:8.3f} s")
    print(f"  pre-resized 455x256 file   {t_small:8.3f} s")
    print(f"  preprocessing / pre-resized  {t_pre / t_small:6.2f}x")
    print(f"decode of a {list(latent.shape)} latent to MP4 (median of {repeats}):")
    print(f"  latent file body           {statistics.median(file_s):8.3f} s")
    print(f"  raw tensor body            {statistics.median(tensor_s):8.3f} s")
    print(f"  tensor body / file body      "
          f"{statistics.median(tensor_s) / statistics.median(file_s):6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="4,4", help="z,dim of the random-weight model")
    args = parser.parse_args()
    z, dim = (int(v) for v in args.model.split(","))
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        weights = make_weights(tmp / "bench.safetensors", z, dim)
        asyncio.run(bench(weights, args.frames, args.repeats, tmp))


if __name__ == "__main__":
    main()
