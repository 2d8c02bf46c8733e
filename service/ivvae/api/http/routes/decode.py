"""POST /decode: a latent file to an MP4 or a frames file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ....core.names import CRF_RANGE, DEFAULT_CRF
from ....outputs import MEDIA_TYPES, OutputFormat, collect, render
from ...metering import RequestMeter
from ..deps import Authorized, Svc, read_body

router = APIRouter(tags=["decode"], dependencies=[Authorized])

FRAMES_ACCEPT = ("application/x-safetensors", "application/octet-stream")


@router.post(
    "/decode",
    summary="Decode a latent file to video/mp4 (or raw uint8 frames as safetensors)",
    response_class=Response,
    responses={200: {"content": {MEDIA_TYPES["mp4"]: {}, MEDIA_TYPES["frames"]: {}}}},
)
async def decode(
    request: Request,
    svc: Svc,
    format: Annotated[OutputFormat | None,
                      Query(description="mp4 (default) or frames (uint8 safetensors); "
                            "also chosen by Accept: application/x-safetensors")] = None,
    crf: Annotated[int, Query(ge=CRF_RANGE[0], le=CRF_RANGE[1],
                              description="H.264 quality (lower=better)")] = DEFAULT_CRF,
) -> Response:
    accept = request.headers.get("accept", "")
    fmt: OutputFormat = format or (
        "frames" if any(a in accept for a in FRAMES_ACCEPT) else "mp4")
    async with RequestMeter(svc.metrics, "decode", "http"):
        data, _ = await read_body(request, svc.settings.max_upload_bytes)
        info, frames = await svc.pipeline.decode_frames(data)
        body = await collect(render(fmt, info, frames, crf=crf))
        return Response(body, media_type=MEDIA_TYPES[fmt], headers={
            "X-Model": info.model_name, "X-Frames": str(info.num_frames),
            "X-Width": str(info.width), "X-Height": str(info.height)})
