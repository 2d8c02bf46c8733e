"""POST /frames: a video (or image) to the uint8 RGB frames the model sees of it.

What the service decodes of an upload (orientation applied, the exact frame count and
size), as the frames file ``/decode?format=frames`` returns for a latent: the compare page
scores its reconstruction against these, as ``ivvae eval`` does.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ....core import strict
from ....errors import TooLarge
from ....latents import SAR_KEY
from ....outputs import FRAMES_LAYOUT, MEDIA_TYPES
from ....safetensors_io import dumps
from ....video import VideoLimits, exact_rate, open_video
from ...metering import RequestMeter
from ..answers import HELD_COPIES, HeldResponse
from ..deps import Svc, authorized, read_body, refuse_parameters, require_video_type
from ..openapi import binary_answer, error_responses, video_body

router = APIRouter(tags=["frames"], dependencies=[authorized("frames")])

# The most decoded bytes (T * H * W * 3) one answer holds: it is built in memory, and the
# compare page keeps it and the reconstruction in a browser tab.
MAX_FRAMES_BYTES = 512 * 1024 * 1024


def _answer_bytes(data: bytes, limits: VideoLimits) -> int:
    """What building the answer holds at most (``HELD_COPIES`` of the frames), from the
    size and frame count the header declares (the cap without)."""
    with open_video(data, limits=limits) as reader:
        info = reader.info
        frames = info.width * info.height * 3 * (info.num_frames or MAX_FRAMES_BYTES)
    return HELD_COPIES * min(frames, MAX_FRAMES_BYTES)


def _frames_file(data: bytes, limits: VideoLimits) -> tuple[bytes, dict[str, str]]:
    with open_video(data, limits=limits) as reader:
        info = reader.info
        per_frame = info.width * info.height * 3
        parts, total = [], 0
        for chunk in reader.iter_frames(16):
            total += len(chunk)
            if total * per_frame > MAX_FRAMES_BYTES:
                raise TooLarge(f"the decoded video exceeds {MAX_FRAMES_BYTES} bytes of frames; "
                               "/frames is for previews: send a shorter clip")
            parts.append(chunk)
    frames = np.concatenate(parts)
    rate = exact_rate(info.fps)
    meta = {"num_frames": str(len(frames)), "height": str(info.height),
            "width": str(info.width), "fps": f"{rate.numerator}/{rate.denominator}",
            "layout": FRAMES_LAYOUT}
    if info.sample_aspect_ratio != 1:  # stored pixels, shown wider or narrower
        meta[SAR_KEY] = strict.sample_aspect_ratio_text(info.sample_aspect_ratio)
    return dumps({"frames": frames}, meta), meta


@router.post(
    "/frames",
    summary="Decode a video (or image) into the uint8 RGB frames the model sees",
    response_class=Response,
    description="The frames the service decodes of an upload (orientation applied, the "
                "exact frame count and size), as /decode?format=frames returns them for a "
                "latent: to score a reconstruction against. It takes no parameters.",
    responses={200: binary_answer([MEDIA_TYPES["frames"]],
                                  "safetensors: `frames` (T, H, W, 3) uint8 RGB; metadata "
                                  "num_frames, height, width, fps",
                                  ["X-Frames", "X-Width", "X-Height"]),
               **error_responses(400, 401, 413, 415, 422, 500, 503)},
    openapi_extra=video_body("the video or image file: as multipart field 'file', or as the "
                             "raw body with its content type"),
)
async def frames(request: Request, svc: Svc) -> Response:
    async with RequestMeter(svc.metrics, "frames", "http") as meter:
        s = svc.settings
        refuse_parameters(request.query_params.multi_items(), "/frames")
        with svc.pipeline.bodies.hold() as held:
            data, ctype = await read_body(request, s.max_upload_bytes, held)
            require_video_type(ctype)
            limits = VideoLimits(max_frames=s.max_frames, max_pixels=s.max_pixels)
            # Up to 1.5 GB for one answer: within the memory budget like every other
            # request, and held until the client has it (a 2 MB upload makes a 500 MB
            # answer).
            release = await svc.pipeline.budget.acquire(
                await asyncio.to_thread(_answer_bytes, data, limits))
            try:
                body, meta = await asyncio.to_thread(_frames_file, data, limits)
            except BaseException:
                release()
                raise
            del data
        return HeldResponse(body, release=release, seconds=s.request_timeout_s,
                            counted=meter.hand_over(),
                            media_type=MEDIA_TYPES["frames"], headers={
                                "X-Frames": meta["num_frames"], "X-Width": meta["width"],
                                "X-Height": meta["height"]})
