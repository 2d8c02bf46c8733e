"""What ``/openapi.json`` says of the routes, for clients generated from it and for ``/docs``:
the query parameters (their names from the parsers' own tables, so the spec lists exactly
what ``ivvae.api.http.tensors`` reads), the bodies, the answers (binary, with their
headers) and the errors (the JSON body, its codes from ``ivvae.errors``).

The routes read their query parameters themselves, to refuse an unknown one by name, so
FastAPI cannot see them: they are declared here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI

from ...core.model_info import ModelInfo
from ...core.names import CRF_RANGE, DEFAULT_CRF, PRECISIONS
from ...core.steps import FRAMES_DTYPES
from ...errors import IVVAEError, UntrustedCertificate
from ...video.preprocess import CROPS, MAX_COUNT, OPTION_HELP, PREPROCESS_KEYS
from ...wire import DECODE_KEYS, LATENT_SPACES, WIRE_DTYPES
from .errors import OTHER_HTTP_CODE, UNSERVED_CODES
from .tensors import DECODE_OUTPUT_KEYS, ENCODE_KEYS

Schema = dict[str, Any]


def key_optional(app: FastAPI) -> None:
    """``/openapi.json`` of a server without API keys: the routes that check one say it may
    be left out (``security: [{}, {apiKey: []}]``), so a generated client does not demand
    a token it will never need."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for path in build().get("paths", {}).values():
                for operation in path.values():
                    if isinstance(operation, dict) and operation.get("security"):
                        operation["security"] = [{}, *operation["security"]]
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to extend it


# -- errors ----------------------------------------------------------------------------------


def _codes(cls: type[IVVAEError]) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


# Every ``error`` an answer may carry: the service's errors' codes (not the client's own
# ``UntrustedCertificate``), and the framework's for a path or method that is not served
# (``ivvae.api.http.app``).
ERROR_CODES = tuple(sorted((_codes(IVVAEError) - {UntrustedCertificate.code})
                           | {*UNSERVED_CODES.values(), OTHER_HTTP_CODE}))

ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "enum": list(ERROR_CODES),
                  "description": "stable machine-readable code"},
        "detail": {"type": "string", "description": "what went wrong, for people"},
    },
}
_WHY = {400: "malformed request", 401: "missing or invalid API key",
        408: "the request body came too slowly",
        413: "too large for a limit (bytes, frames, pixels, the memory budget)",
        415: "not a video or image", 422: "unreadable media, latent or parameters",
        431: "too many request headers, or too large a request head",
        500: "internal error", 503: "backend down or server overloaded (see Retry-After)",
        504: "the request's deadline passed"}
# What the connection itself may answer any request with (``ivvae.api.http.protocol``).
CONNECTION_ERRORS = (408, 431)


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` entries for ``statuses`` and the connection's own: the JSON
    error body (a 401 with ``WWW-Authenticate``, a 503 with ``Retry-After``)."""
    out: dict[int | str, dict[str, object]] = {}
    for status in sorted({*statuses, *CONNECTION_ERRORS}):
        entry: dict[str, object] = {
            "description": _WHY.get(status, "error"),
            "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        if status == 401:
            entry["headers"] = _headers({"WWW-Authenticate": "Bearer"})
        elif status == 503:
            entry["headers"] = _headers({"Retry-After": "seconds to wait before retrying"})
        out[status] = entry
    return out


# -- bodies and answers ---------------------------------------------------------------------

_BINARY: Schema = {"type": "string", "format": "binary"}


def video_body(description: str, *, tensors: bool = False) -> dict[str, object]:
    """OpenAPI ``openapi_extra`` for a route whose body is a video or image upload (and,
    with ``tensors``, frames as a raw tensor body)."""
    binary = {"schema": _BINARY}
    return {"requestBody": {
        "required": True,
        "description": description,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"], "additionalProperties": False,
                "properties": {"file": _BINARY}}},
            "video/*": binary, "image/*": binary, "application/octet-stream": binary,
        }}}


# The answers' own headers, one description each.
HEADERS = {
    "X-Cache": "hit: answered from the result cache; miss: encoded now",
    "X-Latent-Shape": "the latent's shape, B,z,t,h,w (e.g. 1,16,5,34,60)",
    "X-Model": "the model that encoded or decoded",
    "X-Frames": "frames of each video (after cropping to the original count)",
    "X-Width": "frame width in pixels",
    "X-Height": "frame height in pixels",
    "X-Batch": "videos in the answer",
    "shape": "a raw tensor answer's shape as a JSON list ([1, 16, 5, 34, 60]), as Hugging "
             "Face's remote-VAE endpoints answer",
    "dtype": "a raw tensor answer's dtype (float32, bfloat16, float16 or uint8)",
    "Content-Disposition": "a suggested file name",
}


def _headers(described: Mapping[str, str]) -> dict[str, object]:
    return {name: {"description": text, "schema": {"type": "string"}}
            for name, text in described.items()}


def binary_answer(media_types: Iterable[str], description: str,
                  headers: Iterable[str]) -> dict[str, object]:
    """A 200 ``responses`` entry: a binary body of one of ``media_types``, and ``headers``
    (names from ``HEADERS``)."""
    return {"description": description,
            "content": {media: {"schema": _BINARY} for media in media_types},
            "headers": _headers({name: HEADERS[name] for name in headers})}


def _model_info_schema() -> Schema:
    from pydantic import TypeAdapter

    schema: Schema = TypeAdapter(ModelInfo).json_schema()
    return schema


# GET /models: what a gateway knows of each model (``ModelInfo``'s own fields).
MODELS_SCHEMA: Schema = {
    "type": "object", "required": ["default", "encode_precision", "models"],
    "properties": {
        "default": {"type": "string", "description": "the model a request without one gets"},
        "encode_precision": {"type": "string", "enum": list(PRECISIONS),
                             "description": "what the encoders compute in"},
        "models": {"type": "array", "items": _model_info_schema()},
    },
}


# -- query parameters -------------------------------------------------------------------------

_STRING: Schema = {"type": "string"}
_BOOLEAN: Schema = {"type": "boolean", "default": False}
_COUNT: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
_POSITIVE: Schema = {"type": "integer", "minimum": 1}
_NUMBER: Schema = {"type": "number"}
_SHAPE = ("a raw tensor body's shape, comma-separated or as a JSON list (1,16,5,8,8 or "
          "[1, 16, 5, 8, 8]); with it, the body is the tensor's bytes, C order, little-endian")
_PREPROCESS_SCHEMAS: dict[str, Schema] = {
    "crop": {"type": "string", "enum": list(CROPS)},
    "bucket": {"type": "array", "items": {"type": "string", "pattern": r"^\d+[xX]\d+[xX]\d+$"}},
    "start_frame": _COUNT, "num_frames": {**_COUNT, "minimum": 1},
    "max_frames": {**_COUNT, "minimum": 1}, "stride": {**_COUNT, "minimum": 1},
}

ENCODE_PARAMETERS: dict[str, tuple[Schema, str]] = {
    "model": (_STRING, "the model (default: the served default; GET /models lists them)"),
    "sample": (_BOOLEAN, "sample the posterior instead of taking its mean"),
    "seed": ({"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
             "with sample=true: the seed (default: drawn, recorded in the latent)"),
    "dtype": ({"type": "string", "enum": list(WIRE_DTYPES)},
              "for a file upload, the stored latent's dtype (float32, bfloat16, float16; "
              "default float32); for a raw tensor body, the body's dtype (uint8 frames "
              "(T, H, W, 3), or a float video (B, 3, T, H, W) in [-1, 1])"),
    "moments": (_BOOLEAN, "also store mu and logvar in the latent file (not with "
                          "output_type=pt)"),
    "shape": (_STRING, _SHAPE),
    "output_type": ({"type": "string", "enum": ["file", "pt"]},
                    "file: the latent .safetensors file (the default for a file upload); pt: "
                    "the latent as a raw tensor body with shape and dtype headers (the default "
                    "for a tensor body, or with scaling_factor / shift_factor)"),
    "scaling_factor": (_NUMBER, "with output_type=pt: answer (s - shift_factor) * "
                                "scaling_factor (default: the model's own scale)"),
    "shift_factor": (_NUMBER, "with output_type=pt: see scaling_factor (default: the "
                              "model's own shift)"),
    "fps": (_STRING, "a tensor body's frame rate (default 24); for a file, the rate to "
                     "resample to by timestamp (24, 12.5, 30000/1001)"),
}

DECODE_PARAMETERS: dict[str, tuple[Schema, str]] = {
    "format": ({"type": "string", "enum": ["mp4", "frames"], "default": "mp4"},
               "mp4 (H.264), or frames: a safetensors file of frames (T, H, W, 3), "
               "(B, T, H, W, 3) for a batch"),
    "crf": ({"type": "integer", "minimum": CRF_RANGE[0], "maximum": CRF_RANGE[1],
             "default": DEFAULT_CRF}, "the MP4's H.264 quality (lower is better)"),
    "output_type": ({"type": "string", "enum": ["mp4", "pt"]},
                    "pt: a raw tensor body (Hugging Face's remote-VAE answer), see "
                    "partial_postprocess; mp4: as format=mp4"),
    "partial_postprocess": (_BOOLEAN, "with output_type=pt: true, uint8 frames (T, H, W, 3) "
                                      "(B, T, H, W, 3) for a batch; false, the float video "
                                      "(B, 3, T, H, W)"),
    "image_format": ({"type": "string", "enum": ["jpg", "png"]},
                     "sent by diffusers' remote_decode; accepted, not used"),
    "shape": (_STRING, _SHAPE + ": a bare latent (B, z, t, h, w) or (z, t, h, w)"),
    "dtype": ({"type": "string", "enum": list(PRECISIONS)}, "a raw tensor body's dtype"),
    "frames_dtype": ({"type": "string", "enum": list(FRAMES_DTYPES), "default": "uint8"},
                     "with format=frames: uint8, or float32 (the decoder's own values)"),
    "model": (_STRING, "for a bare latent, the model (default: the served default)"),
    "fps": (_STRING, "for a bare latent, the MP4's frame rate (default 24; 30000/1001 too)"),
    "num_frames": (_POSITIVE, "for a bare latent, frames to keep (default 1 + 4(t-1))"),
    "height": (_POSITIVE, "for a bare latent, the height to crop to (default 8h)"),
    "width": (_POSITIVE, "for a bare latent, the width to crop to (default 8w)"),
    "latent_space": ({"type": "string", "enum": list(LATENT_SPACES), "default": "scaled"},
                     "for a bare latent: scaled (the model's scale * (s - shift), what /encode "
                     "answers and a diffusion model learns) or raw (the posterior's s)"),
    "scaling_factor": (_NUMBER, "for a bare latent, Hugging Face's: s = latent / "
                                "scaling_factor + shift_factor"),
    "shift_factor": (_NUMBER, "for a bare latent: see scaling_factor"),
    "do_scaling": ({"type": "boolean", "default": True},
                   "for a bare latent, Hugging Face's: false means raw"),
}


def _parameter(name: str, schema: Schema, description: str) -> dict[str, object]:
    entry: dict[str, object] = {"name": name, "in": "query", "required": False,
                                "schema": schema, "description": description}
    if schema.get("type") == "array":
        entry.update(style="form", explode=True)
    return entry


def encode_parameters() -> list[dict[str, object]]:
    """/encode's query parameters: its own and the preprocessing options."""
    own = [_parameter(name, *ENCODE_PARAMETERS[name]) for name in ENCODE_KEYS]
    options = [_parameter(name, *ENCODE_PARAMETERS[name]) if name in ENCODE_PARAMETERS
               else _parameter(name, _PREPROCESS_SCHEMAS.get(name, _STRING), OPTION_HELP[name])
               for name in PREPROCESS_KEYS]
    return own + options


def decode_parameters() -> list[dict[str, object]]:
    """/decode's query parameters: the answer's, and a bare latent's."""
    names = dict.fromkeys((*DECODE_OUTPUT_KEYS, *DECODE_KEYS))
    return [_parameter(name, *DECODE_PARAMETERS[name]) for name in names]
