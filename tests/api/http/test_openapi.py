"""What ``/openapi.json`` promises a client generated from it, checked against what the real
app reads and answers: every query parameter the parsers take and no other, the key
scheme, the answers' headers, the error codes; and the behaviour a generated client relies
on (its ``Accept`` lists every type; its form has only the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from ivvae.api.http.openapi import ERROR_CODES
from ivvae.api.http.tensors import DECODE_OUTPUT_KEYS, ENCODE_KEYS
from ivvae.errors import IVVAEError, UntrustedCertificate
from ivvae.safetensors_io import loads
from ivvae.video.preprocess import PREPROCESS_KEYS
from ivvae.wire import DECODE_KEYS
from tests import media
from tests.service_fixtures import running_app, tiny_settings


def _names(operation: dict[str, Any]) -> set[str]:
    return {p["name"] for p in operation.get("parameters", [])}


async def test_the_spec_lists_what_the_routes_read_and_the_key_they_need(
        tiny_weights: Path) -> None:
    async with running_app(tiny_settings(tiny_weights, api_keys="k1")) as client:
        spec = (await client.get("/openapi.json")).json()
        # Every parameter the spec lists is read (none is refused as unknown)...
        video = media.make_video(None, frames=1, width=8, height=8)
        unknown = await client.post("/encode?rezise=8", content=video,
                                    headers={"content-type": "video/mp4",
                                             "authorization": "Bearer k1"})
        refused = await client.post("/encode", content=video,
                                    headers={"content-type": "video/mp4"})
        models = (await client.get("/models", headers={"authorization": "Bearer k1"})).json()
    validate(spec)
    paths = spec["paths"]
    encode, decode = paths["/encode"]["post"], paths["/decode"]["post"]
    # ...and it lists exactly what the parsers take.
    assert _names(encode) == {*ENCODE_KEYS, *PREPROCESS_KEYS}
    assert _names(decode) == {*DECODE_OUTPUT_KEYS, *DECODE_KEYS}
    assert _names(paths["/frames"]["post"]) == set()
    assert unknown.status_code == 400 and "'rezise'" in unknown.json()["detail"]
    bucket = next(p for p in encode["parameters"] if p["name"] == "bucket")
    assert bucket["schema"]["type"] == "array" and bucket["explode"] is True

    # The key: a bearer scheme on the routes that check one, none on the probes.
    schemes = spec["components"]["securitySchemes"]
    (name, scheme), = schemes.items()
    assert scheme == {"type": "http", "scheme": "bearer",
                      "description": scheme["description"]}
    for path in ("/encode", "/decode", "/frames"):
        assert paths[path]["post"]["security"] == [{name: []}], path
    assert paths["/models"]["get"]["security"] == [{name: []}]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in paths[path]["get"], path
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "WWW-Authenticate" in encode["responses"]["401"]["headers"]
    # Without keys the key may be left out (a generated client must not demand one).
    async with running_app(tiny_settings(tiny_weights)) as client:
        open_spec = (await client.get("/openapi.json")).json()
    validate(open_spec)
    assert open_spec["paths"]["/encode"]["post"]["security"] == [{}, {name: []}]
    assert "security" not in open_spec["paths"]["/healthz"]["get"]

    # The answers: binary, with the headers the routes set.
    ok = encode["responses"]["200"]
    assert ok["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {"X-Cache", "X-Latent-Shape", "X-Model", "shape", "dtype"} <= set(ok["headers"])
    assert {"X-Frames", "X-Width", "X-Height", "X-Batch"} <= set(
        decode["responses"]["200"]["headers"])
    # What the connection answers before any route: a slow body, a huge head.
    assert {"408", "431"} <= set(encode["responses"]) & set(decode["responses"])
    assert encode["description"] != decode["description"]
    # /models: typed (ModelInfo's fields), and the real answer is what it says.
    schema = paths["/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(models, schema)
    assert {"name", "z_dim", "scale_factor", "shift_factor", "weights_sha256"} <= set(
        schema["properties"]["models"]["items"]["required"])


def test_the_error_codes_are_every_error_s() -> None:
    def codes(cls: type[IVVAEError]) -> set[str]:
        return {cls.code}.union(*(codes(sub) for sub in cls.__subclasses__()))

    assert codes(IVVAEError) - {UntrustedCertificate.code} <= set(ERROR_CODES)
    assert {"invalid_input", "unauthorized", "not_found", "method_not_allowed"} <= set(ERROR_CODES)


@pytest.mark.parametrize(("accept", "frames"), [
    ("application/x-safetensors", True),
    # A generated client's Accept: every type the operation answers, the MP4 first.
    ("video/mp4, application/x-safetensors, application/zip, application/octet-stream", False),
    ("application/x-safetensors;q=0.1, video/mp4", False),
    ("application/x-safetensors;q=0", False),
    ("video/*;q=0.2, application/x-safetensors", True),
    ("*/*", False),
    ("application/x-safetensors, */*", True),  # named beats a wildcard at equal q
    ("application/x-safetensors;q=0.5, */*", False),
])
async def test_accept_picks_frames_only_when_preferred(tiny_weights: Path, accept: str,
                                                      frames: bool) -> None:
    video = media.make_video(None, frames=5, width=16, height=16)
    async with running_app(tiny_settings(tiny_weights)) as client:
        latent = (await client.post("/encode", content=video,
                                    headers={"content-type": "video/mp4"})).content
        answer = await client.post("/decode", content=latent, headers={"accept": accept})
    assert answer.status_code == 200, answer.text
    if frames:
        assert answer.headers["content-type"] == "application/x-safetensors"
        assert loads(answer.content)[0]["frames"].shape == (5, 16, 16, 3)
    else:
        assert answer.headers["content-type"] == "video/mp4"


async def test_form_fields_and_contradictions_are_refused_by_name(tiny_weights: Path) -> None:
    video = media.make_video(None, frames=1, width=8, height=8)
    async with running_app(tiny_settings(tiny_weights)) as client:
        with_field = await client.post("/encode", files={"file": ("a.mp4", video, "video/mp4")},
                                       data={"dtype": "float16"})
        frames_field = await client.post("/frames", files={"file": ("a.mp4", video, "video/mp4")},
                                         data={"fps": "5"})
        plain = await client.post("/encode", files={"file": ("a.mp4", video, "video/mp4")})
        moments = await client.post("/encode?output_type=pt&moments=true", content=video,
                                    headers={"content-type": "video/mp4"})
        seed = await client.post("/encode?sample=true&seed=18446744073709551615",
                                 content=video, headers={"content-type": "video/mp4"})
    assert with_field.status_code == 400
    assert "multipart field 'dtype' is not read" in with_field.json()["detail"]
    assert "?dtype=" in with_field.json()["detail"]
    assert frames_field.status_code == 400 and "'fps'" in frames_field.json()["detail"]
    assert plain.status_code == 200
    assert moments.status_code == 400 and "'moments'" in moments.json()["detail"]
    assert seed.status_code == 400 and "[0, 2**63)" in seed.json()["detail"]
