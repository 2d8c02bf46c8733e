"""POST /encode: a video (or image) to an IV-VAE latent file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ....core.names import Precision
from ....errors import UnsupportedMedia
from ....pipeline import EncodeOptions
from ...metering import RequestMeter
from ..deps import Authorized, Svc, spooled_upload, unless_disconnected
from ..errors import error_responses

router = APIRouter(tags=["encode"], dependencies=[Authorized])

LATENT_MEDIA_TYPE = "application/octet-stream"
_VIDEO_TYPES = ("video/", "image/", "application/octet-stream")


@router.post(
    "/encode",
    summary="Encode a video (or image) to an IV-VAE latent file (.safetensors)",
    response_class=Response,
    responses={200: {"content": {LATENT_MEDIA_TYPE: {}},
                     "description": "the latent file; headers X-Cache, X-Latent-Shape"},
               **error_responses(400, 401, 413, 415, 422, 500, 503, 504)},
    openapi_extra={"requestBody": {
        "required": True,
        "description": "the video or image file: as multipart field 'file', or as the raw "
                       "body with its content type",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "video/*": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }}},
)
async def encode(
    request: Request,
    svc: Svc,
    model: Annotated[str, Query(description="model name; default: the first served")] = "",
    sample: Annotated[bool, Query(description="sample the posterior (else its mean)")] = False,
    seed: Annotated[int | None, Query(ge=0, description="seed for sample=true")] = None,
    dtype: Annotated[Precision, Query(description="stored latent dtype")] = "float32",
    moments: Annotated[bool, Query(description="also store mu and logvar")] = False,
) -> Response:
    async with RequestMeter(svc.metrics, "encode", "http"):
        options = EncodeOptions(model=model, sample=sample, seed=seed, dtype=dtype,
                                include_moments=moments)
        async with spooled_upload(request, svc.settings.max_upload_bytes) as (path, ctype):
            if ctype and not ctype.startswith(_VIDEO_TYPES):
                raise UnsupportedMedia(
                    f"content type {ctype[:60]!r} is not a video or image; send the file as "
                    "multipart field 'file' or with a video/*, image/* or "
                    "application/octet-stream content type"
                )
            result = await unless_disconnected(request, svc.pipeline.encode(path, options))
        info = result.info
        name = f"{info.content_sha256[:16]}.latent.safetensors"
        return Response(result.data, media_type=LATENT_MEDIA_TYPE, headers={
            "X-Cache": "hit" if result.cache_hit else "miss",
            "X-Latent-Shape": ",".join(str(s) for s in result.latent_shape),
            "X-Model": info.model_name,
            "Content-Disposition": f'attachment; filename="{name}"',
        })
