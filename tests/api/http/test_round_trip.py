"""POST /encode then /decode on real and generated media: exact frame count and size."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest

from ivvae.latents import META_KEYS, decode_latent_file
from ivvae.safetensors_io import dumps, loads
from ivvae.video import open_video
from tests import media
from tests.scrape import errors, requests, samples
from tests.service_fixtures import running_app, tiny_settings


def _frames_of_mp4(data: bytes) -> tuple[np.ndarray, float]:
    with open_video(data) as reader:
        return reader.read_all(), reader.info.fps


async def _round_trip(client: httpx.AsyncClient, data: bytes, ctype: str,
                      name: str = "clip") -> tuple[httpx.Response, np.ndarray, float]:
    enc = await client.post("/encode", files={"file": (name, data, ctype)})
    assert enc.status_code == 200, enc.text
    dec = await client.post("/decode", content=enc.content,
                            headers={"content-type": "application/octet-stream"})
    assert dec.status_code == 200, dec.text
    assert dec.headers["content-type"] == "video/mp4"
    frames, fps = _frames_of_mp4(dec.content)
    return enc, frames, fps


CASES = {
    "mp4-odd-33x17-t6": (lambda: media.make_video(None, frames=6, width=33, height=17),
                         "video/mp4", 6, 33, 17),
    "mp4-t1": (lambda: media.make_video(None, frames=1, width=24, height=16), "video/mp4",
               1, 24, 16),
    "mp4-t2": (lambda: media.make_video(None, frames=2, width=16, height=16), "video/mp4",
               2, 16, 16),
    "webm-vp9": (lambda: media.make_video(None, frames=5, width=40, height=24,
                                          codec="libvpx-vp9", container="webm"),
                 "video/webm", 5, 40, 24),
    "avi-mjpeg": (lambda: media.make_video(None, frames=7, width=32, height=32,
                                           codec="mjpeg", container="avi"),
                  "video/x-msvideo", 7, 32, 32),
    "mkv-audio": (lambda: media.make_video(None, frames=9, width=24, height=24,
                                           container="mkv", audio=True),
                  "video/x-matroska", 9, 24, 24),
    "gif": (lambda: media.make_video(None, frames=4, width=20, height=12, codec="gif",
                                     container="gif"), "image/gif", 4, 20, 12),
    "png": (lambda: media.make_image("png", 37, 21), "image/png", 1, 37, 21),
    "jpeg": (lambda: media.make_image("jpeg", 16, 30), "image/jpeg", 1, 16, 30),
    "rotated-90": (lambda: media.make_video(None, frames=5, width=32, height=16, rotation=90),
                   "video/mp4", 5, 16, 32),
    "t400": (lambda: media.make_video(None, frames=400, width=16, height=8), "video/mp4",
             400, 16, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_round_trip_keeps_frame_count_and_size(tiny_weights: Path, case: str) -> None:
    make, ctype, t, w, h = CASES[case]
    async with running_app(tiny_settings(tiny_weights)) as client:
        enc, frames, _ = await _round_trip(client, make(), ctype)
    latent, info = decode_latent_file(enc.content)
    assert (info.num_frames, info.width, info.height) == (t, w, h)
    expected_shape = (1, 4, 1 + -(-(t - 1) // 4), -(-h // 8), -(-w // 8))
    assert latent.shape == expected_shape
    assert enc.headers["x-latent-shape"] == ",".join(map(str, expected_shape))
    assert frames.shape == (t, h, w, 3)


async def test_real_clip_round_trip_and_metadata(tiny_weights: Path) -> None:
    clip = media.sample_clip("carphone_pristine")
    async with running_app(tiny_settings(tiny_weights)) as client:
        enc, frames, fps = await _round_trip(client, clip.read_bytes(), "video/mp4")
        models = (await client.get("/models")).json()
    with open_video(clip) as reader:
        original = reader.read_all()
        original_fps = reader.info.fps
    assert frames.shape == original.shape == (120, 144, 176, 3)
    assert abs(fps - original_fps) < 1e-6
    tensors, meta = loads(enc.content)
    assert set(META_KEYS) <= set(meta)
    model = models["models"][0]
    assert meta["model_name"] == model["name"] == "tiny_z4_dim4"
    assert meta["weights_sha256"] == model["weights_sha256"]
    assert float(meta["scale_factor"]) == pytest.approx(0.8)
    assert Fraction(meta["fps"]) == Fraction(30000, 1001)
    assert meta["mode"] == "mean" and meta["dtype"] == "float32"
    assert meta["padding_policy"].startswith("time:repeat-last")
    # carphone's pixels are not square: the latent says so (its MP4 carries it back).
    assert meta["sample_aspect_ratio"] == "128:117"
    import hashlib

    assert meta["content_sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert set(tensors) == {"latent"}


async def test_an_anamorphic_clip_comes_back_anamorphic(tiny_weights: Path) -> None:
    """No options: the stored pixels are encoded, the latent says their shape, and the MP4
    /decode makes of it carries it back; a bare latent knows of none."""
    sar = Fraction(2)  # 64x48 shown 128x48
    clip = media.make_video(None, frames=5, width=64, height=48, container="mkv",
                            sample_aspect_ratio=sar)
    async with running_app(tiny_settings(tiny_weights)) as client:
        enc, frames, _ = await _round_trip(client, clip, "video/x-matroska")
        dec = await client.post("/decode", content=enc.content)
        raw = await client.post("/decode?format=frames", content=enc.content)
        source_frames = await client.post("/frames", content=clip,
                                          headers={"content-type": "video/x-matroska"})
        latent, info = decode_latent_file(enc.content)
        bare = await client.post("/decode", content=dumps({"latent": latent}))
        resized = await client.post("/encode", content=clip, params={"resize": "24"},
                                    headers={"content-type": "video/x-matroska"})
    assert frames.shape == (5, 48, 64, 3)
    assert info.extra["sample_aspect_ratio"] == "2:1" and info.sample_aspect_ratio == sar
    with open_video(dec.content) as reader:
        assert reader.info.sample_aspect_ratio == sar
        assert (reader.info.display_width, reader.info.display_height) == (128, 48)
    assert loads(raw.content)[0]["frames"].array.shape == (5, 48, 64, 3)
    # Frames files say it too: the stored pixels, shown twice as wide.
    assert loads(raw.content)[1]["sample_aspect_ratio"] == "2:1"
    assert loads(source_frames.content)[1]["sample_aspect_ratio"] == "2:1"
    assert bare.status_code == 200, bare.text
    with open_video(bare.content) as reader:
        assert reader.info.sample_aspect_ratio == 1
    # Resized, it is planned from 128x48 (short side 24: 64x24) and comes out square.
    assert resized.status_code == 200, resized.text
    assert resized.headers["x-latent-shape"] == "1,4,2,3,8"
    assert "sample_aspect_ratio" not in loads(resized.content)[1]


async def test_raw_frames_output_and_raw_body_upload(tiny_weights: Path) -> None:
    video = media.make_video(None, frames=6, width=20, height=10)
    async with running_app(tiny_settings(tiny_weights)) as client:
        enc = await client.post("/encode", content=video, headers={"content-type": "video/mp4"})
        assert enc.status_code == 200, enc.text
        by_query = await client.post("/decode?format=frames", content=enc.content)
        by_accept = await client.post("/decode", content=enc.content,
                                      headers={"accept": "application/x-safetensors"})
    assert by_query.status_code == by_accept.status_code == 200
    assert by_query.content == by_accept.content
    tensors, meta = loads(by_query.content)
    frames = tensors["frames"].array
    assert frames.dtype == np.uint8 and frames.shape == (6, 10, 20, 3)
    assert meta["num_frames"] == "6"


async def test_dtypes_sampling_and_moments(tiny_weights: Path) -> None:
    video = media.make_video(None, frames=5, width=16, height=16)
    files = {"file": ("v.mp4", video, "video/mp4")}
    async with running_app(tiny_settings(tiny_weights)) as client:
        mean = (await client.post("/encode", files=files)).content
        bf16 = await client.post("/encode?dtype=bfloat16", files=files)
        f16 = await client.post("/encode?dtype=float16", files=files)
        s1 = (await client.post("/encode?sample=true&seed=3", files=files)).content
        s2 = (await client.post("/encode?sample=true&seed=3", files=files)).content
        s3 = (await client.post("/encode?sample=true", files=files)).content
        mom = (await client.post("/encode?moments=true", files=files)).content
        decoded = await client.post("/decode", content=bf16.content)
        bad_seed = await client.post("/encode?seed=3", files=files)
        bad_dtype = await client.post("/encode?dtype=int8", files=files)
    assert decoded.status_code == 200
    assert bad_seed.status_code == 400 and bad_dtype.status_code == 400  # named, by ivvae
    lat, info = decode_latent_file(mean)
    assert info.dtype == "float32"
    lb, ib = decode_latent_file(bf16.content)
    lh, ih = decode_latent_file(f16.content)
    assert ih.dtype == "float16"
    assert loads(bf16.content)[0]["latent"].dtype == "BF16" and ib.dtype == "bfloat16"
    assert loads(f16.content)[0]["latent"].dtype == "F16"
    assert np.abs(lb - lat).max() <= 0.01 * np.abs(lat).max()
    assert np.abs(lh - lat).max() <= 1e-3 * np.abs(lat).max()
    a, ia = decode_latent_file(s1)
    b, _ = decode_latent_file(s2)
    c, ic = decode_latent_file(s3)
    assert ia.mode == "sample" and ia.seed == 3 and np.array_equal(a, b)
    assert not np.array_equal(a, lat)
    assert ic.seed is not None and not np.array_equal(c, a)
    tensors, _ = loads(mom)
    assert set(tensors) == {"latent", "mu", "logvar"}
    mu = tensors["mu"].array
    np.testing.assert_allclose(0.8 * (mu - 0.05), lat, rtol=0, atol=1e-6)


async def test_service_endpoints(tiny_weights: Path) -> None:
    async with running_app(tiny_settings(tiny_weights)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["backend"]["ready"] is True
        assert ready.json()["cache"]["status"] == "ok"
        for probe in ("/healthz", "/readyz"):  # some load balancers probe with HEAD
            assert (await client.head(probe)).status_code == 200
        models = (await client.get("/models")).json()
        assert models["default"] == "tiny_z4_dim4" and models["models"][0]["trained"] is True
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        assert {"/encode", "/decode", "/readyz", "/metrics"} <= set(spec["paths"])
        metrics = (await client.get("/metrics")).text
        assert "ivvae_requests_total" in metrics or "ivvae_request_seconds" in metrics
        nothing = await client.get("/nope")
        assert nothing.status_code == 404 and nothing.json()["error"] == "not_found"
        wrong = await client.get("/encode")
        assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
        # A client calling the wrong URL shows in the metrics, not only in the log.
        counted = client.app.state.service.metrics  # type: ignore[attr-defined]
        for code in ("not_found", "method_not_allowed"):
            assert counted.requests.labels("other", "http", code)._value.get() == 1
            assert counted.errors.labels(code)._value.get() == 1


async def test_api_keys(tiny_weights: Path) -> None:
    video = media.make_video(None, frames=1, width=8, height=8)
    async with running_app(tiny_settings(tiny_weights, api_keys="k1, k2")) as client:
        denied = await client.post("/encode", content=video, headers={"content-type": "video/mp4"})
        wrong = await client.get("/models", headers={"authorization": "Bearer nope"})
        ok = await client.post("/encode", content=video,
                               headers={"content-type": "video/mp4", "authorization": "Bearer k2"})
        health = await client.get("/healthz")
        found = samples((await client.get("/metrics")).text)
    assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
    assert wrong.status_code == 401
    assert ok.status_code == 200
    assert health.status_code == 200
    # Refused requests are requests too, of the route they were for.
    assert requests(found, "encode", "http", "unauthorized") == 1
    assert requests(found, "models", "http", "unauthorized") == 1
    assert requests(found, "encode", "http", "ok") == 1
    assert errors(found, "unauthorized") == 2


async def test_concurrent_requests_are_batched_and_match_sequential(tiny_weights: Path) -> None:
    videos = [media.make_video(None, frames=9, width=24, height=16, fps=24 + i)
              for i in range(8)]
    settings = tiny_settings(tiny_weights, batch_max_delay_ms=50.0, batch_max_size=8)
    async with running_app(settings) as client:
        sequential = []
        for v in videos:
            r = await client.post("/encode", content=v, headers={"content-type": "video/mp4"})
            sequential.append(decode_latent_file(r.content)[0])
    async with running_app(settings) as client:  # fresh cache: really encode again
        rs = await asyncio.gather(*[
            client.post("/encode", content=v, headers={"content-type": "video/mp4"})
            for v in videos
        ])
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 and r.headers["x-cache"] == "miss" for r in rs)
    for r, ref in zip(rs, sequential, strict=True):
        np.testing.assert_allclose(decode_latent_file(r.content)[0], ref, rtol=0, atol=1e-5)
    # batch-size histogram: some model call carried more than one video
    single = total = 0.0
    for line in metrics.splitlines():
        if line.startswith('ivvae_batch_size_bucket{kind="encode_next",le="1.0"}'):
            single = float(line.split()[-1])
        if line.startswith('ivvae_batch_size_count{kind="encode_next"}'):
            total = float(line.split()[-1])
    assert total > 0 and single < total, metrics
