"""Preprocessing through the pipeline on real clips: latent shapes, decoded sizes, metadata,
cache keys."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import pytest_asyncio

from ivvae.latents import decode_latent_file
from ivvae.outputs import collect, render
from ivvae.pipeline import EncodeOptions, FramesUpload
from ivvae.service import Service
from ivvae.video import Preprocess, open_video
from tests.media import make_frames, make_video, sample_clip, trim_by_edit_list
from tests.service_fixtures import tiny_settings, tiny_weights  # noqa: F401


@pytest_asyncio.fixture
async def service(tiny_service: Service) -> Service:
    return tiny_service


def _options(**params: str) -> EncodeOptions:
    return EncodeOptions(preprocess=Preprocess.parse(params))


@pytest.mark.asyncio
async def test_bucket_gives_the_bucket_latent_and_decode(service: Service) -> None:
    path = sample_clip("bigbuckbunny")  # 1280x720, 132 frames
    result = await service.pipeline.encode(path, _options(bucket="480x272x17"))
    z = service.pipeline.model().z_dim
    assert result.latent_shape == (1, z, 5, 34, 60)
    meta = result.info.to_metadata()
    assert meta["preprocess"] == "bucket=480x272x17"
    assert meta["preprocess_bucket"] == "480x272x17"
    assert (meta["preprocess_source_width"], meta["preprocess_source_height"]) == ("1280", "720")
    assert meta["preprocess_source_fps"] == "25/1"
    assert meta["preprocess_source_frames_declared"] == "132"
    assert (meta["num_frames"], meta["width"], meta["height"]) == ("17", "480", "272")
    _, frames = await service.pipeline.decode_frames(result.data)
    decoded = np.concatenate([f async for f in frames])
    assert decoded.shape == (17, 272, 480, 3)


@pytest.mark.asyncio
async def test_options_are_part_of_the_cache_key(service: Service) -> None:
    path = sample_clip("carphone_pristine")
    a = await service.pipeline.encode(path, _options(resize="64", max_frames="5"))
    b = await service.pipeline.encode(path, _options(resize="64", max_frames="5"))
    c = await service.pipeline.encode(path, _options(resize="64", max_frames="9"))
    d = await service.pipeline.encode(path, _options(resize="48", max_frames="5"))
    assert (a.cache_hit, b.cache_hit, c.cache_hit, d.cache_hit) == (False, True, False, False)
    assert a.data == b.data
    # carphone's 176x144 pixels are shown 192.5x144 (SAR 128:117): 86x64, latent 11 wide.
    assert a.latent_shape[2:] == (2, 8, 11) and c.latent_shape[2] == 3
    assert d.latent_shape[3:] == (6, 8)


DVD = Fraction(32, 27)  # a DVD's SAR: its 720x480 pictures are shown 16:9 (853x480)


@pytest.mark.asyncio
async def test_an_anamorphic_clip_is_resized_by_its_displayed_shape(service: Service) -> None:
    # 144x96 (3:2) shown 170.7x96 (16:9): a DVD picture, smaller (tests/video has 720x480).
    dvd = make_video(None, frames=5, width=144, height=96, sample_aspect_ratio=DVD)
    z = service.pipeline.model().z_dim
    # The 16:9 bucket (read as 3:2 it took the 4:3 one, cropped and squeezed).
    bucketed = await service.pipeline.encode(dvd, _options(bucket="96x54x5,64x48x5"))
    assert bucketed.latent_shape == (1, z, 2, 7, 12)
    meta = bucketed.info.to_metadata()
    assert meta["preprocess_bucket"] == "96x54x5"
    assert (meta["preprocess_source_width"], meta["preprocess_source_height"]) == ("144", "96")
    assert meta["preprocess_source_sample_aspect_ratio"] == "32:27"
    assert "sample_aspect_ratio" not in meta  # resampled: square pixels
    # The short side 48 of 170.7x96: 85x48, latent 11 wide (the stored width gave 72: 9).
    resized = await service.pipeline.encode(dvd, _options(resize="48"))
    assert (resized.info.width, resized.info.height) == (85, 48)
    assert resized.latent_shape[3:] == (6, 11)
    assert resized.info.sample_aspect_ratio == 1


@pytest.mark.asyncio
async def test_an_anamorphic_clip_without_resize_keeps_its_pixels_and_says_their_shape(
        service: Service) -> None:
    dvd = make_video(None, frames=5, width=144, height=96, sample_aspect_ratio=DVD)
    plain = await service.pipeline.encode(dvd)
    assert (plain.info.width, plain.info.height) == (144, 96)
    assert plain.info.to_metadata()["sample_aspect_ratio"] == "32:27"
    assert plain.info.sample_aspect_ratio == DVD
    # The stored pixels, as encoded before: the latent of those frames sent as a tensor.
    with av.open(io.BytesIO(dvd)) as container:
        stored = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    as_frames = await service.pipeline.encode(FramesUpload(stored, fps=24))
    assert "sample_aspect_ratio" not in as_frames.info.to_metadata()
    np.testing.assert_array_equal(decode_latent_file(plain.data)[0],
                                  decode_latent_file(as_frames.data)[0])
    # From the cache, the same bytes (the SAR is in the cached entry).
    again = await service.pipeline.encode(dvd)
    assert again.cache_hit and again.data == plain.data
    # Other options that do not resample keep the pixels too, and say so.
    window = await service.pipeline.encode(dvd, _options(num_frames="3"))
    meta = window.info.to_metadata()
    assert (meta["width"], meta["sample_aspect_ratio"]) == ("144", "32:27")
    assert meta["preprocess_source_sample_aspect_ratio"] == "32:27"

    # Decoded to MP4, the stream carries the SAR: players show it 16:9 (171x96) again.
    info, frames = await service.pipeline.decode_frames(plain.data)
    mp4 = await collect(render("mp4", info, frames))
    with av.open(io.BytesIO(mp4)) as container:
        assert container.streams.video[0].sample_aspect_ratio == DVD
    with open_video(mp4) as reader:
        assert (reader.info.display_width, reader.info.display_height) == (171, 96)
        assert reader.read_all().shape == (5, 96, 144, 3)
    # A square-pixel latent's MP4 says nothing, as before.
    info, frames = await service.pipeline.decode_frames(as_frames.data)
    mp4 = await collect(render("mp4", info, frames))
    with av.open(io.BytesIO(mp4)) as container:
        assert container.streams.video[0].sample_aspect_ratio is None


@pytest.mark.asyncio
async def test_frames_upload_with_a_window(service: Service) -> None:
    frames = make_frames(12, 32, 16)
    whole = await service.pipeline.encode(FramesUpload(frames, fps=12))
    part = await service.pipeline.encode(FramesUpload(frames, fps=12),
                                         _options(start_frame="3", num_frames="5"))
    direct = await service.pipeline.encode(FramesUpload(np.ascontiguousarray(frames[3:8]),
                                                        fps=12))
    assert whole.info.num_frames == 12 and part.info.num_frames == 5

    np.testing.assert_array_equal(decode_latent_file(part.data)[0],
                                  decode_latent_file(direct.data)[0])


@pytest.mark.asyncio
@pytest.mark.parametrize(("options", "first", "last"), [
    # carphone runs at 30000/1001 fps. Frames 3, 5, ..., 19:
    ({"start_frame": "3", "stride": "2", "num_frames": "9"}, 3, 19),
    # 10 fps from 1.01 s, 5 frames: those on screen at 1.01 s (frame 30, shown from
    # 1.001 s) to 1.41 s (frame 42, shown from 1.401 s).
    ({"start_s": "1.01", "fps": "10", "num_frames": "5"}, 30, 42),
])
async def test_the_latent_records_which_source_frames_it_covers(
        service: Service, options: dict[str, str], first: int, last: int) -> None:
    frame_s = 1001 / 30000
    result = await service.pipeline.encode(sample_clip("carphone_pristine"),
                                           _options(resize="32", **options))
    meta = result.info.to_metadata()
    assert (meta["preprocess_source_first_frame"], meta["preprocess_source_last_frame"]) == (
        str(first), str(last))
    assert float(meta["preprocess_source_first_s"]) == pytest.approx(first * frame_s, abs=1e-4)
    assert float(meta["preprocess_source_last_s"]) == pytest.approx(last * frame_s, abs=1e-4)


@pytest.mark.asyncio
async def test_an_edit_list_trimmed_clip_records_the_frames_it_shows(service: Service) -> None:
    # The stream keeps 17 samples; its edit list shows 13 (a stream-copied cut).
    clip = trim_by_edit_list(make_video(None, frames=17, width=64, height=48), skip=4)
    result = await service.pipeline.encode(clip, _options(bucket="64x48x17,64x48x9"))
    meta = result.info.to_metadata()
    assert meta["preprocess_bucket"] == "64x48x9"
    assert meta["preprocess_source_frames_declared"] == "13"
    assert meta["num_frames"] == "9"


@pytest.mark.asyncio
async def test_a_tensor_s_rate_is_one_for_its_frames_key_and_latent(service: Service) -> None:
    # fps=24.0004 keyed and recorded as 24/1 (the rate its MP4 and latent carry), but the
    # frames were picked at 24.0004: at 50.0403 s that is frame 1201, at 24 frame 1200.
    # The second request was answered from the cache with the first one's frame.
    frames = np.random.default_rng(0).integers(0, 256, (1300, 16, 16, 3), dtype=np.uint8)
    window = _options(start_s="50.0403", num_frames="1")
    at_24_0004 = await service.pipeline.encode(FramesUpload(frames, fps=24.0004), window)
    assert not at_24_0004.cache_hit
    at_24 = await service.pipeline.encode(FramesUpload(frames, fps=24), window)
    assert at_24.cache_hit  # the same rate (24/1): the same frames and latent
    alone = await service.pipeline.encode(FramesUpload(frames[1200:1201], fps=24))
    for result in (at_24, at_24_0004):
        assert result.info.to_metadata()["fps"] == "24/1"
        np.testing.assert_array_equal(decode_latent_file(result.data)[0],
                                      decode_latent_file(alone.data)[0])
    assert at_24.info.to_metadata()["preprocess_source_first_frame"] == "1200"
