"""Bad input gets a clear 4xx JSON error, and the server answers the next good request."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ivvae.safetensors_io import Tensor, dumps, loads
from tests import media
from tests.service_fixtures import running_app, tiny_settings

GOOD = media.make_video(None, frames=5, width=16, height=16)


def _mp4_upload(data: bytes, ctype: str = "video/mp4") -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("upload", data, ctype)}


def _truncated_mp4() -> bytes:
    data = media.make_video(None, frames=30, width=64, height=48)
    return data[: len(data) // 2]


def _truncated_webm() -> bytes:
    data = media.make_video(None, frames=30, width=64, height=48, container="webm",
                            codec="libvpx-vp9")
    return data[: int(len(data) * 0.8)]


UPLOADS: dict[str, tuple[Callable[[], dict[str, object]], int, str]] = {
    "empty body": (lambda: {"content": b"", "headers": {"content-type": "video/mp4"}}, 400,
                   "empty_input"),
    "empty file": (lambda: {"files": _mp4_upload(b"")}, 400, "empty_input"),
    "random bytes": (lambda: {"files": _mp4_upload(np.random.default_rng(0).bytes(5000))},
                     415, "unsupported_media"),
    "text file": (lambda: {"files": _mp4_upload(b"hello, world\n" * 50, "text/plain")}, 415,
                  "unsupported_media"),
    "text body": (lambda: {"content": b"{}", "headers": {"content-type": "application/json"}},
                  415, "unsupported_media"),
    "truncated mp4": (lambda: {"files": _mp4_upload(_truncated_mp4())}, 422, "corrupt_media"),
    "truncated webm": (lambda: {"files": _mp4_upload(_truncated_webm(), "video/webm")}, 422,
                       "corrupt_media"),
    "audio only": (lambda: {"files": _mp4_upload(media.make_audio_only(), "audio/mp4")}, 415,
                   "unsupported_media"),
    "8192x8192": (lambda: {"files": _mp4_upload(media.make_huge_png(8192, 8192), "image/png")},
                  413, "too_large"),
    "y4m 60000x60000": (lambda: {"files": _mp4_upload(media.make_y4m(60000, 60000, payload=64),
                                                      "video/x-yuv4mpeg")}, 413, "too_large"),
    "too many frames": (lambda: {"files": _mp4_upload(
        media.make_video(None, frames=40, width=8, height=8))}, 413, "too_large"),
    "oversized payload": (lambda: {"files": _mp4_upload(b"\0" * 300_000)}, 413, "too_large"),
    "no file field": (lambda: {"files": {"video": ("v.mp4", GOOD, "video/mp4")}}, 400,
                      "invalid_input"),
    # Query parameters are read by the service's own parser (issue 14): a 400 naming them.
    "bad query": (lambda: {"files": _mp4_upload(GOOD), "params": {"seed": "-1"}}, 400,
                  "invalid_input"),
    "unknown query": (lambda: {"files": _mp4_upload(GOOD), "params": {"rezise": "64"}}, 400,
                      "invalid_input"),
    "contradictory options": (lambda: {"files": _mp4_upload(GOOD),
                                       "params": {"stride": "2", "fps": "5"}}, 400,
                              "invalid_input"),
    "unknown model": (lambda: {"files": _mp4_upload(GOOD), "params": {"model": "nope"}}, 400,
                      "unknown_model"),
}


@pytest.mark.parametrize("case", sorted(UPLOADS))
async def test_bad_uploads(tiny_weights: Path, case: str) -> None:
    make, status, code = UPLOADS[case]
    settings = tiny_settings(tiny_weights, max_frames=32, max_upload_bytes=200_000)
    async with running_app(settings) as client:
        bad = await client.post("/encode", **make())  # type: ignore[arg-type]
        good = await client.post("/encode", files=_mp4_upload(GOOD))
        metrics = (await client.get("/metrics")).text
    assert bad.status_code == status, bad.text
    body = bad.json()
    assert body["error"] == code and body["detail"]
    assert good.status_code == 200
    if status != 422 or code != "invalid_input":
        assert f'ivvae_errors_total{{code="{code}"}}' in metrics


def _tamper(latent_file: bytes, *, tensor: Tensor | None = None,
            meta: dict[str, str | None] | None = None, extra: bool = False) -> bytes:
    tensors, metadata = loads(latent_file)
    stored: dict[str, Tensor | np.ndarray] = {"latent": tensor or tensors["latent"]}
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    if extra:
        stored["junk"] = np.zeros(3, np.float32)
    return dumps(stored, metadata)


def _raw_header(latent_file: bytes, header: bytes) -> bytes:
    """``latent_file`` with its JSON header replaced by ``header`` (data section kept)."""
    (n,) = struct.unpack_from("<Q", latent_file)
    return struct.pack("<Q", len(header)) + header + latent_file[8 + n :]


def malformed_latents(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Latent files that once got a 500 or a wrong answer: name -> (bytes, word of the
    detail). Shared with the real-server keep-alive test."""
    (n,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + n])
    big_int = json.dumps({**header, "latent": {**header["latent"], "data_offsets": [0, 1]}})
    big_int = big_int.replace('"data_offsets": [0, 1]', '"data_offsets": [0, ' + "9" * 5000 + "]")
    cases = {
        "nested json": (_raw_header(good, b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
                        "nests"),
        "5000-digit integer": (_raw_header(good, big_int.encode()), "digit"),
        "NaN in header": (_raw_header(good, json.dumps(header).replace(
            '"data_offsets": [0', '"data_offsets": [NaN', 1).encode()), "NaN"),
        "header over 64 KiB": (_tamper(good, meta={"note": "x" * 70_000}), "header"),
        "fps 0": (_tamper(good, meta={"fps": "0"}), "fps"),
        "fps 1001": (_tamper(good, meta={"fps": "1001"}), "fps"),
        "fps 1e3": (_tamper(good, meta={"fps": "1e3"}), "fps"),
        "fps tiny": (_tamper(good, meta={"fps": "1/5000"}), "fps"),
        "frames with spaces": (_tamper(good, meta={"num_frames": " 5 "}), "num_frames"),
        "frames with underscore": (_tamper(good, meta={"num_frames": "0_5"}), "num_frames"),
        "arabic-indic digits": (_tamper(good, meta={"height": "١٦"}), "height"),
        "5000-digit width": (_tamper(good, meta={"width": "1" * 5000}), "width"),
        "signed z_dim": (_tamper(good, meta={"z_dim": "+4"}), "z_dim"),
        "mode weird": (_tamper(good, meta={"mode": "weird"}), "mode"),
        "seed 2**63": (_tamper(good, meta={"seed": str(2**63)}), "seed"),
        "scale inf": (_tamper(good, meta={"scale_factor": "inf"}), "scale_factor"),
        "non-latin-1 model name": (_tamper(good, meta={"model_name": "模型"}), "model name"),
        "CR/LF in model name": (_tamper(good, meta={"model_name": "m\r\nX-Evil: 1"}),
                                "model name"),
        "100 KB model name": (_tamper(good, meta={"model_name": "m" * 60_000}), "model name"),
        "content sha not hex": (_tamper(good, meta={"content_sha256": "z" * 64}),
                                "content_sha256"),
    }
    return cases


async def test_bad_latents(tiny_weights: Path) -> None:
    async with running_app(tiny_settings(tiny_weights)) as client:
        enc = await client.post("/encode", files=_mp4_upload(GOOD))
        assert enc.status_code == 200
        good = enc.content
        latent = loads(good)[0]["latent"].array
        nan = latent.copy()
        nan[0, 1, 0, 0, 0] = np.nan
        cases: dict[str, tuple[bytes, int, str, str]] = {
            "empty": (b"", 400, "empty_input", "empty"),
            "garbage": (b"\x01\x02not safetensors at all", 422, "invalid_latent", "readable"),
            "huge header length": (b"\xff" * 8 + b"{}", 422, "invalid_latent", "header"),
            "truncated": (good[: len(good) - 10], 422, "invalid_latent", "truncated"),
            "wrong shape": (_tamper(good, tensor=Tensor("F32", np.zeros((1, 4, 3, 2, 2),
                                                                          np.float32))),
                            422, "invalid_latent", "shape"),
            "nan": (_tamper(good, tensor=Tensor("F32", nan)), 422, "invalid_latent",
                    "non-finite"),
            "wrong dtype": (_tamper(good, tensor=Tensor("I32", latent.astype(np.int32))), 422,
                            "invalid_latent", "dtype"),
            "dtype disagrees": (_tamper(good, meta={"dtype": "bfloat16"}), 422,
                                "invalid_latent", "disagrees"),
            "missing metadata": (_tamper(good, meta={"num_frames": None}), 422,
                                 "invalid_latent", "num_frames"),
            "not ivvae": (dumps({"x": np.zeros(2, np.float32)}), 422, "invalid_latent",
                          "format"),
            "other weights": (_tamper(good, meta={"weights_sha256": "0" * 64}), 422,
                              "invalid_latent", "weights"),
            "unknown model": (_tamper(good, meta={"weights_sha256": "1" * 64,
                                                  "model_name": "elsewhere"}), 400,
                              "unknown_model", "elsewhere"),
            "bad fps": (_tamper(good, meta={"fps": "0/0"}), 422, "invalid_latent", "fps"),
            "bad sar": (_tamper(good, meta={"sample_aspect_ratio": "32/27"}), 422,
                        "invalid_latent", "sample_aspect_ratio"),
            "absurd sar": (_tamper(good, meta={"sample_aspect_ratio": "9:1"}), 422,
                           "invalid_latent", "sample_aspect_ratio"),
            "absurd size": (_tamper(good, meta={"num_frames": "999999999"}), 422,
                            "invalid_latent", "shape"),
            **{f"malformed {name}": (data, 422, "invalid_latent", word)
               for name, (data, word) in malformed_latents(good).items()},
        }
        for name, (data, status, code, word) in cases.items():
            r = await client.post("/decode", content=data)
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert body["error"] == code, (name, body)
            assert word in body["detail"], (name, body)
        ok = await client.post("/decode", content=good)
        assert ok.status_code == 200 and ok.headers["content-type"] == "video/mp4"


async def test_oversized_latent_upload_is_refused_before_reading_it_all(
    tiny_weights: Path,
) -> None:
    async with running_app(tiny_settings(tiny_weights, max_upload_bytes=10_000)) as client:
        r = await client.post("/decode", content=b"\0" * 200_000)
    assert r.status_code == 413 and r.json()["error"] == "too_large"


async def test_client_errors_never_500(tiny_weights: Path) -> None:
    """A fuzz-ish sweep: mangled bytes of a valid mp4 and latent never produce a 500."""
    rng = np.random.default_rng(1)
    async with running_app(tiny_settings(tiny_weights)) as client:
        latent = (await client.post("/encode", files=_mp4_upload(GOOD))).content
        for i in range(12):
            for target, data in (("/encode", GOOD), ("/decode", latent)):
                buf = bytearray(data)
                for _ in range(1 + i):
                    buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
                r = await client.post(target, content=bytes(buf),
                                      headers={"content-type": "video/mp4"})
                assert r.status_code < 500, (target, i, r.text)
        assert (await client.post("/encode", files=_mp4_upload(GOOD))).status_code == 200


def _bare(shape: tuple[int, ...]) -> bytes:
    return dumps({"latent": np.zeros(shape, np.float32)}, {})


# Each once got a 500, hung the worker, or answered 200 with something unusable.
SQUARE = media.make_video(None, frames=5, width=32, height=32)
ODD_REQUESTS: dict[str, tuple[str, dict[str, str], bytes, int, str]] = {
    # str.isdigit takes "²", which int() refuses.
    "seed ²": ("/encode", {"seed": "²"}, GOOD, 400, "seed"),
    "resize ²": ("/encode", {"resize": "²"}, GOOD, 400, "resize"),
    "stride ²": ("/encode", {"stride": "²"}, GOOD, 400, "stride"),
    "num_frames ²": ("/encode", {"num_frames": "²"}, GOOD, 400, "num_frames"),
    "5000-digit resize": ("/encode", {"resize": "1x" + "9" * 5000}, GOOD, 400, "resize"),
    "tensor shape ²": ("/encode", {"shape": "5,16,²,3", "dtype": "uint8"}, b"", 400, "shape"),
    "crf ²": ("/decode", {"crf": "²"}, _bare((1, 4, 2, 2, 2)), 400, "crf"),
    "latent shape ²": ("/decode", {"shape": "1,4,²,2,2", "dtype": "float32"}, b"", 400,
                       "shape"),
    # Fraction("1e100000000") computes 10**100000000: minutes of a blocked event loop.
    "fps 1e100000000": ("/encode", {"fps": "1e100000000"}, GOOD, 400, "fps"),
    "start_s 1e-100000000": ("/encode", {"start_s": "1e-100000000"}, GOOD, 400, "start_s"),
    "decode fps 1e100000000": ("/decode", {"fps": "1e100000000"}, _bare((1, 4, 2, 2, 2)),
                               400, "fps"),
    # ... and float(Fraction("1e400")) overflows.
    "fps 1e400": ("/encode", {"fps": "1e400"}, GOOD, 400, "fps"),
    "start_s 1e400": ("/encode", {"start_s": "1e400"}, GOOD, 400, "start_s"),
    "decode fps 1e400": ("/decode", {"fps": "1e400"}, _bare((1, 4, 2, 2, 2)), 400, "fps"),
    # Rates the MP4 writer cannot hold (below 1/1001 fps) failed after the model ran.
    "fps 1e-7": ("/encode", {"fps": "0.0000001"}, GOOD, 400, "fps"),
    "stride to 2e-5 fps": ("/encode", {"stride": "1048576"}, GOOD, 400, "stride"),
    "tensor fps 1e-4": ("/encode", {"shape": "5,16,16,3", "dtype": "uint8", "fps": "0.0001"},
                        bytes(5 * 16 * 16 * 3), 400, "fps"),
    "decode fps 1e-4": ("/decode", {"fps": "0.0001"}, _bare((1, 4, 2, 2, 2)), 400, "fps"),
    # Covering a far-off aspect ratio scaled the clip to 12000x12000 first.
    "resize 1x12000": ("/encode", {"resize": "1x12000"}, SQUARE, 413, "resize"),
    "bucket 16384x1x1": ("/encode", {"bucket": "16384x1x1"}, SQUARE, 413, "bucket"),
    "bucket ,": ("/encode", {"bucket": ","}, GOOD, 400, "bucket"),
    "300 buckets": ("/encode", {"bucket": ",".join(f"{8 + i}x8x1" for i in range(300))},
                    GOOD, 400, "bucket"),
    "empty latent": ("/decode", {}, _bare((1, 4, 0, 2, 2)), 422, "empty"),
    # The count of tensor frames is known up front: refused before 2048 are encoded.
    "3000 tensor frames": ("/encode", {"shape": "3000,8,8,3", "dtype": "uint8"},
                           bytes(3000 * 8 * 8 * 3), 413, "3000 frames give"),
    # A scaling that overflows: a 200 full of inf, or a NaN error naming a sequence id.
    "encode scaling 1e308": ("/encode", {"output_type": "pt", "scaling_factor": "1e308"},
                             GOOD, 400, "scaling_factor"),
    "float16 scaling 1e6": ("/encode", {"output_type": "pt", "dtype": "float16",
                                        "scaling_factor": "1e6"}, GOOD, 400, "float16"),
    "decode scaling 1e-300": ("/decode", {"scaling_factor": "1e-300"},
                              dumps({"latent": np.ones((1, 4, 2, 2, 2), np.float32)}, {}),
                              422, "scaling_factor"),
    "empty batch": ("/decode", {}, _bare((0, 4, 1, 2, 2)), 422, "empty"),
    # json.loads recursed past Python's limit: RecursionError, a 500.
    "shape of 20000 brackets": ("/decode", {"shape": "[" * 20_000, "dtype": "float32"},
                                _bare((1, 4, 2, 2, 2)), 400, "shape"),
    "tensor shape of 20000 brackets": ("/encode", {"shape": "[" * 20_000, "dtype": "uint8"},
                                       bytes(48), 400, "shape"),
    # No bytes to check next to a zero dimension; numpy's reshape then raised a 500.
    "zero dimension beside 2**62": ("/decode", {}, _raw_header(
        _bare((1, 4, 2, 2, 2)),
        b'{"latent":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],'
        b'"data_offsets":[0,0]}}'), 422, "shape"),
    # Finite, but the decoder overflowed on it: NaN tensors and black frames, answered 200.
    "latent of 3e38": ("/decode", {"format": "frames"},
                       dumps({"latent": np.full((1, 4, 2, 2, 2), 3e38, np.float32)}, {}),
                       422, "reach"),
}


@pytest.mark.parametrize("case", sorted(ODD_REQUESTS))
async def test_odd_parameters_get_a_4xx_naming_them(tiny_weights: Path, case: str) -> None:
    path, params, body, status, word = ODD_REQUESTS[case]
    ctype = "video/mp4" if body in (GOOD, SQUARE) else "application/octet-stream"
    async with running_app(tiny_settings(tiny_weights)) as client:
        r = await client.post(path, params=params, content=body,
                              headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert word in r.json()["detail"], r.text


async def test_frames_refuses_what_encode_refuses(tiny_weights: Path) -> None:
    async with running_app(tiny_settings(tiny_weights)) as client:
        text = await client.post("/frames", content=b"hello", headers={"content-type":
                                                                       "text/plain"})
        unknown = await client.post("/frames", params={"resize": "8"}, files=_mp4_upload(GOOD))
        good = await client.post("/frames", files=_mp4_upload(GOOD))
    assert (text.status_code, text.json()["error"]) == (415, "unsupported_media")
    assert unknown.status_code == 400 and "'resize'" in unknown.json()["detail"]
    assert good.status_code == 200 and good.headers["X-Frames"] == "5"


async def test_a_latent_found_by_its_weights_names_the_model_that_decodes_it(
        tiny_weights: Path) -> None:
    from tests.service_fixtures import TINY_NAME

    async with running_app(tiny_settings(tiny_weights)) as client:
        latent = (await client.post("/encode", files=_mp4_upload(GOOD))).content
        renamed = _tamper(latent, meta={"model_name": "other"})
        r = await client.post("/decode", content=renamed, params={"format": "frames"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Model"] == TINY_NAME
    assert loads(r.content)[1]["model_name"] == TINY_NAME


async def test_frames_answers_are_inside_the_memory_budget_until_sent(
        tiny_weights: Path) -> None:
    # /frames built its answer (up to 512 MiB from a small upload) outside the budget and
    # kept it while the client did not read: six at once took 8.7 GB on a 4 GB budget.
    async with running_app(tiny_settings(tiny_weights)) as client:
        budget = client.app.state.service.pipeline.budget  # type: ignore[attr-defined]
        taken: list[int] = []
        acquire = budget.acquire

        async def recording(nbytes: int):  # type: ignore[no-untyped-def]
            taken.append(nbytes)
            return await acquire(nbytes)

        budget.acquire = recording
        good = await client.post("/frames", files=_mp4_upload(GOOD))
        assert good.status_code == 200
        frames = int(good.headers["X-Frames"]) * int(good.headers["X-Width"]) * int(
            good.headers["X-Height"]) * 3
        assert taken == [3 * frames]  # the frames, joined, and the file
        assert budget.reserved == 0  # given back once the answer was sent


async def test_a_held_answer_not_taken_in_time_gives_its_reservation_back() -> None:
    import asyncio

    from ivvae.api.http.answers import HeldResponse
    from ivvae.errors import DeadlineExceeded

    released: list[bool] = []

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client reads nothing

    async def receive() -> dict:  # type: ignore[type-arg]
        await asyncio.Event().wait()
        return {}

    held = HeldResponse(b"x" * 100, release=lambda: released.append(True), seconds=0.2)
    with pytest.raises(DeadlineExceeded):
        await held({"type": "http"}, receive, send)
    assert released == [True] and held.body == b""


async def test_a_declared_frame_count_over_the_limit_is_refused_before_any_model_step(
        tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/encode`` ran the model over ``max_frames`` frames before refusing a clip whose
    header already declared too many (preprocessing or not), as ``/frames`` did not."""
    from ivvae.backends import local

    steps = 0
    step = local._Sequence.step

    async def counted(self: local._Sequence, array: np.ndarray, *, first: bool,
                      ) -> list[np.ndarray]:
        nonlocal steps
        steps += 1
        return await step(self, array, first=first)

    monkeypatch.setattr(local._Sequence, "step", counted)
    long = media.make_video(None, frames=40, width=16, height=16)  # declares 40
    short = media.make_video(None, frames=10, width=16, height=16)  # 24 fps
    refused = {
        "as it is": (long, {}, "declares 40 frames, over the limit of 16"),
        "a window": (long, {"start_frame": "4"}, "give 36 after preprocessing"),
        "resampled up": (short, {"fps": "48"}, "give 20 after preprocessing"),
    }
    async with running_app(tiny_settings(tiny_weights, max_frames=16)) as client:
        for name, (body, params, detail) in refused.items():
            for path in ("/encode", "/frames"):
                if params and path == "/frames":
                    continue
                r = await client.post(path, params=params, content=body,
                                      headers={"content-type": "video/mp4"})
                assert r.status_code == 413, (name, path, r.text)
                assert steps == 0, (name, path, r.text)
                assert detail in r.json()["detail"], (name, path, r.text)
        # What the options take of the long clip fits: still encoded.
        for params, frames in (({"max_frames": "9"}, "9"), ({"stride": "3"}, "14"),
                               ({"num_frames": "13"}, "13")):
            r = await client.post("/encode", params=params, content=long,
                                  headers={"content-type": "video/mp4"})
            assert r.status_code == 200, (params, r.text)
            assert loads(r.content)[1]["num_frames"] == frames, params
    assert steps > 0


async def test_a_full_spool_disk_is_a_503_to_retry_not_a_500(
        tiny_weights: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The disk under TMPDIR is full (uploads of many clients at once): the client may retry,
    # elsewhere or later, and the operator is told what to size.
    import errno
    import io
    import logging
    import tempfile

    import starlette.formparsers

    from ivvae.api.http import deps

    def no_room() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device")

    def full(*args: object, **kwargs: object) -> int:
        raise no_room()

    class FullSpool(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise no_room()

    class FullFile(io.FileIO):
        def write(self, data: object) -> int:
            raise no_room()

    def fdopen_full(fd: int, mode: str = "r", *args: object) -> io.FileIO:
        return FullFile(fd, "wb")

    clip = media.make_video(None, frames=5, width=16, height=16)
    async with running_app(tiny_settings(tiny_weights)) as client:
        with caplog.at_level(logging.WARNING, logger="ivvae.http"):
            with monkeypatch.context() as m:
                m.setattr(deps.os, "fdopen", fdopen_full)  # the raw body's own spool file
                raw = await client.post("/encode", content=clip,
                                        headers={"content-type": "video/mp4"})
            with monkeypatch.context() as m:
                m.setattr(starlette.formparsers, "SpooledTemporaryFile", FullSpool)
                multipart = await client.post("/encode", files={"file": ("c.mp4", clip)})
            with monkeypatch.context() as m:
                m.setattr(deps.tempfile, "mkstemp", full)
                no_file = await client.post("/encode", content=clip,
                                            headers={"content-type": "video/mp4"})
        for r in (raw, multipart, no_file):
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            assert "no room for this upload" in r.json()["detail"]
        assert "size the temporary folder" in caplog.text
        ok = await client.post("/encode", content=clip, headers={"content-type": "video/mp4"})
        assert ok.status_code == 200, ok.text


async def test_a_cancelled_request_is_a_503_only_while_the_server_stops(
        tiny_weights: Path) -> None:
    # uvicorn cancels what still runs when the shutdown grace is over: that is a 503 to
    # retry. A cancellation at any other time is not the server stopping: it goes on.
    import asyncio

    async def cancelled() -> None:
        raise asyncio.CancelledError

    async with running_app(tiny_settings(tiny_weights)) as client:
        app = client.app  # type: ignore[attr-defined]
        app.add_api_route("/cancelled", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await client.get("/cancelled")
        app.state.service.stopping = True
        r = await client.get("/cancelled")
        app.state.service.stopping = False
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"error": "overloaded", "detail": "the server is shutting down; retry"}
