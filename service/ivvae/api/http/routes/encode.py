"""POST /encode: a video (or image) to an IV-VAE latent file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ....core.names import Precision
from ....errors import UnsupportedMedia
from ....pipeline import EncodeOptions
from ...metering import RequestMeter
from ..deps import Authorized, Svc, read_body

router = APIRouter(tags=["encode"], dependencies=[Authorized])

LATENT_MEDIA_TYPE = "application/octet-stream"
_VIDEO_TYPES = ("video/", "image/", "application/octet-stream")


@router.post(
    "/encode",
    summary="Encode a video (or image) to an IV-VAE latent file (.safetensors)",
    response_class=Response,
    responses={200: {"content": {LATENT_MEDIA_TYPE: {}},
                     "description": "the latent file; headers X-Cache, X-Latent-Shape"}},
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
        data, ctype = await read_body(request, svc.settings.max_upload_bytes)
        if ctype and not ctype.startswith(_VIDEO_TYPES):
            raise UnsupportedMedia(
                f"content type {ctype!r} is not a video or image; send the file as "
                "multipart field 'file' or with a video/*, image/* or "
                "application/octet-stream content type"
            )
        options = EncodeOptions(model=model, sample=sample, seed=seed, dtype=dtype,
                                include_moments=moments)
        result = await svc.pipeline.encode(data, options)
        info = result.info
        name = f"{info.content_sha256[:16]}.latent.safetensors"
        return Response(result.data, media_type=LATENT_MEDIA_TYPE, headers={
            "X-Cache": "hit" if result.cache_hit else "miss",
            "X-Latent-Shape": ",".join(str(s) for s in result.latent_shape),
            "X-Model": info.model_name,
            "Content-Disposition": f'attachment; filename="{name}"',
        })
