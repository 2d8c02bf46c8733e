"""POST /decode: a latent file to an MP4 or a frames file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ....core.names import CRF_RANGE, DEFAULT_CRF
from ....outputs import MEDIA_TYPES, OutputFormat, render
from ...metering import RequestMeter
from ..deps import Authorized, Svc, read_body, unless_disconnected
from ..errors import error_responses

router = APIRouter(tags=["decode"], dependencies=[Authorized])

# Only the frames file's own type picks it: a generic octet-stream Accept is not a request
# for raw frames.
FRAMES_ACCEPT = ("application/x-safetensors",)


@router.post(
    "/decode",
    summary="Decode a latent file to video/mp4 (or raw uint8 frames as safetensors)",
    response_class=StreamingResponse,
    responses={200: {"content": {MEDIA_TYPES["mp4"]: {}, MEDIA_TYPES["frames"]: {}},
                     "description": "the video, streamed as it is decoded; headers X-Model, "
                                    "X-Frames, X-Width, X-Height"},
               **error_responses(400, 401, 413, 422, 500, 503, 504)},
    openapi_extra={"requestBody": {
        "required": True, "description": "a latent file (.safetensors) made by /encode",
        "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}},
)
async def decode(
    request: Request,
    svc: Svc,
    format: Annotated[OutputFormat | None,
                      Query(description="mp4 (default) or frames (uint8 safetensors); "
                            "also chosen by Accept: application/x-safetensors")] = None,
    crf: Annotated[int, Query(ge=CRF_RANGE[0], le=CRF_RANGE[1],
                              description="H.264 quality (lower=better)")] = DEFAULT_CRF,
) -> StreamingResponse:
    accept = request.headers.get("accept", "")
    fmt: OutputFormat = format or (
        "frames" if any(a in accept for a in FRAMES_ACCEPT) else "mp4")
    async with RequestMeter(svc.metrics, "decode", "http"):
        data, _ = await read_body(request, svc.settings.max_upload_bytes)
        info, frames = await unless_disconnected(request, svc.pipeline.decode_frames(data))
        del data
        chunks = render(fmt, info, frames, crf=crf)
        try:
            # The first step runs before the status goes out: what fails there (a backend
            # down, a deadline) still gets its own status. Later failures end the stream.
            first = await unless_disconnected(request, anext(chunks, b""))
        except BaseException:
            await frames.aclose()  # type: ignore[attr-defined]
            raise
        return StreamingResponse(_stream(first, chunks, frames), media_type=MEDIA_TYPES[fmt],
                                 headers={"X-Model": info.model_name,
                                          "X-Frames": str(info.num_frames),
                                          "X-Width": str(info.width),
                                          "X-Height": str(info.height)})


async def _stream(first: bytes, rest: AsyncIterator[bytes], frames: object
                  ) -> AsyncIterator[bytes]:
    """The response body; closing it (done, failed, or the client gone) ends the decode
    and gives its share of the memory budget back."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await frames.aclose()  # type: ignore[attr-defined]
