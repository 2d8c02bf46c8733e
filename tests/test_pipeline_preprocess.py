"""Preprocessing through the pipeline on real clips: latent shapes, decoded sizes, metadata,
cache keys."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_asyncio

from ivvae.latents import decode_latent_file
from ivvae.pipeline import EncodeOptions, FramesUpload
from ivvae.service import Service
from ivvae.video import Preprocess
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
    assert a.latent_shape[2:] == (2, 8, 10) and c.latent_shape[2] == 3
    assert d.latent_shape[3:] == (6, 8)


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
