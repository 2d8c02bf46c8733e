"""diffusers' own hybrid-inference client (``remote_decode`` / ``remote_encode``) against a
real ``ivvae serve``, compared with the same work done in-process; and bare latents, batches
and tensor bodies over HTTP."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from bench._common import ServeProcess

from ivvae.latents import decode_latent_file
from ivvae.outputs import collect, render
from ivvae.pipeline import EncodeOptions, FramesUpload
from ivvae.safetensors_io import dumps, loads
from ivvae.service import Service
from ivvae.video import Preprocess, open_video
from ivvae.wire import DecodeTarget
from tests.media import make_frames, sample_clip
from tests.service_fixtures import (  # noqa: F401
    model_video,
    running_app,
    tiny_settings,
    tiny_weights,
)

torch = pytest.importorskip("torch")
remote_utils = pytest.importorskip("diffusers.utils.remote_utils")


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServeProcess]:  # noqa: F811
    with ServeProcess(tiny_weights, IVVAE_BATCH_MAX_DELAY_MS="5") as running:
        yield running


@pytest_asyncio.fixture
async def local(tiny_service: Service) -> Service:
    return tiny_service


async def _sampler_latent(svc: Service, batch: int = 1) -> np.ndarray:
    """A realistic latent ``(B, z, 2, 8, 8)``: real clips, encoded, as a sampler would emit."""
    out = []
    for start in range(batch):
        options = EncodeOptions(preprocess=Preprocess.parse(
            {"resize": "64x64", "start_frame": str(10 * start), "num_frames": "5"}))
        result = await svc.pipeline.encode(sample_clip("carphone_pristine"), options)
        out.append(decode_latent_file(result.data)[0])
    return np.concatenate(out)


def _equal_but_rounding(served: np.ndarray, local: np.ndarray) -> None:
    """uint8 frames from the served process against this process's own: equal but where a
    value sat on a rounding step. The two processes may sum a convolution in another order
    (another thread count, or kernels chosen when an earlier test in this one ran), which
    moves the float frames by ~1e-6: within 1e-4 of each other, as checked elsewhere."""
    differ = served.astype(int) - local.astype(int)
    assert int(np.abs(differ).max()) <= 1
    assert np.count_nonzero(differ) <= served.size // 1000


async def _local_frames(svc: Service, latent: np.ndarray) -> np.ndarray:
    """In-process decode of a bare latent: ``(B, T, H, W, 3)`` uint8."""
    _, items = await svc.pipeline.decode_bare(latent, "float32", DecodeTarget())
    out = []
    for item in items:
        out.append(np.concatenate([f async for f in item]))
    return np.stack(out)


async def test_remote_decode_mp4_and_pt_equal_in_process(server: ServeProcess,
                                                         local: Service,
                                                         tiny_weights: Path,  # noqa: F811
                                                         ) -> None:
    latent = await _sampler_latent(local)
    model = local.pipeline.model()
    tensor = torch.from_numpy(latent)
    endpoint = server.url + "/decode"
    factors = {"scaling_factor": model.scale_factor, "shift_factor": model.shift_factor}
    expected = await _local_frames(local, latent)
    assert expected.shape == (1, 5, 64, 64, 3)

    # One video's uint8 frames are (T, H, W, 3), as Hugging Face's video endpoints answer.
    frames = remote_utils.remote_decode(endpoint=endpoint, tensor=tensor, output_type="pt",
                                        return_type="pt", partial_postprocess=True, **factors)
    assert frames.dtype == torch.uint8
    _equal_but_rounding(frames.numpy(), expected[0])
    # diffusers' default return_type (pil) makes them a list of PIL frames; it failed on
    # (1, T, H, W, 3).
    pictures = remote_utils.remote_decode(endpoint=endpoint, tensor=tensor, output_type="pt",
                                          partial_postprocess=True, **factors)
    assert len(pictures) == 5
    _equal_but_rounding(np.stack([np.asarray(p) for p in pictures]), expected[0])

    # partial_postprocess=False: the decoder's own float video, as vae.decode(z).sample
    video = remote_utils.remote_decode(endpoint=endpoint, tensor=tensor, output_type="pt",
                                       return_type="pt", **factors)
    assert video.dtype == torch.float32 and tuple(video.shape) == (1, 3, 5, 64, 64)
    np.testing.assert_allclose(video.numpy(), model_video(tiny_weights, latent),
                               rtol=0, atol=1e-4)

    mp4 = remote_utils.remote_decode(endpoint=endpoint, tensor=tensor, output_type="mp4",
                                     return_type="mp4", **factors)
    info, _ = await local.pipeline.decode_bare(latent, "float32", DecodeTarget())

    async def served_frames() -> AsyncIterator[np.ndarray]:
        yield frames.numpy()

    # The MP4 of those frames, byte for byte (the frames themselves are checked above).
    assert mp4 == await collect(render("mp4", info, served_frames()))
    with open_video(mp4) as reader:
        assert reader.read_all().shape == (5, 64, 64, 3)

    # The same latent unscaled (diffusers' decode input), said so by latent_space=raw; the
    # round trip through the factors moves values by float rounding only.
    raw = latent / model.scale_factor + model.shift_factor
    r = httpx.post(endpoint, content=raw.tobytes(), params={
        "shape": list(raw.shape), "dtype": "float32", "latent_space": "raw",
        "output_type": "pt", "partial_postprocess": "true"}, timeout=120)
    assert r.status_code == 200, r.text
    again = np.frombuffer(r.content, np.uint8).reshape(expected[0].shape)
    assert int(np.abs(again.astype(int) - expected[0].astype(int)).max()) <= 1
    # diffusers' do_scaling=False says the same by sending no scaling parameter at all (as
    # Hugging Face's endpoints read it); it was taken as scaled and scaled again.
    unscaled = remote_utils.remote_decode(endpoint=endpoint, tensor=torch.from_numpy(raw),
                                          do_scaling=False, output_type="pt", return_type="pt",
                                          partial_postprocess=True)
    assert int(np.abs(unscaled.numpy().astype(int) - expected[0].astype(int)).max()) <= 1


async def test_remote_encode_equals_in_process(server: ServeProcess, local: Service) -> None:
    if not hasattr(remote_utils, "remote_encode"):
        pytest.skip("this diffusers has no remote_encode")
    frames = make_frames(5, 32, 24)
    # Contiguous on purpose: remote_encode serializes ``image.contiguous()`` through
    # safetensors' private _to_ndarray, which (safetensors 0.8) keeps no reference to a
    # temporary copy, so a non-contiguous input is sent as freed memory.
    video = torch.from_numpy(np.ascontiguousarray(
        frames.transpose(3, 0, 1, 2)[None].astype(np.float32) / 127.5 - 1))
    model = local.pipeline.model()
    latent = remote_utils.remote_encode(endpoint=server.url + "/encode", image=video,
                                        scaling_factor=model.scale_factor,
                                        shift_factor=model.shift_factor)
    result = await local.pipeline.encode(FramesUpload(frames, fps=24))
    expected = decode_latent_file(result.data)[0]
    assert tuple(latent.shape) == expected.shape == (1, model.z_dim, 2, 3, 4)
    np.testing.assert_allclose(latent.numpy(), expected, rtol=0, atol=1e-4)


async def test_remote_encode_of_a_pil_image_answers_a_tensor(server: ServeProcess,
                                                            local: Service) -> None:
    # diffusers sends a PIL image as a PNG body with only the factors as parameters: those
    # mean its wire, so the answer is a raw tensor (it was a latent file: KeyError 'shape').
    if not hasattr(remote_utils, "remote_encode"):
        pytest.skip("this diffusers has no remote_encode")
    from PIL import Image

    frame = make_frames(1, 32, 24)[0]
    model = local.pipeline.model()
    result = await local.pipeline.encode(FramesUpload(frame[None], fps=24))
    expected = decode_latent_file(result.data)[0]
    for endpoint, factors in (
            (server.url + "/encode", {"scaling_factor": model.scale_factor,
                                      "shift_factor": model.shift_factor}),
            (server.url + "/encode?output_type=pt", {})):  # no factors: ask for the tensor
        latent = remote_utils.remote_encode(endpoint=endpoint, image=Image.fromarray(frame),
                                            **factors)
        assert tuple(latent.shape) == expected.shape == (1, model.z_dim, 1, 3, 4)
        np.testing.assert_allclose(latent.numpy(), expected, rtol=0, atol=1e-4)


async def test_bare_latents_and_batches_over_http(tiny_weights: Path,  # noqa: F811
                                                  local: Service) -> None:
    latent = await _sampler_latent(local, batch=3)
    expected = await _local_frames(local, latent)
    one = latent[:1]
    async with running_app(tiny_settings(tiny_weights)) as client:
        # a bare safetensors file, rank 5 (batch 3) and rank 4
        r = await client.post("/decode?format=frames", content=dumps({"latent": latent}))
        assert r.status_code == 200, r.text
        tensors, meta = loads(r.content)
        assert meta["layout"] == "BTHWC uint8 RGB"
        np.testing.assert_array_equal(tensors["frames"].array, expected)
        r = await client.post("/decode?format=frames", content=dumps({"latent": one[0]}))
        np.testing.assert_array_equal(loads(r.content)[0]["frames"].array, expected[0])
        # a raw tensor body; batch MP4s come back as a zip
        r = await client.post("/decode", content=latent.tobytes(),
                              params={"shape": list(latent.shape), "dtype": "float32",
                                      "fps": "30000/1001"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert archive.namelist() == ["0.mp4", "1.mp4", "2.mp4"]
            with open_video(archive.read("2.mp4")) as reader:
                assert reader.read_all().shape == (5, 64, 64, 3)
                assert abs(reader.info.fps - 30000 / 1001) < 1e-3
        # output size and frame count given; pt answers with shape / dtype headers
        r = await client.post("/decode", content=one.tobytes(), params={
            "shape": "1,4,2,8,8", "dtype": "float32", "num_frames": "4", "height": "60",
            "width": "57", "output_type": "pt", "partial_postprocess": "true"})
        assert r.status_code == 200, r.text
        assert json.loads(r.headers["shape"]) == [4, 60, 57, 3]
        assert r.headers["dtype"] == "uint8"
        got = np.frombuffer(r.content, np.uint8).reshape(4, 60, 57, 3)
        np.testing.assert_array_equal(got, expected[0, :4, :60, :57])

        # float frames, batch of 3: the in-process model's own values, within 1e-4
        video = model_video(tiny_weights, latent)  # (3, 3, 5, 64, 64)
        r = await client.post("/decode", content=latent.tobytes(), params={
            "shape": list(latent.shape), "dtype": "float32", "output_type": "pt"})
        assert r.status_code == 200, r.text
        assert json.loads(r.headers["shape"]) == [3, 3, 5, 64, 64]
        assert r.headers["dtype"] == "float32"
        got = np.frombuffer(r.content, np.float32).reshape(3, 3, 5, 64, 64)
        np.testing.assert_allclose(got, video, rtol=0, atol=1e-4)
        r = await client.post("/decode?format=frames&frames_dtype=float32",
                              content=dumps({"latent": latent}))
        tensors, meta = loads(r.content)
        assert meta["layout"] == "BTHWC float32 RGB [-1, 1]"
        np.testing.assert_allclose(tensors["frames"].array, video.transpose(0, 2, 3, 4, 1),
                                   rtol=0, atol=1e-4)
        # one item, cropped, streamed as a float frames file
        r = await client.post("/decode", content=one.tobytes(), params={
            "shape": "1,4,2,8,8", "dtype": "float32", "num_frames": "4", "height": "60",
            "width": "57", "format": "frames", "frames_dtype": "float32"})
        tensors, meta = loads(r.content)
        assert meta["layout"] == "THWC float32 RGB [-1, 1]"
        np.testing.assert_allclose(
            tensors["frames"].array,
            model_video(tiny_weights, one, num_frames=4, height=60, width=57)[0].transpose(
                1, 2, 3, 0), rtol=0, atol=1e-4)


BAD_DECODES = [
    ({"shape": "1,4,2,8,8", "dtype": "float32"}, b"\0" * 10, 400, "bytes"),
    ({"shape": "1,5,2,8,8", "dtype": "float32"}, bytes(4 * 5 * 2 * 64), 422, "channels"),
    ({"shape": "1,4,2,8", "dtype": "float32"}, bytes(4 * 4 * 2 * 8), 422, "(B, z, t, h, w)"),
    # Two image latents (B, z, h, w): 4-D is one video, and the error says how to send them.
    ({"shape": "2,4,8,8", "dtype": "float32"}, bytes(4 * 2 * 4 * 64), 422, "(B, z, 1, h, w)"),
    # A raw tensor without its shape (sent as headers, say) is no latent file: say so.
    ({}, np.zeros((1, 4, 2, 8, 8), np.float32).tobytes(), 422, "?shape="),
    ({"shape": "1,4,2,8,8", "dtype": "int8"}, bytes(4 * 2 * 64), 400, "'dtype'"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "num_frames": "9"}, bytes(16 * 2 * 64), 400,
     "num_frames"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "width": "80"}, bytes(16 * 2 * 64), 400,
     "frame does not come"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "output_type": "pil"}, bytes(16 * 2 * 64), 400,
     "output_type"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "model": "nope"}, bytes(16 * 2 * 64), 400,
     "unknown model"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "colour": "1"}, bytes(16 * 2 * 64), 400,
     "'colour'"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "fps": "-3"}, bytes(16 * 2 * 64), 400, "'fps'"),
    ({"shape": "1,4,2,8,8", "dtype": "float32", "format": "frames", "output_type": "pt"},
     bytes(16 * 2 * 64), 400, "contradict"),
    ({"shape": "1,4,200,8,8", "dtype": "float32"}, bytes(16 * 200 * 64), 413, "limit"),
    ({"shape": "1,4,1,8,8", "dtype": "float32"},
     np.full((1, 4, 1, 8, 8), np.nan, np.float32).tobytes(), 422, "non-finite"),
    ({"dtype": "float32"}, b"x", 400, "'shape'"),
    ({"shape": "1,4,1,8,8", "dtype": "float32", "frames_dtype": "float16"}, bytes(16 * 64),
     400, "'frames_dtype'"),
    ({"shape": "1,4,1,8,8", "dtype": "float32", "frames_dtype": "float32"}, bytes(16 * 64),
     400, "MP4 holds uint8"),
    ({"shape": "1,4,1,8,8", "dtype": "float32", "frames_dtype": "uint8", "output_type": "pt"},
     bytes(16 * 64), 400, "partial_postprocess"),
    ({"shape": "1,4,1,8,8", "dtype": "float32", "partial_postprocess": "maybe"},
     bytes(16 * 64), 400, "'partial_postprocess'"),
    ({"num_frames": "5"}, dumps({"latent": np.zeros((4, 2, 8, 8), np.float32)},
                                {"format": "ivvae.latent"}), 400, "bare latents"),
]
BAD_ENCODES = [
    ({"shape": "2,8,8,3", "dtype": "uint8"}, bytes(10), 400, "bytes"),
    ({"shape": "2,8,8,4", "dtype": "uint8"}, bytes(2 * 8 * 8 * 4), 400, "(T, H, W, 3)"),
    ({"shape": "1,4,2,8,8", "dtype": "float32"}, bytes(4 * 4 * 2 * 64), 400, "(B, 3, T, H, W)"),
    ({"shape": "2,3,1,8,8", "dtype": "float32", "output_type": "file"}, bytes(4 * 2 * 3 * 64),
     400, "batch of 2"),
    ({"shape": "1,3,1,8,8", "dtype": "float32"},
     np.full((1, 3, 1, 8, 8), np.inf, np.float32).tobytes(), 400, "non-finite"),
    # [0, 255] floats were clipped to a white video, with a 200.
    ({"shape": "1,3,1,8,8", "dtype": "float32"},
     np.linspace(0, 255, 192, dtype=np.float32).tobytes(), 400, "x / 127.5 - 1"),
    ({"shape": "1,3,1,8,8", "dtype": "float32"},
     np.full((1, 3, 1, 8, 8), -1.3, np.float32).tobytes(), 400, "[-1.3, -1.3]"),
    ({"shape": "1,8,8,3", "dtype": "uint8", "output_type": "tensor"}, bytes(192), 400,
     "output_type"),
    ({"shape": "1,8,8,3", "dtype": "uint8", "bucket": "8x8"}, bytes(192), 400, "'bucket'"),
]


async def test_bad_tensor_bodies_and_parameters_name_the_problem(
        tiny_weights: Path) -> None:  # noqa: F811
    """One app for every case: each a 4xx naming the problem, and the app still works."""
    async with running_app(tiny_settings(tiny_weights, max_frames=64)) as client:
        for path, cases in (("/decode", BAD_DECODES), ("/encode", BAD_ENCODES)):
            for params, body, status, word in cases:
                r = await client.post(path, content=body, params=params)
                assert r.status_code == status, (path, params, r.text)
                assert word in r.json()["detail"], (path, params, r.text)
        ok = await client.post("/encode", content=bytes(192),
                               params={"shape": "1,8,8,3", "dtype": "uint8"})
        assert ok.status_code == 200, ok.text
        # A decoder's own output overshoots [-1, 1] a little: clipped, not refused.
        overshoot = np.full((1, 3, 1, 8, 8), 1.1, np.float32)
        ok = await client.post("/encode", content=overshoot.tobytes(),
                               params={"shape": "1,3,1,8,8", "dtype": "float32"})
        assert ok.status_code == 200, ok.text


async def test_encode_options_over_http(tiny_weights: Path) -> None:  # noqa: F811
    clip = sample_clip("bigbuckbunny").read_bytes()
    async with running_app(tiny_settings(tiny_weights)) as client:
        r = await client.post("/encode", content=clip, params={"bucket": "480x272x17"},
                              headers={"content-type": "video/mp4"})
        assert r.status_code == 200, r.text
        latent, info = decode_latent_file(r.content)
        assert latent.shape == (1, 4, 5, 34, 60)
        again = await client.post("/encode", content=clip, params={"bucket": "480x272x17"},
                                  headers={"content-type": "video/mp4"})
        other = await client.post("/encode", content=clip, params={"bucket": "480x272x9"},
                                  headers={"content-type": "video/mp4"})
        assert (again.headers["x-cache"], other.headers["x-cache"]) == ("hit", "miss")
        d = await client.post("/decode", content=r.content)
        assert d.status_code == 200
    with open_video(d.content) as reader:
        assert reader.read_all().shape == (17, 272, 480, 3)
    assert info.extra["preprocess"] == "bucket=480x272x17"


async def test_tensor_frames_take_a_fractional_rate_as_grpc_does(
        tiny_weights: Path) -> None:  # noqa: F811
    """fps=30000/1001 was a 400 ("must be a number") here, while gRPC's TensorSpec.fps and
    the fps option took it."""
    frames = make_frames(5, 16, 16)
    async with running_app(tiny_settings(tiny_weights)) as client:
        r = await client.post("/encode", content=frames.tobytes(), params={
            "shape": "5,16,16,3", "dtype": "uint8", "fps": "30000/1001",
            "output_type": "file"})
        assert r.status_code == 200, r.text
        assert loads(r.content)[1]["fps"] == "30000/1001"
        r = await client.post("/encode", content=frames.tobytes(), params={
            "shape": "5,16,16,3", "dtype": "uint8", "fps": "30000/0"})
        assert r.status_code == 400 and "fps" in r.json()["detail"], r.text


async def test_a_seeded_sample_of_a_batch_draws_each_item_s_own_noise(
        tiny_weights: Path) -> None:  # noqa: F811
    # One seed for every item added the same noise to every video of the batch: two copies
    # of one video came back as the same sample, which no generator over a batch does.
    one = make_frames(5, 16, 16).transpose(3, 0, 1, 2)[None].astype(np.float32) / 127.5 - 1
    both = np.concatenate([one, one])

    async def sample(video: np.ndarray) -> np.ndarray:
        r = await client.post("/encode", content=video.tobytes(), params={
            "shape": ",".join(map(str, video.shape)), "dtype": "float32",
            "sample": "true", "seed": "7", "output_type": "pt"})
        assert r.status_code == 200, r.text
        return np.frombuffer(r.content, np.float32).reshape(json.loads(r.headers["shape"]))

    async with running_app(tiny_settings(tiny_weights)) as client:
        alone, batch = await sample(one), await sample(both)
    np.testing.assert_array_equal(batch[0], alone[0])  # item 0 keeps the seed
    assert np.abs(batch[1] - batch[0]).max() > 1e-3  # item 1 its own noise
