"""The clients with arrays: numpy / torch frames in, bare latents (one and a batch of 3) out,
over gRPC and HTTP, equal to the same work in-process; preprocessing options; bfloat16."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ivvae.client import Client
from ivvae.errors import InvalidInput, InvalidLatent
from ivvae.latents import decode_latent_file
from ivvae.pipeline import FramesUpload
from ivvae.video import open_video
from ivvae.wire import DecodeTarget
from tests.grpc_fixtures import ServerThread, server_thread
from tests.media import make_frames, sample_clip
from tests.service_fixtures import model_video, tiny_settings, tiny_weights  # noqa: F401

torch = pytest.importorskip("torch")
FRAMES = make_frames(5, 24, 16)


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:  # noqa: F811
    with server_thread(tiny_settings(tiny_weights), http=True) as srv:
        yield srv


@pytest.fixture(params=["grpc", "http"])
def url(request: pytest.FixtureRequest, server: ServerThread) -> str:
    return server.grpc_url if request.param == "grpc" else server.http_url


def _in_process(server: ServerThread, latent: np.ndarray) -> np.ndarray:
    async def run() -> np.ndarray:
        _, items = await server.service.pipeline.decode_bare(latent, "float32",
                                                             DecodeTarget())
        out = []
        for item in items:
            out.append(np.concatenate([f async for f in item]))
        return np.stack(out)

    return server.call(run())


def test_array_inputs_encode_like_the_frames(url: str, server: ServerThread) -> None:
    expected = server.call(server.service.pipeline.encode(FramesUpload(FRAMES, fps=24)))
    with Client(url) as client:
        by_numpy = client.encode(FRAMES)
        video = torch.from_numpy(FRAMES).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        by_torch = client.encode(video)
        assert by_numpy.data == by_torch.data == expected.data
        windowed = client.encode(FRAMES, preprocess={"start_frame": "1", "num_frames": "4"})
        assert windowed.info.num_frames == 4
        resized = client.encode(sample_clip("carphone_pristine"),
                                preprocess={"resize": "32", "max_frames": "5"})
        # carphone's 176x144 pixels are shown 192.5x144 (SAR 128:117): the short side 32
        # makes it 43 wide, square pixels.
        assert (resized.info.width, resized.info.height, resized.info.num_frames) == (43, 32, 5)
        assert resized.info.extra["preprocess"] == "resize=32;max_frames=5"
        # Numbers as numbers, buckets as a list: as a Python caller writes them (an int was
        # an AttributeError: 'int' object has no attribute 'strip').
        typed = client.encode(sample_clip("carphone_pristine"),
                              preprocess={"resize": 32, "max_frames": 5})
        assert typed.data == resized.data
        bucketed = client.encode(FRAMES, preprocess={"bucket": ["16x16x5", "8x8x1"]})
        assert "bucket=8x8x1,16x16x5" in bucketed.info.extra["preprocess"]  # both, canonical
        with pytest.raises(InvalidInput, match="'max_frames': True is not"):
            client.encode(FRAMES, preprocess={"max_frames": True})
        with pytest.raises(InvalidInput, match="'stride' and 'fps'"):
            client.encode(FRAMES, preprocess={"stride": "2", "fps": "5"})
        with pytest.raises(ValueError, match="batch"):
            client.encode(np.zeros((2, 3, 1, 8, 8), np.float32))
        # The shape named is the caller's (it said (1, 5, 16, 16), which was never given).
        with pytest.raises(ValueError, match=r"got \(5, 16, 16\)"):
            client.encode(np.zeros((5, 16, 16), np.uint8))
        bf16 = client.encode(sample_clip("carphone_pristine"), dtype="bfloat16",
                             preprocess={"resize": "16", "max_frames": "1"})
        assert bf16.torch().dtype == torch.bfloat16
        assert torch.equal(bf16.torch().float(), torch.from_numpy(bf16.numpy()))


def test_arrays_the_service_would_refuse_are_refused_alike(url: str) -> None:
    # The client rounded float frames to uint8 itself: a [0, 255] float video (no
    # "/ 127.5 - 1") became a thresholded one, encoded without a word, where the service
    # answers the same tensor with a 400; a NaN video was a plain ValueError.
    video = torch.from_numpy(FRAMES).permute(3, 0, 1, 2)[None].float()
    with Client(url) as client:
        with pytest.raises(InvalidInput, match=r"values span \[0, 255\].*x / 127.5 - 1"):
            client.encode(video)
        with pytest.raises(InvalidInput, match="non-finite"):
            client.encode(torch.full((1, 3, 2, 8, 8), float("nan")))
        for empty in (np.zeros((0, 16, 16, 3), np.uint8), np.zeros((1, 3, 0, 8, 8))):
            with pytest.raises(InvalidInput, match="no frames or no pixels"):
                client.encode(empty)
        # A decoder's own output overshoots [-1, 1] a little: clipped, as the service does.
        exact = video / 127.5 - 1
        over = torch.where(exact.abs() > 0.999, exact * 1.2, exact)
        assert (over != exact).any()
        assert client.encode(over).data == client.encode(exact).data
        # An integer tensor is no latent (it was cast to float and decoded).
        with pytest.raises(ValueError, match="a latent is a float tensor; got int64"):
            client.decode(torch.ones(1, 4, 1, 2, 2, dtype=torch.int64), format="frames")
        # The result's arrays are its own: an edit in place changed what it gave next.
        result = client.encode(FRAMES)
        z = result.numpy()
        z /= 0.8
        assert np.array_equal(result.numpy(), result.torch().numpy())


def _in_a_fork(child_side: Callable[[], str]) -> tuple[int, str]:
    """Fork; the child runs ``child_side`` and exits. The child's pid and what it said (a
    child that hangs fails the test after 30 s instead)."""
    import os
    import select

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's outcome goes through the pipe)
        os.write(write, child_side().encode()[:4000])
        os._exit(0)
    os.close(write)
    try:
        assert select.select([read], [], [], 30)[0], "the child's call hung"
        return child, os.read(read, 4000).decode()
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_client_used_before_a_fork_is_refused_in_the_child_not_a_hang(url: str) -> None:
    # A DataLoader worker forked after the parent used the client sent its calls to the
    # parent's loop thread, which the child does not have: it waited for ever (its timeout
    # runs on that loop too).
    import os

    with Client(url, timeout=5) as client:
        client.encode(FRAMES)

        def child_side() -> str:
            try:
                client.encode(FRAMES)
                said = "answered"
            except RuntimeError as exc:
                said = str(exc)
            client.close()  # lets go of the parent's (it waited on its loop for ever)
            return said

        child, said = _in_a_fork(child_side)
        assert f"used in process {os.getpid()}, and {child} is a fork of it" in said, said
        assert client.encode(FRAMES).info.num_frames == 5  # the parent's is untouched


def test_bare_latents_decode_like_in_process(url: str, server: ServerThread) -> None:
    with Client(url) as client:
        latent = np.concatenate([client.encode(FRAMES[i:]).numpy()[:, :, :1]
                                 for i in range(3)])  # (3, z, 1, 2, 3)
        expected = _in_process(server, latent)
        one = client.decode(latent[:1], format="frames")
        # one video comes back as (T, H, W, 3), a batch of more as (B, T, H, W, 3)
        assert isinstance(one, np.ndarray) and one.shape == (1, 16, 24, 3)
        np.testing.assert_array_equal(one, expected[0])
        batch = client.decode(torch.from_numpy(latent), format="frames")
        np.testing.assert_array_equal(batch, expected)
        half = client.decode(torch.from_numpy(latent).to(torch.bfloat16), format="frames")
        assert half.shape == expected.shape
        rank4 = client.decode(latent[0], format="frames", height=13, width=20)
        np.testing.assert_array_equal(rank4, expected[0, :, :13, :20])
        mp4s = client.decode(latent, fps=12)
        assert isinstance(mp4s, bytes)
        with zipfile.ZipFile(io.BytesIO(mp4s)) as archive:
            assert archive.namelist() == ["0.mp4", "1.mp4", "2.mp4"]
            with open_video(archive.read("1.mp4")) as reader:
                assert reader.read_all().shape == (1, 16, 24, 3)
        with pytest.raises(InvalidLatent, match="channels"):
            client.decode(np.zeros((1, 3, 1, 2, 2), np.float32))
        with pytest.raises(InvalidInput, match="num_frames"):
            client.decode(latent, num_frames=9)
        # 0 is a value, not "unset": it reaches the server, which names it
        with pytest.raises(InvalidInput, match="fps"):
            client.decode(latent, fps=0)
        with pytest.raises(InvalidInput, match="num_frames"):
            client.decode(latent, num_frames=0)
        # a latent file still decodes, and is refused bare-latent options
        made = client.encode(FRAMES)
        assert isinstance(client.decode(made), bytes)
        with pytest.raises(InvalidInput, match="bare latents"):
            client.decode(made, fps=10)
    assert decode_latent_file(made.data)[1].num_frames == 5


def test_float_frames_equal_the_in_process_model(url: str, server: ServerThread,
                                                 tiny_weights: Path) -> None:  # noqa: F811
    """A sampler's latent (one, and a batch of 3; two latent frames, so the decoder
    streams) decoded to float32 frames equals the model's own decode within 1e-4; uint8
    frames equal the in-process service's exactly; an MP4 cannot be float."""
    z = server.service.pipeline.model().z_dim
    latent = np.random.default_rng(0).standard_normal((3, z, 2, 2, 3)).astype(np.float32)
    video = model_video(tiny_weights, latent).transpose(0, 2, 3, 4, 1)  # (3, 5, 16, 24, 3)
    with Client(url) as client:
        one = client.decode(latent[:1], format="frames", frames_dtype="float32")
        assert isinstance(one, np.ndarray) and one.dtype == np.float32
        np.testing.assert_allclose(one, video[0], rtol=0, atol=1e-4)
        batch = client.decode(latent, format="frames", frames_dtype="float32")
        assert batch.shape == (3, 5, 16, 24, 3)
        np.testing.assert_allclose(batch, video, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(client.decode(latent, format="frames"),
                                      _in_process(server, latent))
        # a latent file from encode too
        made = client.encode(FRAMES)
        got = client.decode(made, format="frames", frames_dtype="float32")
        expected = model_video(tiny_weights, made.numpy(), height=16, width=24)
        np.testing.assert_allclose(got, expected[0].transpose(1, 2, 3, 0), rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="uint8"):
            client.decode(latent, frames_dtype="float32")


def test_an_async_client_used_before_a_fork_is_refused_in_the_child(url: str) -> None:
    # Its gRPC channel or HTTP pool is the parent's: used from the child, two processes
    # would share one connection's state.
    import os

    from ivvae.client import AsyncClient

    async def parent_side() -> AsyncClient:
        client = AsyncClient(url, timeout=5)
        await client.encode(FRAMES)
        return client

    async def child_calls() -> str:
        try:
            await client.models()
            said = "answered"
        except RuntimeError as exc:
            said = str(exc)
        await client.close()  # lets go of the parent's connection
        return said

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(parent_side())
    try:
        child, said = _in_a_fork(lambda: asyncio.new_event_loop().run_until_complete(
            child_calls()))
        assert f"AsyncClient was used in process {os.getpid()}, and {child} is a fork" in said, said
        assert loop.run_until_complete(client.encode(FRAMES)).info.num_frames == 5
    finally:
        loop.run_until_complete(client.close())
        loop.close()
